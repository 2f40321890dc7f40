#!/usr/bin/env python3
# Stage 0 of ospf-basics for r1 (an FRR router, vial/frr), run by the configurator:
#   python3 /antidote/stage0/configs/r1.py
# with ANTIDOTE_TARGET_HOST, ANTIDOTE_TARGET_USERNAME and ANTIDOTE_TARGET_PASSWORD set.
# It logs in over SSH and configures FRR with vtysh: the link to r2 on enp0s3f1, a loopback,
# and OSPF area 0 on both.
import os
import sys
import time

import paramiko

HOST = os.environ["ANTIDOTE_TARGET_HOST"]
USERNAME = os.environ["ANTIDOTE_TARGET_USERNAME"]
PASSWORD = os.environ["ANTIDOTE_TARGET_PASSWORD"]

# One vtysh line per list entry, in order; vtysh keeps the mode (interface, router) between
# them. Point-to-point: no DR election on a link with two routers, so the adjacency is Full
# in seconds instead of after the 40 s wait timer.
CONFIG = [
    "configure terminal",
    # The guest's kernel does not forward by default; zebra turns it on.
    "ip forwarding",
    "interface lo",
    "ip ospf passive",
    "ip address 198.19.255.1/32",
    "exit",
    "interface enp0s3f1",
    "description link to r2",
    "ip address 198.18.100.1/24",
    "ip ospf network point-to-point",
    "exit",
    "router ospf",
    "ospf router-id 198.19.255.1",
    "network 198.18.100.0/24 area 0",
    "network 198.19.255.1/32 area 0",
    "exit",
    "exit",
    "write memory",
]


def connect(attempts=30):
    """An SSH session to the router; retried, since sshd may still be starting."""
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
    """Runs command on the router; prints its output, fails the script when it fails."""
    _, stdout, stderr = client.exec_command(command, timeout=60)
    output = stdout.read().decode() + stderr.read().decode()
    status = stdout.channel.recv_exit_status()
    print(f"$ {command}\n{output}", flush=True)
    if status != 0:
        sys.exit(f"{HOST}: `{command}` exited {status}")
    return output


def vtysh(lines):
    return "sudo vtysh " + " ".join("-c '{}'".format(line) for line in lines)


client = connect()
try:
    run(client, vtysh(CONFIG))
    run(client, vtysh(["show interface brief"]))
finally:
    client.close()
