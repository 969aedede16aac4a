"""`fleet doctor` against the real engine and Redis, and with each one broken."""

from __future__ import annotations

import re
import subprocess

from support import FLEET, Fleet, MakeFleet, free_port


def doctor(fleet: Fleet, **env: str) -> tuple[int, str]:
    fleet.settings.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = subprocess.run([FLEET, "doctor"], env={**fleet.env, **env}, capture_output=True,
                          text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


def line(output: str, check: str) -> str:
    match = re.search(rf"^(ok  |FAIL)  {check} .*$", output, re.M)
    assert match, output
    return match.group(0)


def test_all_checks_pass(make_fleet: MakeFleet) -> None:
    code, out = doctor(make_fleet({"dev": {}}))
    assert code == 0, out
    for check in ("engine", "redis", "image", "secrets"):
        assert line(out, check).startswith("ok")


def test_engine_down(make_fleet: MakeFleet, tmp_path) -> None:
    code, out = doctor(make_fleet({"dev": {}}), DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    assert code == 1
    assert line(out, "engine").startswith("FAIL")
    assert "fix: start the engine" in out
    assert line(out, "redis").startswith("ok")


def test_redis_down(make_fleet: MakeFleet) -> None:
    code, out = doctor(make_fleet({"dev": {}}, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert code == 1
    assert line(out, "redis").startswith("FAIL")
    assert "fix: start redis-server" in out
    assert line(out, "engine").startswith("ok")


def test_image_missing(make_fleet: MakeFleet) -> None:
    code, out = doctor(make_fleet({"dev": {"image": "fleet-missing:none"}}))
    assert code == 1
    assert "FAIL  image    fleet-missing:none is missing" in out
    assert "fix: run `fleet image build`" in out


def test_secrets_readable_by_others(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}})
    fleet.settings.secrets_dir.mkdir(parents=True)
    fleet.settings.secrets_dir.chmod(0o755)
    code, out = doctor(fleet)
    assert code == 1
    assert line(out, "secrets").startswith("FAIL")
    assert "fix: chmod -R go-rwx" in out
