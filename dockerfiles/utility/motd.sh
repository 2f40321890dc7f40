#!/bin/sh
# The message of the day of a vial `utility` endpoint (dockerfiles/utility/Dockerfile): run by
# pam_motd at each SSH login. The endpoint's name is the container's host name.
name=$(uname -n)
echo
echo "  vial endpoint \"$name\": Linux utility container (Debian bookworm)"
echo "  python (3) with napalm, netmiko, PyEZ, jsnapy, robot, jinja2, yaml; ansible, git"
echo "  ip, ping, tcpdump, dig, curl, jq, yq, xmllint, bat, vim, nano; sudo needs no password"
if [ -d /antidote ]; then
    echo "  the lesson's files are in /antidote"
fi
echo
