"""fleet's egress addon for mitmproxy: runs in the proxy container.

For each connection it finds the agent by the network the client is on
(each agent has an internal network of its own, shared only with this
proxy), refuses a destination the agent's `egress` does not list with HTTP
403, overwrites the configured header from the host-side token on requests
to an injected host (over TLS only), streams every body through unbuffered,
and reports each decision (agent, task, destination, allowed or refused,
bytes) as one datagram to the agent's consumers on the host.

It fails closed: a hook that raises refuses its flow, and every connection
to an upstream is checked once more where it is opened (`server_connect`),
whatever the request hooks decided."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from collections import Counter as Tally
from collections.abc import Callable
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
# Open client connections one agent may hold: no agent can use up the proxy's descriptors for the others.
MAX_CONNECTIONS_PER_AGENT = 512
NOT_AN_AGENT = "this proxy serves only fleet's agents"

log = logging.getLogger("fleet-egress")
FlowHook = Callable[["Egress", http.HTTPFlow], None]


def fail_closed(hook: FlowHook) -> FlowHook:
    """A hook that raises refuses its flow (mitmproxy would log the error
    and let the flow go on as if the hook had not been there)."""

    @functools.wraps(hook)
    def guarded(self: Egress, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as error:  # fail closed, whatever went wrong
            log.warning("egress hook %s failed (%s): refusing the flow", hook.__name__, type(error).__name__)
            flow.response = http.Response.make(403, b"fleet egress: refused (the proxy could not decide)\n",
                                               {REFUSED_HEADER: "refused"})

    return guarded


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
        self.open: Tally[str] = Tally()  # agent → open client connections
        self.agent_of: dict[str, str] = {}  # client connection id → agent
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)

    def policy(self, client: connection.Client) -> AgentPolicy | None:
        return self.policies.of_client(client.peername[0]) if client.peername else None

    def refuse(self, flow: http.HTTPFlow, policy: AgentPolicy | None, reason: str) -> None:
        flow.response = http.Response.make(
            403, f"fleet egress: {reason}\n".encode(),
            {"Content-Type": "text/plain; charset=utf-8", REFUSED_HEADER: "refused"})
        if policy is not None:
            self.report(policy, flow, "refused", reason=reason)

    # -- connections -------------------------------------------------------------

    def running(self) -> None:
        """Listening: the host waits for this line before it lets an agent run."""
        print(READY_LINE, flush=True)

    def client_connected(self, client: connection.Client) -> None:
        policy = self.policy(client)
        if policy is None:
            client.error = NOT_AN_AGENT
            return
        if self.open[policy.agent] >= MAX_CONNECTIONS_PER_AGENT:
            client.error = f"agent {policy.agent!r} has {MAX_CONNECTIONS_PER_AGENT} connections open already"
            return
        self.open[policy.agent] += 1
        self.agent_of[client.id] = policy.agent

    def client_disconnected(self, client: connection.Client) -> None:
        self.tasks.pop(client.id, None)
        agent = self.agent_of.pop(client.id, None)
        if agent is not None:
            self.open[agent] -= 1

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Every connection to an upstream, checked where it is opened: the
        destination must be the client's agent's to reach, whatever path led
        here. Its TLS name is the destination's, not the one the client's
        hello chose, so the upstream certificate is checked against it."""
        try:
            policy = self.policy(data.client)
            address = data.server.address
            reason = NOT_AN_AGENT if policy is None else (
                "no destination" if not address else policy.refusal(address[0], address[1]))
            if reason is None and address and not is_ip_literal(normal_host(address[0])):
                data.server.sni = address[0]
        except Exception as error:
            reason = f"the proxy could not decide ({type(error).__name__})"
        if reason:
            data.server.error = f"fleet egress: {reason}"

    # -- requests ----------------------------------------------------------------

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        """The CONNECT target is the destination: decided here, before any
        connection to it is opened."""
        policy = self.policy(flow.client_conn)
        if policy is None:
            self.refuse(flow, None, NOT_AN_AGENT)
            return
        reason = policy.refusal(flow.request.host, flow.request.port)
        self.tasks[flow.client_conn.id] = task_of(flow.request.headers.get("Proxy-Authorization", ""))
        if reason:
            self.refuse(flow, policy, reason)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Every request, tunnelled or plain, is checked against the address
        the proxy will connect to (`request.host`: the CONNECT target inside
        a tunnel, the URL's host otherwise); every name it carries for its
        host (the request target's authority, each Host header) must be that."""
        policy = self.policy(flow.client_conn)
        if policy is None:
            self.refuse(flow, None, NOT_AN_AGENT)
            return
        request = flow.request
        reason = policy.refusal(request.host, request.port)
        if reason is None:
            names = [request.authority, *request.headers.get_all("Host")]
            stray = [n for n in names if n and authority_host(n) != normal_host(request.host)]
            if stray:
                reason = (f"agent {policy.agent!r} named {stray[0]!r} in a request to {request.host}:"
                          f"{request.port}: a request may name only its destination")
        if "Proxy-Authorization" in request.headers:  # a plain HTTP request carries it itself
            self.tasks[flow.client_conn.id] = task_of(request.headers["Proxy-Authorization"])
            del request.headers["Proxy-Authorization"]
        if reason:
            self.refuse(flow, policy, reason)
            return
        injection = policy.injection(request.host)
        if injection is not None:
            # Always removed, never passed through: the agent's own value (its placeholder,
            # or a credential of its own choosing) never reaches the host. Set over TLS only.
            request.headers.pop(injection.header, None)
            token = read_token(injection.token_file) if request.scheme == "https" else None
            if token:
                request.headers[injection.header] = injection.render(token)
        flow.metadata["fleet.up"] = request.stream = Counter()

    @fail_closed
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

    # -- reporting ---------------------------------------------------------------

    def report(self, policy: AgentPolicy, flow: http.HTTPFlow, decision: str, **extra: str) -> None:
        """One datagram to each of the agent's consumers; a decision that
        cannot be told is enforced all the same."""
        try:
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
            sockets = list(directory.glob("*.sock")) if policy.decisions and directory.is_dir() else []
        except Exception as error:
            log.warning("an egress decision could not be reported (%s)", type(error).__name__)
            return
        for path in sockets:
            try:
                self.sender.sendto(payload, str(path))
            except OSError:
                continue  # a consumer gone or busy


addons = [Egress()]
