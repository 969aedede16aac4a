"""Simulated hosts on this one machine: each a network namespace with its own
address on a bridge, running its own `fleet worker` with its own host id,
all reaching one Redis over that virtual network (not over loopback) and
sharing the one Docker engine (its socket is a file, which a network
namespace does not hide). Cutting a host's link (`ip link set … down`) is a
network partition of that host alone."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from support import FLEET, RUN_PREFIX, Fleet, RedisServer, Worker, start_redis


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class SimulatedHost:
    name: str  # its host_id
    netns: str
    link: str  # the bridge side of its veth pair: down = cut off
    address: str

    def cut(self) -> None:
        ip("link", "set", self.link, "down")

    def restore(self) -> None:
        ip("link", "set", self.link, "up")

    def start_worker(self, fleet: Fleet, redis_url: str, *agents: str) -> Worker:
        """`fleet worker` inside this host's namespace, as this host."""
        args = [a for agent in agents for a in ("--agent", agent)]
        env = {**fleet.env, "FLEET_HOST_ID": self.name, "FLEET_REDIS_URL": redis_url}
        worker = Worker(subprocess.Popen(["ip", "netns", "exec", self.netns, FLEET, "worker", *args],
                                         env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True))
        fleet.workers.append(worker)
        return worker


@dataclass
class SimulatedNetwork:
    """A bridge with the Redis server's address, and hosts plugged into it."""

    bridge: str
    subnet: str  # "10.N.0"
    redis: RedisServer | None = None
    hosts: list[SimulatedHost] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    @classmethod
    def create(cls, directory: Path, host_names: list[str]) -> SimulatedNetwork:
        tag = RUN_PREFIX[1:7]
        octet = 100 + int(hashlib.sha256(tag.encode()).hexdigest(), 16) % 150
        network = cls(bridge=f"fb{tag}", subnet=f"10.{octet}.0")
        try:
            ip("link", "add", network.bridge, "type", "bridge")
            ip("addr", "add", f"{network.gateway}/24", "dev", network.bridge)
            ip("link", "set", network.bridge, "up")
            for n, name in enumerate(host_names, start=1):
                network.add_host(name, n, tag)
            # Not loopback: Redis's protected mode would refuse the hosts.
            network.redis = start_redis(directory, "--protected-mode", "no", bind=network.gateway)
        except BaseException:
            network.destroy()
            raise
        return network

    def add_host(self, name: str, n: int, tag: str) -> None:
        netns, link, inner = f"fleet-{tag}-{name}", f"fv{tag}{n}", f"fi{tag}{n}"
        address = f"{self.subnet}.{10 + n}"
        ip("netns", "add", netns)
        self.hosts.append(SimulatedHost(name, netns, link, address))
        ip("link", "add", link, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", netns)
        ip("link", "set", link, "master", self.bridge)
        ip("link", "set", link, "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", inner)
        ip("-n", netns, "link", "set", inner, "up")
        ip("-n", netns, "link", "set", "lo", "up")

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return f"redis://{self.gateway}:{self.redis.port}/0"

    def host(self, name: str) -> SimulatedHost:
        return next(h for h in self.hosts if h.name == name)

    def destroy(self) -> None:
        if self.redis is not None:
            self.redis.process.terminate()
            self.redis.process.wait(timeout=30)
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.link], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
