"""What an agent with egress cannot reach: anything but fleet's proxy.

The probes run in the agent's container, made by fleet's own code in this
process (ContainerManager → EgressProxy), against real listeners: a port on
the host, a Redis server on all the host's addresses, a stand-in metadata
service on 169.254.169.254 (on a veth pair this test adds), the stand-in
upstream directly, its name, and another egress agent's container. Each
control is then removed from fleet's code in turn (monkeypatch), and the
probes it guards are seen to succeed: the probes are not blind."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest
from egress_upstream import Upstream, run_upstream
from support import MakeFleet, free_port, start_redis

from fleet.container.manager import ContainerManager
from fleet.egress import proxy as egress_proxy
from fleet.egress.layout import EgressLayout

METADATA = "169.254.169.254"
DUMMY = "fleetmd0"

# Run in the agent's container: each target → "open" or why it is not.
PROBE = r"""
import json, os, socket, sys
from concurrent.futures import ThreadPoolExecutor, wait
def reach(target):
    kind, host, port = target
    try:
        if kind == "dns":
            return "open " + socket.getaddrinfo(host, port)[0][4][0]
        with socket.create_connection((host, port), timeout=3):
            return "open"
    except OSError as error:
        return type(error).__name__ + ": " + str(error)
targets = json.loads(sys.argv[1])
pool = ThreadPoolExecutor(len(targets))
futures = {name: pool.submit(reach, target) for name, target in targets.items()}
wait(futures.values(), timeout=4)  # a name lookup that is never answered counts as blocked
print(json.dumps({name: f.result() if f.done() else "no answer" for name, f in futures.items()}), flush=True)
os._exit(0)
"""


@dataclass
class Listeners:
    host_port: int
    redis_port: int


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    """A port open on every host address, Redis on every host address, and a
    metadata stand-in on 169.254.169.254:80 (on a veth pair of ours)."""
    subprocess.run(["ip", "link", "add", DUMMY, "type", "veth", "peer", "name", f"{DUMMY}p"], check=True)
    servers: list[socket.socket] = []
    try:
        subprocess.run(["ip", "addr", "add", f"{METADATA}/32", "dev", DUMMY], check=True)
        for link in (DUMMY, f"{DUMMY}p"):
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        for address, port in (("0.0.0.0", free_port()), (METADATA, 80)):
            server = socket.create_server((address, port))
            servers.append(server)
            threading.Thread(target=accept_forever, args=(server,), daemon=True).start()
        redis = start_redis(tmp_path_factory.mktemp("exposed-redis"), "--protected-mode", "no",
                            bind="0.0.0.0")
        yield Listeners(servers[0].getsockname()[1], redis.port)
        redis.process.terminate()
        redis.process.wait(timeout=10)
    finally:
        for server in servers:
            server.close()
        subprocess.run(["ip", "link", "del", DUMMY], check=False)


def accept_forever(server: socket.socket) -> None:
    while True:
        try:
            connection, _ = server.accept()
        except OSError:
            return
        connection.close()


@pytest.fixture(scope="module")
def upstream(docker_client: docker.DockerClient,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with run_upstream(docker_client, tmp_path_factory.mktemp("upstream"), ("forge.test",)) as up:
        yield up


@dataclass
class Agents:
    manager: ContainerManager
    client: docker.DockerClient

    def probe(self, agent: str, targets: dict[str, tuple[str, str, int]]) -> dict[str, str]:
        container = self.manager.ensure(agent)
        uid = str(self.manager.spec(agent).uid)
        done = container.exec_run(["python3", "-c", PROBE, json.dumps(targets)], user=uid)
        assert done.exit_code == 0, done.output
        found: dict[str, str] = json.loads(done.output)
        return found

    def address(self, agent: str) -> str:
        container = self.manager.ensure(agent)
        container.reload()
        return str(next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"])

    def gateway(self, agent: str) -> str:
        self.manager.ensure(agent)
        network = self.client.networks.get(EgressLayout(self.manager.settings).network_name(agent))
        return str(network.attrs["IPAM"]["Config"][0]["Gateway"])

    def listen(self, agent: str, port: int) -> None:
        """A listener inside the agent's own container, as its own user."""
        container = self.manager.ensure(agent)
        uid = str(self.manager.spec(agent).uid)
        script = (f"import socket; s = socket.create_server(('0.0.0.0', {port}))\n"
                  "while True: s.accept()[0].close()")
        container.exec_run(["python3", "-c", script], user=uid, detach=True)
        waited = container.exec_run(["python3", "-c", f"""
import socket, time
for _ in range(300):
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=1).close(); break
    except OSError:
        time.sleep(0.02)
"""], user=uid)
        assert waited.exit_code == 0


