"""`fleet bench --only egress`: what fleet's egress proxy costs. The same
stand-in HTTPS upstream is asked from the agent image twice: directly, from
a container on the upstream's network, and through the proxy, from an
egress agent's container made by fleet. Each side runs the same client
(standard library) inside its container, so only the path differs:
p50 of a request on a new connection (TLS to the proxy and from it), p50 on
a kept-alive connection, and the rate of four kept-alive connections."""

from __future__ import annotations

import json
import statistics
from contextlib import suppress
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import Mount

from fleet.container.manager import ContainerManager
from fleet.container.spec import LABEL_NAMESPACE
from fleet.egress.proxy import EgressProxy
from fleet.errors import FleetError
from fleet.settings import AGENT_IMAGE, PROXY_IMAGE, FleetSettings
from fleet.standin.upstream import issue_certificate, start_standin

NAMESPACE = "bench-egress"
UPSTREAM = "bench.upstream"
BODY_BYTES = 1024

# Runs in a container: n requests on new connections, n on one kept-alive
# connection, then 4 x n on four kept-alive connections at once.
CLIENT = r"""
import http.client, json, os, ssl, sys, threading, time
from urllib.parse import urlsplit
host, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
proxy = urlsplit(os.environ["HTTPS_PROXY"]) if os.environ.get("HTTPS_PROXY") else None
def connect():
    if proxy is None:
        return http.client.HTTPSConnection(host, 443, context=context, timeout=30)
    c = http.client.HTTPSConnection(proxy.hostname, proxy.port, context=context, timeout=30)
    c.set_tunnel(host, 443)
    return c
def get(c):
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
def timed(work):
    start = time.perf_counter(); work(); return time.perf_counter() - start
def fresh():
    c = connect(); get(c); c.close()
fresh()
fresh_s = [timed(fresh) for _ in range(n)]
kept = connect(); get(kept)
kept_s = [timed(lambda: get(kept)) for _ in range(n)]
def worker():
    c = connect()
    for _ in range(n):
        get(c)
threads = [threading.Thread(target=worker) for _ in range(4)]
start = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
rate = 4 * n / (time.perf_counter() - start)
print(json.dumps({"fresh": fresh_s, "kept": kept_s, "rate": rate}))
"""


def run_client(container: Any, n: int, user: str, environment: dict[str, str]) -> dict[str, Any]:
    done = container.exec_run(["python3", "-c", CLIENT, UPSTREAM, str(n), f"/{BODY_BYTES}"], user=user,
                              environment=environment)
    if done.exit_code != 0:
        raise FleetError(f"egress benchmark client failed: {done.output.decode(errors='replace')[-400:]}")
    figures: dict[str, Any] = json.loads(done.output)
    return {"fresh_p50_ms": statistics.median(figures["fresh"]) * 1000,
            "kept_p50_ms": statistics.median(figures["kept"]) * 1000, "requests_per_s": figures["rate"]}


def egress_overhead(engine: docker.DockerClient, scratch: Path, n: int) -> dict[str, Any]:
    ca_file = issue_certificate(engine, PROXY_IMAGE, scratch / "egress-certs", (UPSTREAM,))
    standin = start_standin(engine, f"{NAMESPACE}-upstream", (UPSTREAM,), namespace=NAMESPACE,
                            certificates=ca_file.parent)
    settings = FleetSettings.model_validate({
        "namespace": NAMESPACE, "host_id": "bench", "secrets_dir": scratch / "egress-secrets",
        "egress_dir": scratch / "egress", "egress_network": standin.network, "egress_ca_file": ca_file,
        "egress_hosts": {UPSTREAM: standin.address}, "agents": {"net": {"egress": [UPSTREAM]}}})
    manager = ContainerManager(engine, settings)
    try:
        agent = manager.ensure("net")
        through = run_client(agent, n, str(manager.spec("net").uid),
                             dict(manager.network_environment("net", "bench", 1)))
        direct_box = engine.containers.run(
            AGENT_IMAGE, ["sleep", "infinity"], detach=True, network=standin.network, user="10001:10001",
            read_only=True, cap_drop=["ALL"], labels={LABEL_NAMESPACE: NAMESPACE},
            mounts=[Mount(target="/certs", source=str(ca_file.parent.resolve()), type="bind",
                          read_only=True)])
        direct = run_client(direct_box, n, "10001", {"SSL_CERT_FILE": "/certs/ca.pem"})
    finally:
        label: dict[str, str | list[str] | bool] = {"label": f"{LABEL_NAMESPACE}={NAMESPACE}"}
        for container in engine.containers.list(all=True, filters=label):
            if container.id != standin.container.id:
                with suppress(docker.errors.NotFound):
                    container.remove(force=True)
        EgressProxy(engine, settings).remove()
        standin.remove()
        for volume in engine.volumes.list(filters={"label": f"{LABEL_NAMESPACE}={NAMESPACE}"}):
            with suppress(docker.errors.APIError):
                volume.remove(force=True)
    return {"requests": n, "body_bytes": BODY_BYTES, "direct": direct, "proxy": through,
            "fresh_ratio": through["fresh_p50_ms"] / direct["fresh_p50_ms"],
            "kept_ratio": through["kept_p50_ms"] / direct["kept_p50_ms"],
            "rate_ratio": through["requests_per_s"] / direct["requests_per_s"]}
