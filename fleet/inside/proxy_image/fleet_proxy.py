"""The proxy container's entry point: mitmdump with fleet's addon.

Upstreams are checked against the public CAs (certifi's bundle, which
mitmproxy ships with) plus the host's `egress_ca_file` if one is mounted;
mitmproxy's option takes one file, so the two are joined first, in /tmp."""

from __future__ import annotations

import sys
from pathlib import Path

import certifi
from mitmproxy.tools.main import mitmdump

RUN = Path("/run/fleet/egress")
EXTRA_CA = RUN / "upstream-ca.pem"
BUNDLE = Path("/tmp/upstream-ca.pem")
LISTEN_PORT = 3128


def main() -> None:
    bundle = Path(certifi.where()).read_bytes()
    if EXTRA_CA.is_file():
        bundle += b"\n" + EXTRA_CA.read_bytes()
    BUNDLE.write_bytes(bundle)
    mitmdump([
        "--mode", f"regular@{LISTEN_PORT}",
        "--set", f"confdir={RUN / 'ca'}",
        "--set", f"ssl_verify_upstream_trusted_ca={BUNDLE}",
        "--set", "termlog_verbosity=warn",
        "--set", "flow_detail=0",
        "--set", "block_global=false",  # the agents' networks are private; who may come is the addon's call
        "-s", str(Path(__file__).with_name("fleet_egress.py")),
        *sys.argv[1:],
    ])


if __name__ == "__main__":
    main()
