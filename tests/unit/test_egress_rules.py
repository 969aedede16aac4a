"""The egress proxy's rules (fleet/inside/proxy_image/egress_rules.py, run
in the proxy's container; standard library only, imported here by path)
and the egress settings that feed them."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import ValidationError

from fleet.settings import AgentSpec, FleetSettings

RULES_FILE = Path(__file__).resolve().parents[2] / "fleet" / "inside" / "proxy_image" / "egress_rules.py"


def load_rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("egress_rules", RULES_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["egress_rules"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rules = load_rules()


def policy(allow: list[str], **extra: object) -> Any:
    return rules.AgentPolicy.from_json({"agent": "dev", "networks": ["172.30.0.0/16"], "allow": allow,
                                        **extra})


def agent_spec(**fields: object) -> AgentSpec:
    return FleetSettings(agents={"dev": fields}).agents["dev"]


@pytest.mark.parametrize(("host", "port", "allowed"), [
    ("forge.example.com", 443, True),
    ("FORGE.example.com.", 443, True),  # case and a trailing dot do not matter
    ("forge.example.com", 80, False),  # another port is another destination
    ("evil.forge.example.com", 443, False),
    ("forge.example.com.evil.net", 443, False),
    ("api.models.example.org", 443, True),  # *.models.example.org
    ("deep.api.models.example.org", 443, True),
    ("models.example.org", 443, False),  # a wildcard does not cover its own domain
    ("xmodels.example.org", 443, False),
    ("10.1.2.3", 8443, True),
    ("167838211", 8443, False),  # 10.1.2.3 spelt as a number is not the address the list names
    ("[::1]", 443, False),
])
def test_a_destination_is_allowed_only_as_listed(host: str, port: int, allowed: bool) -> None:
    rule = policy(["forge.example.com:443", "*.models.example.org:443", "10.1.2.3:8443"])
    assert (rule.refusal(host, port) is None) is allowed


def test_a_refusal_names_the_agent_and_the_destination() -> None:
    refusal = policy(["forge.example.com:443"]).refusal("evil.test", 443)
    assert refusal == "agent 'dev' may not reach evil.test:443 (not in agents.dev.egress)"


def test_a_wildcard_never_covers_an_address() -> None:
    assert rules.Destination("*.0.0.1", 443).allows("127.0.0.1", 443) is False


def test_the_injection_is_found_by_the_destination_and_rendered_from_the_token() -> None:
    rule = policy(["forge.example.com:443"], inject=[{"host": "forge.example.com", "header": "Authorization",
                                                      "value": "token {token}", "token_file": "/x"}])
    injection = rule.injection("Forge.Example.com")
    assert injection.render(b"s3cret\n") == "token s3cret"
    assert rule.injection("other.example.com") is None


@pytest.mark.parametrize(("header", "expected"), [
    ("Basic " + base64.b64encode(b"task123:2").decode(), ("task123", "2")),
    ("Bearer abc", ("", "")),
    ("Basic !!!", ("", "")),
    ("Basic \xe9", ("", "")),  # not ASCII: once this failed open (an uncaught ValueError)
    ("Basic " + base64.b64encode(b"\xff\xfe:1").decode(), ("", "")),
    ("", ("", "")),
])
def test_the_task_is_read_from_the_proxy_authorization(header: str, expected: tuple[str, str]) -> None:
    assert rules.task_of(header) == expected


@pytest.mark.parametrize(("authority", "host"), [
    ("forge.test", "forge.test"), ("forge.test:443", "forge.test"), ("[::1]:443", "::1"), ("::1", "::1"),
    ("FORGE.test.", "forge.test")])
def test_the_host_of_a_host_header(authority: str, host: str) -> None:
    assert rules.authority_host(authority) == host


def test_policies_are_found_by_the_client_network_and_reloaded_when_the_directory_changes(
        tmp_path: Path) -> None:
    policies = rules.Policies(tmp_path)
    assert policies.of_client("172.30.0.5") is None
    (tmp_path / "dev.json").write_text(json.dumps({"agent": "dev", "networks": ["172.30.0.0/16"],
                                                  "allow": ["forge.test:443"]}))
    (tmp_path / "broken.json").write_text("{not json")  # grants nothing, breaks nothing
    assert policies.of_client("172.30.0.5").agent == "dev"
    assert policies.of_client("::ffff:172.30.0.5").agent == "dev"
    assert policies.of_client("172.31.0.5") is None
    assert policies.of_client("not an address") is None


def test_read_token_follows_no_link_and_reads_only_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"value")
    (tmp_path / "link").symlink_to(tmp_path / "token")
    assert rules.read_token(str(tmp_path / "token")) == b"value"
    assert rules.read_token(str(tmp_path / "link")) is None
    assert rules.read_token(str(tmp_path)) is None
    assert rules.read_token(str(tmp_path / "missing")) is None


def test_egress_entries_are_written_in_the_proxy_s_canonical_form() -> None:
    spec = agent_spec(egress=["Forge.Example.com", "*.example.org:8443", "[::1]:80", "10.0.0.1",
                              "forge.example.com:443"])
    assert spec.egress == ["forge.example.com:443", "*.example.org:8443", "[::1]:80", "10.0.0.1:443"]


@pytest.mark.parametrize(("fields", "message"), [
    ({"egress": ["*.com"]}, "too wide"),
    ({"egress": ["a b"]}, "is not a host name"),
    ({"egress": ["x.test:99999"]}, "out of range"),
    ({"egress": ["x.test:https"]}, "is not a port"),
    ({"egress": ["x.test"], "network": "mynet"}, "egress and network are exclusive"),
    ({"tokens": ["f"], "egress": ["a.test"], "inject": {"f": {"host": "b.test"}}}, "is not in egress"),
    ({"egress": ["a.test"], "inject": {"f": {"host": "a.test"}}}, "is not in tokens"),
    ({"tokens": ["f"], "egress": ["a.test"], "inject": {"f": {"host": "a.test", "value": "no placeholder"}}},
     "must contain {token}"),
    ({"tokens": ["f"], "egress": ["a.test"], "inject": {"f": {"host": "a.test", "header": "Host"}}},
     "cannot be an injected header"),
])
def test_bad_egress_settings_are_refused_with_the_key(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        agent_spec(**fields)


def test_an_injection_under_a_wildcard_is_accepted() -> None:
    spec = agent_spec(tokens=["f"], egress=["*.example.com"], inject={"f": {"host": "git.example.com"}})
    assert spec.inject["f"].host == "git.example.com"


def test_egress_hosts_must_map_names_to_addresses() -> None:
    assert FleetSettings(egress_hosts={"Forge.Test": "10.1.2.3"}).egress_hosts == {"forge.test": "10.1.2.3"}
    with pytest.raises(ValidationError, match="give a host name and an IP address"):
        FleetSettings(egress_hosts={"forge.test": "not-an-address"})
