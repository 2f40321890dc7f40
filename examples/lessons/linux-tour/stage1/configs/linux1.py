#!/usr/bin/env python3
# linux-tour, stage 1, endpoint linux1 (vial/utility). The configurator runs it as
#   python3 /antidote/stage1/configs/linux1.py
# with ANTIDOTE_TARGET_HOST set: it copies the list of names greet.sh reads into the
# learner's home and makes the directory the rendered configurations go to.
import os
import sys

import paramiko
from scp import SCPClient

host = os.environ['ANTIDOTE_TARGET_HOST']
files = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'linux1')


def create_ssh_client(server, port, user, password):
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(server, port, user, password, look_for_keys=False, allow_agent=False, timeout=30)
    return client


def run(ssh, command):
    """Runs command on the endpoint and waits for it; a failure stops the stage."""
    _, stdout, stderr = ssh.exec_command(command, timeout=60)
    output = stdout.read().decode() + stderr.read().decode()
    status = stdout.channel.recv_exit_status()
    print(f'$ {command}\n{output}', end='', flush=True)
    if status != 0:
        sys.exit(f'{host}: `{command}` exited {status}')


ssh = create_ssh_client(host, 22, 'antidote', 'antidotepassword')
scp = SCPClient(ssh.get_transport())

# Relative remote paths land in the learner's home, where the SSH session starts.
scp.put(os.path.join(files, 'names.txt'), 'names.txt')
run(ssh, 'mkdir -p rendered && ls -l names.txt')

scp.close()
ssh.close()