@pytest.fixture
def agents(make_fleet: MakeFleet, upstream: Upstream, docker_client: docker.DockerClient) -> Agents:
    """Two egress agents, `a` and `b`, each allowed only the stand-in forge."""
    spec = {"egress": ["forge.test"]}
    fleet = make_fleet({"a": spec, "b": spec}, egress_network=upstream.network,
                       egress_ca_file=str(upstream.ca_file), egress_hosts={"forge.test": upstream.address})
    return Agents(ContainerManager(docker_client, fleet.settings), docker_client)


def targets(agents: Agents, listeners: Listeners, upstream: Upstream) -> dict[str, tuple[str, str, int]]:
    return {
        "host via docker0": ("tcp", "172.17.0.1", listeners.host_port),
        "host via its network's gateway": ("tcp", agents.gateway("a"), listeners.host_port),
        "redis on the host": ("tcp", "172.17.0.1", listeners.redis_port),
        "metadata": ("tcp", METADATA, 80),
        "the upstream directly": ("tcp", upstream.address, 443),
        "the upstream's name": ("dns", "forge.test", 443),
        "another agent's container": ("tcp", agents.address("b"), 8000),
    }


GUARDS = {
    # the control removed → the probes that must then succeed
    "no host address on the agent's bridge": ["host via docker0", "host via its network's gateway",
                                               "redis on the host", "metadata"],
    "a network of its own per agent": ["another agent's container"],
    "only the proxy shares the agent's network": ["the upstream directly", "the upstream's name"],
}


def test_an_agent_with_egress_reaches_nothing_but_the_proxy(
        agents: Agents, listeners: Listeners, upstream: Upstream) -> None:
    agents.listen("b", 8000)
    found = agents.probe("a", targets(agents, listeners, upstream))
    assert {name: result for name, result in found.items() if result.startswith("open")} == {}
    assert set(found) == {probe for guarded in GUARDS.values() for probe in guarded}
    proxy = agents.manager.egress.address("a")
    assert proxy is not None
    assert agents.probe("a", {"proxy": ("tcp", proxy, 3128)}) == {"proxy": "open"}


def remove_control(control: str, monkeypatch: pytest.MonkeyPatch, upstream: Upstream) -> None:
    if control == "no host address on the agent's bridge":
        monkeypatch.setattr(egress_proxy, "INTERNAL_OPTIONS", {})
    elif control == "a network of its own per agent":
        monkeypatch.setattr(EgressLayout, "network_name", lambda self, agent: f"{self.proxy_name}.shared")
    else:
        monkeypatch.setattr(EgressLayout, "network_name", lambda self, agent: upstream.network)


@pytest.mark.parametrize("control", list(GUARDS))
def test_each_control_is_what_blocks_its_probes(
        control: str, monkeypatch: pytest.MonkeyPatch, agents: Agents, listeners: Listeners,
        upstream: Upstream) -> None:
    remove_control(control, monkeypatch, upstream)
    agents.listen("b", 8000)
    found = agents.probe("a", targets(agents, listeners, upstream))
    opened = {name for name, result in found.items() if result.startswith("open")}
    assert set(GUARDS[control]) <= opened, found


def test_the_network_of_an_agent_without_egress_any_more_and_then_the_proxy_are_removed(
        agents: Agents, docker_client: docker.DockerClient) -> None:
    settings = agents.manager.settings
    for agent in ("a", "b"):
        agents.manager.ensure(agent)
    layout = EgressLayout(settings)
    without_b = settings.model_copy(update={"agents": {"a": settings.agents["a"]}})
    ContainerManager(docker_client, without_b).remove_orphans()  # b's container, as `fleet worker` does first
    assert egress_proxy.EgressProxy(docker_client, without_b).remove_orphans() == [layout.network_name("b")]
    assert not (layout.policy_dir / "b.json").exists()
    assert {n.name for n in docker_client.networks.list(names=[layout.network_name("a")])} == {
        layout.network_name("a")}
    nobody = settings.model_copy(update={"agents": {}})
    ContainerManager(docker_client, nobody).remove_orphans()
    assert egress_proxy.EgressProxy(docker_client, nobody).remove_orphans() == [
        layout.network_name("a"), layout.proxy_name]
    assert not docker_client.containers.list(all=True, filters={"name": layout.proxy_name})
