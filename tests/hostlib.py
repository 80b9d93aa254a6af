"""Test hosts made of Linux network namespaces (tests/test_multihost.py only; needs root and `ip`).

Each host is a network namespace with one veth interface on a private
subnet; the other ends meet on a bridge inside a switch namespace, so the
machine's own network is never touched and the hosts reach each other only
across the veth network (each host's loopback holds nothing but itself).
Every command runs under `ip netns exec` in a UTS namespace of its own whose
hostname is the host's name, as on separate machines. The file system and the
process table stay shared: the state root is one directory all hosts see (the
stand-in for NFS), and MariaDB's unix socket is reached by a TCP forwarder
running on a host.

Run as a script it is that forwarder::

    python tests/hostlib.py forward 10.77.0.2 3306 /run/mysqld/mysqld.sock

or prints an hour's end-state fingerprint (faultlib.fingerprint) from inside a host::

    python tests/hostlib.py fingerprint WORLD.json 2026-11-30T05
"""
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid


# --- the TCP -> unix socket forwarder (script) ------------------------------------------

async def _pump(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def forward(host, port, unix_path):
    async def handle(reader, writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(unix_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))

    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def print_fingerprint(world_path, hour_text):
    """The fingerprint of a world described by a JSON file (root, database names, bucket template)."""
    import json
    import types

    import faultlib
    from ganymede import hours
    with open(world_path) as f:
        world = types.SimpleNamespace(**json.load(f))
    hour = hours.parse_hour(hour_text)
    result = {"fingerprint": faultlib.fingerprint(world, hour),
              "problems": faultlib.consistency_problems(world, hour)}
    print(json.dumps(result, sort_keys=True, default=str))


# --- the hosts (imported by the test) ------------------------------------------------------

class Network:
    """Hosts on 10.x.y.0/24, made and removed by the test; names carry a random tag so runs never meet."""

    def __init__(self, subnet="10.77.0"):
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = subnet
        self.switch = f"gm{self.tag}-sw"
        self.addresses = {}
        self.made = []

    def ns(self, host):
        return f"gm{self.tag}-{host}"

    def ip(self, *args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def create(self, hosts):
        """`hosts`: {name: last octet}. The switch first, then each host plugged into its bridge."""
        self.ip("netns", "add", self.switch)
        self.made.append(self.switch)
        self.ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.switch, "link", "set", "br0", "up")
        for host, octet in hosts.items():
            ns, port = self.ns(host), f"h-{host}"[:15]
            self.ip("netns", "add", ns)
            self.made.append(ns)
            self.ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            address = f"{self.subnet}.{octet}"
            self.ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")
            self.ip("-n", ns, "link", "set", "lo", "up")
            self.addresses[host] = address

    def argv(self, host, argv):
        """`argv` as run on `host`: its network namespace, its own hostname."""
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', host, *argv]

    def popen(self, host, argv, log_path, env=None, cwd=None):
        log = open(log_path, "ab")
        try:
            return subprocess.Popen(self.argv(host, argv), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd)
        finally:
            log.close()

    def run(self, host, argv, env=None, timeout=300, cwd=None):
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=cwd)

    def pids(self, host):
        """Every process running in the host's network namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.ns(host)], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host):
        """kill -9 every process of the host (as if it lost power); returns their pids."""
        killed = []
        for _ in range(5):  # a dying parent may still fork; go round until nothing is left
            pids = self.pids(host)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return killed

    def destroy(self):
        """Every process of every host killed, every namespace removed (the switch last)."""
        problems = []
        for ns in reversed(self.made):
            host = ns[len(f"gm{self.tag}-"):]
            if ns != self.switch:
                self.kill_host(host)
            try:
                self.ip("netns", "del", ns)
            except subprocess.CalledProcessError as exc:
                problems.append(f"{ns}: {exc.stderr.decode(errors='replace').strip()}")
        self.made = []
        return problems


def wait_for_port(net, host, port, timeout=30):
    """True once something listens on host:port, asked from that host."""
    code = f"import socket; socket.create_connection(('{net.addresses[host]}', {port}), timeout=1).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if net.run(host, [sys.executable, "-c", code], timeout=30).returncode == 0:
            return True
        time.sleep(0.2)
    return False


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        listen_host, listen_port, socket_path = sys.argv[2:5]
        asyncio.run(forward(listen_host, int(listen_port), socket_path))
    elif sys.argv[1:2] == ["fingerprint"]:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print_fingerprint(*sys.argv[2:4])
    else:
        sys.exit("usage: hostlib.py forward HOST PORT UNIX_SOCKET | fingerprint WORLD.json HOUR")
