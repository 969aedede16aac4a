"""The released artefact, not the checkout: a wheel built from this source
tree, installed non-editable in fresh venvs.

- it carries the package data (the agent image's build context, the
  in-container supervisor, the Lua scripts, py.typed) and proper metadata;
- installed with the `host` extra, it builds the agent image from its own
  package data and runs a task end to end (`fleet worker` + `fleet submit
  --wait` from that venv);
- the publishing install (no extra) installs neither docker nor rich, and
  its `fleet` still starts.

Slow: every test here shares one wheel build and two venvs installed from the
package index (about 45 s in all on a warm pip cache, most of it pip). They
run where the rest of tests/ runs (a Docker engine, redis-server, PyPI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from support import Fleet, MakeFleet, Worker

from fleet.version import __version__

ROOT = Path(__file__).resolve().parents[2]  # the checkout (CI clones it anywhere)
AGENT_IMAGE = "fleet-agent:latest"

PACKAGE_DATA = {
    "fleet/inside/agent_image/Dockerfile",
    "fleet/inside/agent_image/fleet_agent.py",
    "fleet/inside/supervisor.py",
    "fleet/inside/recipes/claude-code/Dockerfile",
    "fleet/inside/recipes/claude-code/downloads.json",
    "fleet/inside/recipes/claude-code/fleet_claude.py",
    "fleet/inside/recipes/claude-code/fleet_git_credential.py",
    "fleet/inside/standin/forge.py",
    "fleet/inside/standin/model_api.py",
    "fleet/state/lua/apply_at_revision.lua",
    "fleet/state/lua/fenced_xadd.lua",
    "fleet/state/lua/renew_lease.lua",
    "fleet/state/lua/take_slot.lua",
    "fleet/state/lua/take_due.lua",
    "fleet/state/lua/deliver_later.lua",
    "fleet/py.typed",
}

# What the build must not see: local state that is not source. A stale
# build/ or *.egg-info in a checkout can leak files into the wheel.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".fleet", ".ci", "__pycache__", "*.pyc", "*.egg-info", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", "build", "dist", "fleet.toml",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point a child at the
    checkout or at another fleet (PYTHONPATH, the dev venv, FLEET_*)."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("FLEET_")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, after asserting it exited 0."""
    assert done.returncode == 0, (f"{' '.join(map(str, done.args))} exited {done.returncode}:\n"
                                  f"{done.stdout}\n{done.stderr}")
    return done.stdout


