# Endpoint images, one target per image, for the nightly job (as the Antidote curriculum's
# Makefile had). Each is `cargo xtask image <profile>`: offline, cached, first boot included.
#
#   make images                          linux, frr, utility, configurator (vendor images
#                                        need their disks)
#   make cumulus CUMULUS_SOURCE=FILE     Cumulus VX, from NVIDIA's qcow2
#   make vqfx VQFX_SOURCE=FILE           vQFX RE, from Juniper's disk image
#   make push-all REGISTRY=registry.example.com/vial TAG=nightly
#
# Builds use TCG (VIAL_ACCEL=tcg) unless VIAL_ACCEL=kvm is set in the environment.

CARGO ?= cargo
REGISTRY ?=
TAG ?= latest
CUMULUS_SOURCE ?= $(VIAL_CUMULUS_SOURCE)
VQFX_SOURCE ?= $(VIAL_VQFX_SOURCE)

# --tag NAME when a registry is given, so the image is pushed where the nightly job wants it.
tag = $(if $(REGISTRY),--tag $(REGISTRY)/$(1):$(TAG))

.PHONY: images all linux frr utility configurator cumulus vqfx push-all rebuild clean-images

images: linux frr utility configurator

all: linux frr utility configurator cumulus vqfx

linux:
	$(CARGO) xtask image linux $(call tag,linux)

frr:
	$(CARGO) xtask image frr $(call tag,frr)

# Plain containers (no VM): the utility endpoint and the lesson configurator.
utility:
	$(CARGO) xtask image utility $(call tag,utility)

configurator:
	$(CARGO) xtask image configurator $(call tag,configurator)

cumulus:
	$(CARGO) xtask image cumulus $(if $(CUMULUS_SOURCE),--source $(CUMULUS_SOURCE)) $(call tag,cumulus)

vqfx:
	$(CARGO) xtask image vqfx $(if $(VQFX_SOURCE),--source $(VQFX_SOURCE)) $(call tag,vqfx)

# Nightly: rebuild from fresh Debian packages (ignoring xtask's caches) and push.
push-all:
	test -n "$(REGISTRY)" || { echo "set REGISTRY=host/namespace" >&2; exit 2; }
	$(CARGO) xtask image linux --rebuild --push $(call tag,linux)
	$(CARGO) xtask image frr --rebuild --push $(call tag,frr)
	$(CARGO) xtask image utility --rebuild --push $(call tag,utility)
	$(CARGO) xtask image configurator --rebuild --push $(call tag,configurator)

rebuild:
	$(CARGO) xtask image linux --rebuild
	$(CARGO) xtask image frr --rebuild
	$(CARGO) xtask image utility --rebuild
	$(CARGO) xtask image configurator --rebuild

# The build caches (debootstrap downloads, root filesystems, first-booted disks).
clean-images:
	rm -rf target/image
