"""Where egress lives on a host, as pure data: names of the proxy container
and of each agent's network, the host-side directories the proxy reads, and
the paths it sees them at. Talks to nothing."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fleet.credentials.identity import enforced, proxy_id
from fleet.credentials.tokens import INJECTED
from fleet.settings import FleetSettings

PROXY_PORT = 3128
INSIDE = Path("/run/fleet/egress")  # in the proxy container
AGENT_CA = "/run/fleet/egress-ca.pem"  # in an agent's container: fleet's CA certificate
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # replaced by fleet's CA in an agent's container
LABEL_ROLE = "fleet.role"
ROLE_PROXY = "egress-proxy"
ROLE_NETWORK = "egress-network"


def folded(host: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", host)


@dataclass(frozen=True)
class EgressLayout:
    settings: FleetSettings

    @property
    def proxy_name(self) -> str:
        # A dot: no agent's container can be named so (agent names have none).
        return f"{self.settings.namespace}-proxy.{folded(self.settings.host)}"

    def network_name(self, agent: str) -> str:
        return f"{self.settings.namespace}-{agent}.egress.{folded(self.settings.host)}"

    @property
    def root(self) -> Path:
        """This namespace's part of `egress_dir` (two fleets on a host keep apart)."""
        return self.settings.egress_dir / self.settings.namespace

    @property
    def ca_dir(self) -> Path:
        """mitmproxy's confdir: its CA key and certificate (the proxy's alone)."""
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate agents trust (no key), world-readable."""
        return self.root / "ca-cert.pem"

    @property
    def policy_dir(self) -> Path:
        return self.root / "policies"

    @property
    def decisions_root(self) -> Path:
        return self.root / "decisions"

    def decisions_dir(self, agent: str) -> Path:
        """Where the agent's consumers listen for the proxy's decisions (a socket each)."""
        return self.decisions_root / agent

    @property
    def injected_dir(self) -> Path:
        return self.settings.secrets_dir / INJECTED

    def injected_token(self, agent: str, name: str) -> Path:
        return self.injected_dir / agent / name

    def inside(self, path: Path) -> str:
        """Where the proxy container sees a host path of this layout."""
        if path.is_relative_to(self.injected_dir):
            return str(INSIDE / "injected" / path.relative_to(self.injected_dir))
        return str(INSIDE / path.relative_to(self.root))

    @property
    def proxy_user(self) -> str:
        """uid:gid of the proxy (identity.proxy_id)."""
        uid = proxy_id(self.settings)
        return f"{uid}:{uid if enforced() else os.getgid()}"


def agent_environment(proxy_address: str, task_id: str, attempt: int) -> tuple[tuple[str, str], ...]:
    """What an agent's task is told so that unmodified tools (curl, git,
    Python, Node) go through the proxy and trust its CA. The proxy URL's
    user and password name the task and attempt: they label the proxy's
    decisions, they grant nothing (the agent is known by its network)."""
    url = f"http://{quote(task_id, safe='')}:{attempt}@{proxy_address}:{PROXY_PORT}"
    local = "localhost,127.0.0.1,::1"
    pairs = [(name, url) for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")]
    pairs += [("NO_PROXY", local), ("no_proxy", local)]
    pairs += [(name, AGENT_CA) for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                                            "GIT_SSL_CAINFO", "CURL_CA_BUNDLE")]
    return tuple(pairs)
