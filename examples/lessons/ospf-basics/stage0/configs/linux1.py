#!/usr/bin/env python3
# Stage 0 of ospf-basics for linux1 (a plain container, vial/utility), run by the configurator:
#   python3 /antidote/stage0/configs/linux1.py
# with ANTIDOTE_TARGET_HOST, ANTIDOTE_TARGET_USERNAME and ANTIDOTE_TARGET_PASSWORD set.
# The launcher gave linux1 198.18.101.2/24 on eth1 (its link to r2); its default route is the
# management network's, so this adds a route to the routers' loopbacks and the r1-r2 link
# through r2 (198.18.101.1).
import os
import sys
import time

import paramiko

HOST = os.environ["ANTIDOTE_TARGET_HOST"]
USERNAME = os.environ["ANTIDOTE_TARGET_USERNAME"]
PASSWORD = os.environ["ANTIDOTE_TARGET_PASSWORD"]

COMMANDS = [
    "sudo ip route replace 198.19.255.0/24 via 198.18.101.1 dev eth1",
    "sudo ip route replace 198.18.100.0/24 via 198.18.101.1 dev eth1",
    "ip -br address show dev eth1",
    "ip route",
]


def connect(attempts=30):
    """An SSH session to the host; retried, since sshd may still be starting."""
    for attempt in range(1, attempts + 1):
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(HOST, port=22, username=USERNAME, password=PASSWORD,
                           look_for_keys=False, allow_agent=False, timeout=10)
            return client
        except (paramiko.SSHException, OSError) as err:
            print(f"{HOST}: connect attempt {attempt}: {err}", flush=True)
            client.close()
            time.sleep(2)
    sys.exit(f"{HOST}: no SSH session after {attempts} attempts")


def run(client, command):
    """Runs command on the host; prints its output, fails the script when it fails."""
    _, stdout, stderr = client.exec_command(command, timeout=60)
    output = stdout.read().decode() + stderr.read().decode()
    status = stdout.channel.recv_exit_status()
    print(f"$ {command}\n{output}", flush=True)
    if status != 0:
        sys.exit(f"{HOST}: `{command}` exited {status}")
    return output


client = connect()
try:
    for command in COMMANDS:
        run(client, command)
finally:
    client.close()
