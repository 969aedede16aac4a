"""One identity per agent on a host (credentials/identity.py): distinct,
kept for as long as the agent's token directory exists, a shared one
resolved in favour of the first by name; directories and files owned as
the policy says; a loose secrets_dir tightened. Runs as root (as CI does)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fleet.credentials.identity import AgentIdentities
from fleet.credentials.tokens import PLACEHOLDER, TokenStore
from fleet.settings import AgentSpec, FleetSettings

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="identities need root (CI runs as root)")


def settings(tmp_path: Path, *agents: str) -> FleetSettings:
    return FleetSettings(secrets_dir=tmp_path / "secrets",
                         agents={a: AgentSpec(tokens=["forge"]) for a in agents})


def test_each_agent_gets_its_own_uid_and_keeps_it(tmp_path: Path) -> None:
    s = settings(tmp_path, "boss", "dev", "reviewer")
    ids = AgentIdentities(s)
    first = {agent: ids.uid(agent) for agent in ("dev", "boss", "reviewer")}
    assert len(set(first.values())) == 3 and all(10001 <= u < 11001 for u in first.values())
    again = AgentIdentities(s)
    assert {agent: again.uid(agent) for agent in ("reviewer", "boss", "dev")} == first
    assert {agent: again.current(agent) for agent in first} == first


def test_directories_and_files_are_roots_and_the_agents_group_reads(tmp_path: Path) -> None:
    s = settings(tmp_path, "dev")
    info = TokenStore(s).set("dev", "forge", b"value")
    assert info.fingerprint.startswith("sha256:")
    directory, token = s.secrets_dir / "dev", s.secrets_dir / "dev" / "forge"
    uid = AgentIdentities(s).uid("dev")
    assert (directory.stat().st_uid, directory.stat().st_gid) == (0, uid)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    assert (token.stat().st_uid, token.stat().st_gid, stat.S_IMODE(token.stat().st_mode)) == (0, uid, 0o440)
    assert stat.S_IMODE(s.secrets_dir.stat().st_mode) == 0o700


def test_a_shared_uid_stays_with_the_first_by_name_the_other_moves(tmp_path: Path) -> None:
    s = settings(tmp_path, "alpha", "beta")
    for agent in ("alpha", "beta"):  # as fleet before 0.3 left them: one uid for all, 0700/0600
        directory = s.secrets_dir / agent
        directory.mkdir(parents=True, mode=0o700)
        (directory / "forge").write_text("x")
        os.chown(directory, 10001, 10001)
        os.chown(directory / "forge", 10001, 10001)
    ids = AgentIdentities(s)
    assert ids.uid("beta") != 10001  # alpha sorts first: it keeps 10001
    assert ids.uid("alpha") == 10001
    moved = s.secrets_dir / "beta" / "forge"
    assert (moved.stat().st_uid, moved.stat().st_gid) == (0, ids.uid("beta"))


def test_a_loose_secrets_dir_is_tightened(tmp_path: Path) -> None:
    s = settings(tmp_path, "dev")
    s.secrets_dir.mkdir(mode=0o755)
    s.secrets_dir.chmod(0o755)
    AgentIdentities(s).uid("dev")
    assert stat.S_IMODE(s.secrets_dir.stat().st_mode) == 0o700


def test_a_file_where_the_directory_goes_is_refused(tmp_path: Path) -> None:
    from fleet.errors import FleetError

    s = settings(tmp_path, "dev")
    s.secrets_dir.mkdir(mode=0o700)
    (s.secrets_dir / "dev").write_text("not a directory")
    with pytest.raises(FleetError, match="not a directory"):
        AgentIdentities(s).uid("dev")


def test_reading_a_token_never_follows_a_link_or_waits_on_a_fifo(tmp_path: Path) -> None:
    s = settings(tmp_path, "dev")
    store = TokenStore(s)
    store.prepare("dev")
    outside = tmp_path / "outside"
    outside.write_text("not yours")
    (s.secrets_dir / "dev" / "forge").symlink_to(outside)
    assert store.read("dev", "forge") is None
    (s.secrets_dir / "dev" / "forge").unlink()
    os.mkfifo(s.secrets_dir / "dev" / "forge")
    assert store.read("dev", "forge") is None  # returns at once: O_NONBLOCK, not a regular file
    (s.secrets_dir / "dev" / "forge").unlink()
    (s.secrets_dir / "dev" / "forge").write_bytes(b"x" * (64 * 1024 + 1))
    assert store.read("dev", "forge") is None  # over the size cap


def injecting(tmp_path: Path) -> FleetSettings:
    return FleetSettings(secrets_dir=tmp_path / "secrets", agents={"dev": AgentSpec(
        tokens=["forge", "other"], egress=["forge.test"], inject={"forge": {"host": "forge.test"}})})


def test_an_injected_token_lives_where_only_the_proxy_reads_and_the_agent_sees_a_placeholder(
        tmp_path: Path) -> None:
    s = injecting(tmp_path)
    store = TokenStore(s)
    store.set("dev", "forge", b"real-value")
    real = s.secrets_dir / ".injected" / "dev" / "forge"
    proxy_gid = s.agent_uid + 1000
    assert real.read_bytes() == b"real-value"
    info = real.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, proxy_gid, 0o440)
    assert (real.parent.stat().st_gid, stat.S_IMODE(real.parent.stat().st_mode)) == (proxy_gid, 0o750)
    assert (s.secrets_dir / "dev" / "forge").read_bytes() == PLACEHOLDER
    assert store.read("dev", "forge") == b"real-value"  # masking and fingerprints use the real one
    assert store.path("dev", "other") == s.secrets_dir / "dev" / "other"  # a mounted token stays put
    assert AgentIdentities(s).uid("dev") != proxy_gid  # the proxy's group is no agent's


def test_a_real_value_left_in_the_agents_directory_is_moved_out_not_lost(tmp_path: Path) -> None:
    s = injecting(tmp_path)
    before = FleetSettings(secrets_dir=s.secrets_dir, agents={"dev": AgentSpec(tokens=["forge"])})
    TokenStore(before).set("dev", "forge", b"was-mounted")  # the config injected it only later
    TokenStore(s).place_placeholders("dev")
    assert (s.secrets_dir / "dev" / "forge").read_bytes() == PLACEHOLDER
    assert TokenStore(s).read("dev", "forge") == b"was-mounted"
