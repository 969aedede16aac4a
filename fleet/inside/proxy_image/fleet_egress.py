"""fleet's egress addon for mitmproxy: runs in the proxy container.

For each connection it finds the agent by the network the client is on
(each agent has an internal network of its own, shared only with this
proxy), refuses a destination the agent's `egress` does not list with HTTP
403, overwrites the configured header from the host-side token on requests
to an injected host, streams every body through unbuffered, and reports
each decision (agent, task, destination, allowed or refused, bytes) as one
datagram to the agent's consumers on the host."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from egress_rules import (
    AgentPolicy,
    Policies,
    authority_host,
    is_ip_literal,
    normal_host,
    read_token,
    task_of,
)
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

POLICY_DIR = Path(os.environ.get("FLEET_EGRESS_POLICIES", "/run/fleet/egress/policies"))
REFUSED_HEADER = "X-Fleet-Egress"
READY_LINE = "fleet-egress: ready"


class Counter:
    """Counts the bytes of a streamed body and passes every chunk on at once."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.bytes += len(chunk)
        return chunk


class Egress:
    def __init__(self) -> None:
        self.policies = Policies(POLICY_DIR)
        self.tasks: dict[str, tuple[str, str]] = {}  # client connection id → (task, attempt)
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)

    # -- who is asking ---------------------------------------------------------

    def policy(self, client: connection.Client) -> AgentPolicy | None:
        return self.policies.of_client(client.peername[0]) if client.peername else None

    def refuse(self, flow: http.HTTPFlow, policy: AgentPolicy | None, reason: str) -> None:
        flow.response = http.Response.make(
            403, f"fleet egress: {reason}\n".encode(),
            {"Content-Type": "text/plain; charset=utf-8", REFUSED_HEADER: "refused"})
        if policy is not None:
            self.report(policy, flow, "refused", reason=reason)

    # -- hooks -----------------------------------------------------------------

    def running(self) -> None:
        """Listening: the host waits for this line before it lets an agent run."""
        print(READY_LINE, flush=True)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """The CONNECT target is the destination: decided here, before any
        connection to it is opened."""
        policy = self.policy(flow.client_conn)
        if policy is None:
            self.refuse(flow, None, "this proxy serves only fleet's agents")
            return
        self.tasks[flow.client_conn.id] = task_of(flow.request.headers.get("Proxy-Authorization", ""))
        reason = policy.refusal(flow.request.host, flow.request.port)
        if reason:
            self.refuse(flow, policy, reason)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Every request, tunnelled or plain, is checked against the address
        the proxy will connect to (`request.host`: the CONNECT target inside
        a tunnel, the URL's host otherwise)."""
        policy = self.policy(flow.client_conn)
        if policy is None:
            self.refuse(flow, None, "this proxy serves only fleet's agents")
            return
        request = flow.request
        if "Proxy-Authorization" in request.headers:  # a plain HTTP request carries it itself
            self.tasks[flow.client_conn.id] = task_of(request.headers["Proxy-Authorization"])
            del request.headers["Proxy-Authorization"]
        reason = policy.refusal(request.host, request.port)
        named = request.host_header
        if reason is None and named is not None and authority_host(named) != normal_host(request.host):
            reason = (f"agent {policy.agent!r} sent Host {named!r} to {request.host}:{request.port}: "
                      "the Host header must name the destination")
        if reason:
            self.refuse(flow, policy, reason)
            return
        injection = policy.injection(request.host)
        if injection is not None:
            # Always overwritten, never passed through: the agent's own value (its
            # placeholder, or a credential of its own choosing) never reaches the host.
            request.headers.pop(injection.header, None)
            token = read_token(injection.token_file)
            if token:
                request.headers[injection.header] = injection.render(token)
        flow.metadata["fleet.up"] = request.stream = Counter()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and REFUSED_HEADER not in flow.response.headers:
            flow.metadata["fleet.down"] = flow.response.stream = Counter()

    def response(self, flow: http.HTTPFlow) -> None:
        policy = self.policy(flow.client_conn)
        if policy is not None and "fleet.up" in flow.metadata:
            self.report(policy, flow, "allowed")

    def error(self, flow: http.HTTPFlow) -> None:
        policy = self.policy(flow.client_conn)
        if policy is not None and "fleet.up" in flow.metadata:
            self.report(policy, flow, "allowed", error=str(flow.error.msg if flow.error else ""))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """The upstream's TLS name is the destination's, not the one the
        client's hello chose, so the upstream certificate is checked
        against the host the agent is allowed to reach."""
        if data.server.address and not is_ip_literal(normal_host(data.server.address[0])):
            data.server.sni = data.server.address[0]

    def client_disconnected(self, client: connection.Client) -> None:
        self.tasks.pop(client.id, None)

    # -- reporting ---------------------------------------------------------------

    def report(self, policy: AgentPolicy, flow: http.HTTPFlow, decision: str, **extra: str) -> None:
        task, attempt = self.tasks.get(flow.client_conn.id, ("", ""))
        up, down = flow.metadata.get("fleet.up"), flow.metadata.get("fleet.down")
        entry: dict[str, Any] = {
            "agent": policy.agent, "task": task, "attempt": attempt,
            "destination": f"{normal_host(flow.request.host)}:{flow.request.port}",
            "method": flow.request.method, "decision": decision,
            "status": flow.response.status_code if flow.response else 0,
            "bytes_out": up.bytes if isinstance(up, Counter) else 0,
            "bytes_in": down.bytes if isinstance(down, Counter) else 0,
            **extra,
        }
        payload = json.dumps(entry).encode()[:60_000]
        directory = Path(policy.decisions)
        if not policy.decisions or not directory.is_dir():
            return
        for path in directory.glob("*.sock"):
            try:
                self.sender.sendto(payload, str(path))
            except OSError:
                continue  # a consumer gone or busy: the decision was enforced all the same


addons = [Egress()]