@dataclass
class Venv:
    root: Path
    outside: Path  # a directory outside the checkout to run its commands in

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """As if activated: its bin first on PATH."""
        return clean_env(VIRTUAL_ENV=str(self.root),
                         PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", **extra)

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run bin/<args[0]> with the rest as its arguments, from `outside`."""
        return run([self.bin / args[0], *args[1:]], cwd=self.outside, env=env or self.env(),
                   timeout=timeout)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        # -I: neither the current directory nor PYTHON* variables reach sys.path
        return self.run("python", "-I", "-c", code)


def make_venv(directory: Path) -> Venv:
    ok(run([sys.executable, "-m", "venv", directory / "venv"], cwd=directory, timeout=120))
    outside = directory / "elsewhere"
    outside.mkdir()
    return Venv(directory / "venv", outside)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built (`python -m build`, isolated) from a copy of the
    checkout's source, so the build writes nothing into the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    ok(run([sys.executable, "-m", "build", "--wheel", "--outdir", work / "dist", source],
           cwd=work, timeout=300))
    [built] = (work / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def host_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with `<wheel>[host]` installed (not editable)."""
    venv = make_venv(tmp_path_factory.mktemp("host-venv"))
    ok(venv.run("pip", "install", "-q", f"{wheel}[host]"))
    return venv


@dataclass
class PublisherVenv:
    venv: Venv
    report: dict[str, Any]  # pip's --dry-run --report of the base install


@pytest.fixture(scope="module")
def publisher(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> PublisherVenv:
    """A fresh venv with the wheel installed without extras, and what pip
    said it would install."""
    venv = make_venv(tmp_path_factory.mktemp("publisher-venv"))
    report = venv.root.parent / "report.json"
    ok(venv.run("pip", "install", "-q", "--dry-run", "--report", str(report), str(wheel)))
    ok(venv.run("pip", "install", "-q", str(wheel)))
    return PublisherVenv(venv, json.loads(report.read_text()))


def test_the_wheel_carries_package_data_and_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [dist_info] = {name.split("/")[0] for name in names if ".dist-info/" in name}
        metadata = HeaderParser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    missing = PACKAGE_DATA - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    assert sorted(n for n in names if n.startswith("fleet/state/lua/")) == sorted(
        n for n in PACKAGE_DATA if n.endswith(".lua"))
    # only the fleet package: no tests, benchmarks or byte code
    assert {name.split("/")[0] for name in names} == {"fleet", dist_info}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    assert metadata["Name"] == "agent-fleet"
    assert metadata["Version"] == __version__
    assert metadata["License"] or metadata["License-Expression"]
    assert any(n.startswith(f"{dist_info}/") and n.endswith("/LICENSE") for n in names)
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    assert "fleet = fleet.cli:main" in entry_points
    # docker and rich come only with the host extra
    requires = metadata.get_all("Requires-Dist") or []
    host_only = [Requirement(r) for r in requires if Requirement(r).name in ("docker", "rich")]
    assert len(host_only) == 2, requires
    assert all(r.marker and r.marker.evaluate({"extra": "host"}) and not r.marker.evaluate({"extra": ""})
               for r in host_only), requires


def test_the_installed_wheel_builds_the_image_and_runs_a_task(
        host_venv: Venv, make_fleet: MakeFleet) -> None:
    """Slow: a worker and a task, all from the venv's own `fleet`."""
    assert __version__ in ok(host_venv.run("fleet", "--version"))
    ok(host_venv.python(
        "import sysconfig, pathlib, fleet, fleet.container.image as image\n"
        "site = pathlib.Path(sysconfig.get_paths()['purelib']).resolve()\n"
        "assert pathlib.Path(fleet.__file__).resolve().is_relative_to(site), fleet.__file__\n"
        "assert image.CONTEXT_DIR.resolve().is_relative_to(site), image.CONTEXT_DIR\n"
        "assert (image.CONTEXT_DIR / 'Dockerfile').is_file()\n"))
    built = ok(host_venv.run("fleet", "image", "build", timeout=1800))
    # The installed build context hashes as the checkout's: the image set-up built is reused.
    assert f"image {AGENT_IMAGE} is up to date" in built, built

    fleet = make_fleet({"dev": {"image": AGENT_IMAGE, "command": ["fleet-agent"]}})
    env = host_venv.env(FLEET_CONFIG=str(fleet.config))
    worker = Worker(subprocess.Popen(
        [str(host_venv.bin / "fleet"), "worker"], cwd=host_venv.outside, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    fleet.workers.append(worker)  # the fixture's teardown stops it and removes its containers
    done = host_venv.run("fleet", "submit", "dev", "--payload", json.dumps({"echo": "from-the-wheel"}),
                         "--wait", "--timeout", "120", env=env, timeout=180)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n--- worker ---\n{''.join(worker.lines)}"
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["state"] == "succeeded", record
    assert record["agent"] == "dev"
    assert record["result"]["echo"] == "from-the-wheel", record
    assert record["result"]["task"] == record["id"]
    assert worker.stop() == 0, "".join(worker.lines)


def test_the_installed_context_hashes_are_the_checkouts(host_venv: Venv) -> None:
    """So `fleet image build` from a wheel says the checkout's images (the
    agent's and the egress proxy's) are up to date."""
    from fleet.container.image import CONTEXT_DIR, PROXY_CONTEXT_DIR, context_hash

    installed = ok(host_venv.python(
        "from fleet.container.image import CONTEXT_DIR, PROXY_CONTEXT_DIR, context_hash; "
        "print(context_hash(CONTEXT_DIR), context_hash(PROXY_CONTEXT_DIR))")).split()
    assert installed == [context_hash(CONTEXT_DIR), context_hash(PROXY_CONTEXT_DIR)]


def test_the_publishing_install_has_neither_docker_nor_rich(publisher: PublisherVenv) -> None:
    names = {item["metadata"]["name"].lower() for item in publisher.report["install"]}
    assert "agent-fleet" in names
    assert {"celery", "redis", "kombu", "click", "pydantic"} <= names, sorted(names)
    assert not names & {"docker", "rich"}, sorted(names)

    venv = publisher.venv
    ok(venv.python("import fleet\nfrom fleet import FleetClient\n"
                   "import importlib.util as u\n"
                   "assert u.find_spec('docker') is None and u.find_spec('rich') is None\n"))
    assert "Usage" in ok(venv.run("fleet", "--help"))
    assert __version__ in ok(venv.run("fleet", "--version"))


# fleet's commands in the publishing install: each either works or exits
# with one clear line ("fleet: ..."; the host ones name the `host` extra),
# never a traceback.
PUBLISHER_COMMANDS = [
    ["status", "no-such-task"], ["wait", "no-such-task", "--timeout", "1"], ["logs", "no-such-task"],
    ["cancel", "no-such-task"], ["tasks"], ["hosts"], ["alerts"], ["agents"], ["tokens", "list"],
    ["worker"], ["image", "build"], ["doctor"], ["audit"],
]


@pytest.mark.parametrize("args", PUBLISHER_COMMANDS, ids=" ".join)
def test_publisher_commands_fail_cleanly_without_docker(publisher: PublisherVenv, make_fleet: MakeFleet,
                                                        args: list[str]) -> None:
    fleet: Fleet = make_fleet({"dev": {}})
    done = publisher.venv.run("fleet", *args, env=publisher.venv.env(FLEET_CONFIG=str(fleet.config)),
                              timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode != 0:
        [line] = done.stderr.splitlines()
        assert line.startswith("fleet: "), line
