#!/usr/bin/env python3
# bgp-hub, stage 0, endpoint hub (an FRR router, vial/frr). The configurator runs it as
#   python3 /antidote/stage0/configs/hub.py
# It logs in to the router over SSH and, with sudo, installs the files of stage0/configs/hub/
# from the lesson share (mounted at /antidote inside the router too): the interfaces for
# ifupdown, FRR's daemons list and its per-daemon configuration. Then it restarts FRR and
# the networking service so that both take them. The target is in SYRINGE_TARGET_HOST, the
# name Syringe-era lessons read (vialctl sets it beside ANTIDOTE_TARGET_HOST).
import os
import socket
import sys

import paramiko

host = os.environ['SYRINGE_TARGET_HOST']
files = '/antidote/stage0/configs/hub'

# Run in order, each waited for: a failure stops the stage with the command's output. The
# files are named one by one: /etc/frr is not readable by antidote, so a glob there would
# not expand.
COMMANDS = [
    f'sudo cp {files}/interfaces /etc/network/interfaces',
    f'sudo cp {files}/daemons /etc/frr/daemons',
    f'sudo cp {files}/zebra.conf {files}/bgpd.conf {files}/vtysh.conf /etc/frr/',
    'sudo chown frr:frr /etc/frr/zebra.conf /etc/frr/bgpd.conf',
    'sudo chown frr:frrvty /etc/frr/vtysh.conf',
    'sudo chmod 640 /etc/frr/zebra.conf /etc/frr/bgpd.conf /etc/frr/vtysh.conf',
    'sudo systemctl restart frr.service',
]
# Last: it takes the management interface down and up too, which may cost this session.
RESTART_NETWORKING = 'sudo systemctl restart networking'


def create_ssh_client(server, port, user, password):
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(server, port, user, password, look_for_keys=False, allow_agent=False, timeout=30)
    return client


def run(ssh, command):
    """Runs command on the router and waits for it; a failure stops the stage."""
    _, stdout, stderr = ssh.exec_command(command, timeout=180)
    output = stdout.read().decode() + stderr.read().decode()
    status = stdout.channel.recv_exit_status()
    print(f'$ {command}\n{output}', end='', flush=True)
    if status != 0:
        sys.exit(f'{host}: `{command}` exited {status}')


ssh = create_ssh_client(host, 22, 'antidote', 'antidotepassword')
for command in COMMANDS:
    run(ssh, command)
try:
    run(ssh, RESTART_NETWORKING)
except (paramiko.SSHException, socket.timeout, EOFError) as err:
    # The session went down with the management interface: log in again and see.
    print(f'{host}: the session ended during the restart ({err!r}); checking again', flush=True)
    ssh.close()
    ssh = create_ssh_client(host, 22, 'antidote', 'antidotepassword')
    run(ssh, 'systemctl is-active networking')
run(ssh, 'systemctl is-active frr.service && ip -br address')
ssh.close()
