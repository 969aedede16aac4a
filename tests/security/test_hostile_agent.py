"""A hostile agent against fleet's own control path: the supervisor that
runs in its container, the channel, and the consumer on the host.

Each probe runs the real supervisor in a real container. Most drive it with
a ChannelForwarder in this process, so that a fixture can weaken exactly one
control — start the supervisor as before (`python3 -c` from $HOME), leave it
dumpable, let its sweep skip what it cannot read or what PID 1 adopted — and
show that the probe then finds the hole. Those about the consumer's
recovery run a real `fleet worker`."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import pytest
from docker.models.containers import Container
from support import Fleet, MakeFleet, wait_for_state

from fleet.container import spec as spec_module
from fleet.container.manager import ContainerManager
from fleet.container.spec import HOME
from fleet.errors import EngineError
from fleet.forwarding import base as base_module
from fleet.forwarding import channel as channel_module
from fleet.forwarding.base import ExitStatus, Job, supervisor_source
from fleet.forwarding.channel import ChannelForwarder
from fleet.record import ErrorKind, State

AGENT_UID = "10001"
RUN_LIMIT_S = 30.0
STUCK = ExitStatus(code=-999)  # the run did not return within RUN_LIMIT_S
# A probe's code comes in its task's payload (which is also what planted code would steal). The
# task itself runs isolated: what the agent planted for its own later tasks is its own business
# (docs/security.md); the probes are about what reaches fleet's supervisor.
RUN_CODE = "import json, sys\npayload = json.load(sys.stdin)\nexec(payload['code'])"
RUN = ["python3", "-I", "-c", RUN_CODE]

# The controls a fixture can take away, one at a time: (what, the supervisor
# source's text, its weakened replacement) or the way it is started.
WEAKENINGS: dict[str, list[tuple[str, str]]] = {
    "dumpable": [("LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)", "pass")],
    "sweep-skips-unreadable": [("            env = None", "            continue")],
    # The sweep as it was: only what the subreaper adopted, and no sweep of everything at start.
    "sweep-ignores-pid-1": [("return found | (set(info) - kept - descendants(info, hosts))",
                             "return found | ({p.pid for p in info.values()"
                             " if p.parent == os.getpid()} - kept)"),
                            ('end("", 0, {}, everything=True)', "pass")],
    "marks-keep-orphans": [("by_mark=not mains", "by_mark=True")],
    "exhaustion-ignored": [("if error.errno in EXHAUSTED:", "if False:")],
}


@dataclass
class Place:
    """One agent container and a way to open channels into it."""

    fleet: Fleet
    container: Container
    weakened: str | None
    forwarders: list[ChannelForwarder] = field(default_factory=list)

    def forwarder(self) -> ChannelForwarder:
        return ChannelForwarder(AGENT_UID, grace_s=1, keepalive_s=5)

    def run(self, forwarder: ChannelForwarder, script: str, payload: dict[str, Any] | None = None,
            task_id: str | None = None) -> tuple[ExitStatus | None, str]:
        """Run a Python script as a task (it sees `payload`); its exit
        status (None if the channel broke under it) and its output."""
        output: list[bytes] = []
        job = Job(task_id=task_id or uuid.uuid4().hex, agent="dev", attempt=1,
                  payload=json.dumps({**(payload or {}), "code": script}).encode(),
                  command=RUN, user=AGENT_UID)
        result: list[ExitStatus | None] = []

        def run() -> None:
            try:
                result.append(forwarder.run(self.container, job, lambda stream, data: output.append(data)))
            except EngineError:  # broken under it; or let go at the end of a test it hung in
                result.append(None)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(RUN_LIMIT_S)  # a weakened control may leave it hanging: that is a finding
        self.forwarders.append(forwarder)
        return (result[0] if result else STUCK), b"".join(output).decode(errors="replace")

    def alive(self, pid: str) -> bool:
        """Whether process `pid` of the container runs (a zombie does not)."""
        stat = self.read(f"/proc/{pid}/stat") if pid.isdigit() else ""
        return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"

    def read(self, path: str) -> str:
        done = self.container.exec_run(["cat", path], user=AGENT_UID)
        return done.output.decode(errors="replace") if done.exit_code == 0 else ""


@pytest.fixture
def place(make_fleet: MakeFleet, docker_client: docker.DockerClient,
          monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Place]:
    weakened: str | None = getattr(request, "param", None)
    if weakened == "started-as-before":
        monkeypatch.setattr(base_module, "SUPERVISOR_PYTHON", ("python3", "-c"))
        monkeypatch.setattr(base_module, "SUPERVISOR_CWD", HOME)
    elif weakened == "traceable-command":
        monkeypatch.setattr(spec_module, "IDLE", "/bin/sleep")
    elif weakened is not None:
        source = supervisor_source()
        for control, replacement in WEAKENINGS[weakened]:
            assert control in source, f"the control {weakened!r} is no longer where this fixture looks"
            source = source.replace(control, replacement)
        monkeypatch.setattr(channel_module, "supervisor_source", lambda: source)
    fleet = make_fleet({"dev": {}})
    container = ContainerManager(docker_client, fleet.settings).ensure("dev")
    made = Place(fleet, container, weakened)
    yield made
    for forwarder in made.forwarders:  # lets go of any run a weakened control left hanging
        for opened in forwarder.channels.values():
            opened.close()


def weakened(control: str) -> Any:
    return pytest.param(control, id=f"weakened:{control}")


# -- planted code -------------------------------------------------------------

# Modules that pass for the standard library's (so a supervisor importing
# them works on), note that they were imported, and copy every payload the
# supervisor decodes.
PLANTED = r"""
import importlib.util as _u, os as _os, sysconfig as _sc
_spec = _u.spec_from_file_location(__name__, _os.path.join(_sc.get_paths()["stdlib"], __name__ + ".py"))
_real = _u.module_from_spec(_spec)
_spec.loader.exec_module(_real)
globals().update({k: v for k, v in vars(_real).items() if not k.startswith("__")})
open("/state/pwned", "a").write("%s imported by %d\n" % (__name__, _os.getpid()))
if __name__ == "base64":
    def b64decode(data, *args, _decode=_real.b64decode, **kwargs):
        out = _decode(data, *args, **kwargs)
        open("/state/stolen", "ab").write(out + b"\n")
        return out
"""
PLANT = r"""
import os, signal
planted = payload["planted"]
for where in (os.environ["HOME"], "/tmp", "/state"):
    for name in ("base64", "subprocess", "sitecustomize", "usercustomize"):
        with open(os.path.join(where, name + ".py"), "w") as f:
            f.write(planted)
    with open(os.path.join(where, "json.py"), "w") as f:  # json is a package: this one only tells
        f.write("import os\nopen('/state/pwned', 'a').write('json imported by %d\\n' % os.getpid())\n")
print("planted", flush=True)
os.kill(os.getppid(), signal.SIGKILL)  # the supervisor: the next one starts afresh
"""
READ_PAYLOAD = "print(len(payload['secret']))"


def probe_planted_code(place: Place) -> list[str]:
    """Plant modules in $HOME, /tmp and /state, kill the supervisor; what
    the next supervisor imported, and whether the next task's payload leaked."""
    status, output = place.run(place.forwarder(), PLANT, {"planted": PLANTED})
    assert status is None, (status, output)  # its supervisor was killed under it
    assert place.read(f"{HOME}/base64.py") == PLANTED and place.read("/tmp/sitecustomize.py") == PLANTED
    secret = "payload-canary-" + uuid.uuid4().hex
    status, output = place.run(place.forwarder(), READ_PAYLOAD, {"secret": secret})
    found = [] if status is not None and status.code == 0 else [f"the next task failed: {output}"]
    if place.read("/state/pwned"):
        found.append("planted code was imported: " + place.read("/state/pwned").strip())
    if secret in place.read("/state/stolen"):
        found.append("the next task's payload was read by planted code")
    return found


def test_planted_code_is_never_imported_and_the_next_payload_stays_private(place: Place) -> None:
    assert probe_planted_code(place) == []


@pytest.mark.parametrize("place", [weakened("started-as-before")], indirect=True)
def test_weakened_planted_code_probe_finds_the_hole(place: Place) -> None:
    assert probe_planted_code(place) != []


# -- the supervisor's pipes ------------------------------------------------------

FORGE = r"""
import json, os, sys
ppid = os.getppid()
report = {}
try:
    with open(f"/proc/{ppid}/fd/1", "w") as out:
        out.write(json.dumps({"t": "exit", "id": os.environ["FLEET_TASK_ID"], "code": 0, "left": 0}) + "\n")
    report["forged"] = True
except OSError as error:
    report["forged"] = error.strerror
try:
    open(f"/proc/{ppid}/fd/0", "rb").close()
    report["stdin"] = True
except OSError as error:
    report["stdin"] = error.strerror
try:
    open(f"/proc/{ppid}/mem", "rb").read(1)
    report["mem"] = True
except OSError as error:
    report["mem"] = error.strerror
print(json.dumps(report), flush=True)
sys.exit(3)
"""


def probe_forged_frames(place: Place) -> list[str]:
    """A task writes an exit message for itself into the supervisor's
    stdout and tries its stdin and memory; what got through."""
    status, output = place.run(place.forwarder(), FORGE)
    found = []
    if status is None or status.code != 3:
        found.append(f"the task's exit status was forged: {status}")
    report = json.loads(output.splitlines()[-1]) if output.strip().startswith("{") else {}
    found += [f"the task opened the supervisor's {what}" for what in ("forged", "stdin", "mem")
              if report.get(what) is True]
    return found


def test_a_task_cannot_write_into_or_read_the_supervisors_pipes(place: Place) -> None:
    assert probe_forged_frames(place) == []


@pytest.mark.parametrize("place", [weakened("dumpable")], indirect=True)
def test_weakened_forged_frames_probe_finds_the_hole(place: Place) -> None:
    assert probe_forged_frames(place) != []


# -- daemons the sweep must end ------------------------------------------------------

DAEMON = r"""
import ctypes, os, time
tag, kill_supervisor = payload["tag"], payload["kill_supervisor"]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: its environment (and mark) unreadable
        with open(f"/tmp/{tag}", "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(1)
    os._exit(0)
while not os.path.exists(f"/tmp/{tag}"):
    time.sleep(0.01)
print("daemon started", flush=True)
if kill_supervisor:
    os.kill(os.getppid(), 9)  # its daemon is adopted by PID 1
"""


def probe_daemon(place: Place, kill_supervisor: bool) -> list[str]:
    """A task leaves a non-dumpable daemon with no mark (and, if asked,
    kills the supervisor so PID 1 adopts it); is it still running once the
    task is over (and, after a supervisor's death, once a new one started)?"""
    tag = "daemon-" + uuid.uuid4().hex[:12]
    status, _ = place.run(place.forwarder(), DAEMON, {"tag": tag, "kill_supervisor": kill_supervisor})
    found = ["its task never ended: the daemon holds its output open"] if status == STUCK else []
    if kill_supervisor:
        place.run(place.forwarder(), "pass")  # a new supervisor; its first sweep runs at its start
    pid = place.read(f"/tmp/{tag}")
    assert pid.isdigit(), pid
    return found + ([f"daemon {pid} still runs"] if place.alive(pid) else [])


def test_a_non_dumpable_daemon_is_ended_with_its_task(place: Place) -> None:
    assert probe_daemon(place, kill_supervisor=False) == []


@pytest.mark.parametrize("place", [weakened("sweep-skips-unreadable")], indirect=True)
def test_weakened_non_dumpable_daemon_probe_finds_the_hole(place: Place) -> None:
    assert probe_daemon(place, kill_supervisor=False) != []


def test_a_daemon_adopted_by_pid_1_is_ended(place: Place) -> None:
    assert probe_daemon(place, kill_supervisor=True) == []


@pytest.mark.parametrize("place", [weakened("sweep-ignores-pid-1")], indirect=True)
def test_weakened_adopted_daemon_probe_finds_the_hole(place: Place) -> None:
    assert probe_daemon(place, kill_supervisor=True) != []


# -- the container's own command, the supervisor's limits, borrowed marks ----------------------

TRACE = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
children = sorted((int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[19]), int(p))
                  for p in os.listdir("/proc") if p.isdigit()
                  and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == "1")
command = children[0][1]
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
attached = libc.ptrace(PTRACE_ATTACH, command, 0, 0) == 0
if attached:
    os.waitpid(command, 0)
    libc.ptrace(PTRACE_DETACH, command, 0, 0)
print("attached" if attached else "refused %d" % ctypes.get_errno(), flush=True)
"""


def probe_trace_command(place: Place) -> list[str]:
    """Can a task ptrace the container's own command (and so make it start
    processes that hang below it, out of every task's tree)?"""
    _, output = place.run(place.forwarder(), TRACE)
    return ["the task attached to the container's command"] if "attached" in output else []


def test_a_task_cannot_trace_the_containers_command(place: Place) -> None:
    assert probe_trace_command(place) == []


@pytest.mark.parametrize("place", [pytest.param("traceable-command", id="weakened:traceable-command")],
                         indirect=True)
def test_weakened_trace_command_probe_finds_the_hole(place: Place) -> None:
    assert probe_trace_command(place) != []


LIMIT = r"""
import os, resource
resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (9, 4096))
print("lowered", flush=True)
"""


def probe_exhausted_supervisor(place: Place) -> list[str]:
    """A task lowers its supervisor's open-file limit: does every later task
    then fail as its own failure, on a channel still trusted?"""
    forwarder = place.forwarder()
    place.run(forwarder, LIMIT)
    status, output = place.run(forwarder, "print('hello')")
    if status is not None and status.code == 127:
        return [f"a later task failed on a channel still trusted: {output.strip()}"]
    return []


def test_a_supervisor_that_cannot_start_tasks_breaks_its_channel(place: Place) -> None:
    assert probe_exhausted_supervisor(place) == []


@pytest.mark.parametrize("place", [weakened("exhaustion-ignored")], indirect=True)
def test_weakened_exhausted_supervisor_probe_finds_the_hole(place: Place) -> None:
    assert probe_exhausted_supervisor(place) != []


BORROW = r"""
import os, time
tag, other = payload["tag"], payload["other"]
while not os.path.exists(f"/tmp/{other}"):  # the other task runs
    time.sleep(0.01)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):  # it holds none of its task's pipes: the task ends at once
            os.dup2(null, fd)
        daemon = f"import os, time; open('/tmp/{tag}', 'w').write(str(os.getpid())); time.sleep(600)"
        os.execve("/usr/bin/python3", ["python3", "-c", daemon],
                  {"FLEET_TASK_ID": other})  # the mark of another, running task
    os._exit(0)
while not os.path.exists(f"/tmp/{tag}"):
    time.sleep(0.01)
"""


def probe_borrowed_mark(place: Place) -> list[str]:
    """A daemon wears the mark of another task that is still running: does
    it outlive the task that started it?"""
    forwarder = place.forwarder()
    other, tag = "other-" + uuid.uuid4().hex[:8], "borrow-" + uuid.uuid4().hex[:8]
    up = "import os, time; open('/tmp/' + os.environ['FLEET_TASK_ID'], 'w').close(); time.sleep(8)"
    running = threading.Thread(target=place.run, args=(forwarder, up), kwargs={"task_id": other},
                               daemon=True)
    running.start()
    place.run(forwarder, BORROW, {"tag": tag, "other": other})
    pid = place.read(f"/tmp/{tag}")
    assert pid.isdigit(), pid
    alive = place.alive(pid)
    running.join(RUN_LIMIT_S)
    return [f"daemon {pid} outlived its task under another task's mark"] if alive else []


def test_a_borrowed_mark_keeps_no_daemon_alive(place: Place) -> None:
    assert probe_borrowed_mark(place) == []


@pytest.mark.parametrize("place", [weakened("marks-keep-orphans")], indirect=True)
def test_weakened_borrowed_mark_probe_finds_the_hole(place: Place) -> None:
    assert probe_borrowed_mark(place) != []


# -- the consumer's recovery, with a real `fleet worker` ------------------------------


def alerts_of(fleet: Fleet, kind: str) -> list[dict[str, str]]:
    lines = fleet.cli("alerts", "--json").stdout.splitlines()
    return [alert for alert in map(json.loads, lines) if alert["kind"] == kind]


def test_planted_code_and_a_killed_supervisor_the_next_task_runs_clean(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"command": RUN, "transient_retries": 0}})
    fleet.start_worker()
    client = fleet.client()
    planted = client.wait(client.submit("dev", {"code": PLANT, "planted": PLANTED}), 60)
    assert planted.state == State.FAILED and planted.error is not None
    assert planted.error.kind == ErrorKind.CRASH  # its container was lost under it
    secret = "payload-canary-" + uuid.uuid4().hex
    check = ("import os\n"
             "print(repr(open('/state/pwned').read()) if os.path.exists('/state/pwned') else 'clean')\n"
             "stolen = open('/state/stolen').read() if os.path.exists('/state/stolen') else ''\n"
             f"print(stolen.count({secret!r}))\n")
    record = client.wait(client.submit("dev", {"code": check, "secret": secret}), 60)
    assert record.state == State.SUCCEEDED
    assert record.container != planted.container  # a new container: the old one is not trusted
    lines = "".join(e.fields.get("data", "") for e in client.store.events.output(record.id)).split()
    assert lines == ["clean", "0"]
    assert len(alerts_of(fleet, "container_condemned")) == 1


STUBBORN = r"""
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.kill(os.getppid(), signal.SIGSTOP)  # the supervisor can no longer end it
print("stubborn", flush=True)
while True:
    time.sleep(1)
"""


def test_a_task_that_stops_its_supervisor_and_ignores_its_timeout_is_ended_from_outside(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"command": ["python3", "-c", STUBBORN], "timeout_s": 2}},
                       kill_grace_s=1)
    fleet.start_worker()
    client = fleet.client()
    record = client.wait(client.submit("dev", {}), 60)
    assert record.state == State.FAILED and record.error is not None
    assert record.error.kind == ErrorKind.TIMEOUT, record.error
    [alert] = alerts_of(fleet, "container_condemned")
    assert "ran past its timeout" in alert["message"]
    after = client.wait(client.submit("dev", {}), 60)  # the next task runs in a fresh container
    assert after.container != record.container


KILL_INIT = r"""
import json, os, signal, sys, time
payload = json.load(sys.stdin)
first = os.environ["FLEET_ATTEMPT"] == "1"
if payload.get("kill_init") and first:
    os.kill(1, signal.SIGTERM)
time.sleep(payload.get("sleep", 0) if first else 0)  # the first run outlasts the kill, however slow the host
print(json.dumps({"attempt": int(os.environ["FLEET_ATTEMPT"])}))
"""


def test_sigterm_to_pid_1_crashes_the_containers_tasks_and_they_run_again(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"command": ["python3", "-c", KILL_INIT], "concurrency": 2,
                                "transient_backoff_s": 0.2}})
    fleet.start_worker()
    client = fleet.client()
    bystander = client.submit("dev", {"sleep": 60})
    wait_for_state(client, bystander, State.RUNNING)
    killer = client.submit("dev", {"kill_init": True, "sleep": 60})  # its own first run outlasts the kill too
    records = [client.wait(task_id, 90) for task_id in (bystander, killer)]
    for record in records:
        assert record.state == State.SUCCEEDED and record.result == {"attempt": 2}, record
        crashes = [e for e in client.store.events.of_task(record.id) if e.fields.get("error") == "crash"]
        assert crashes
    assert records[0].container == records[1].container  # both ran again in the new container


def test_a_hundred_megabyte_line_is_bounded_on_the_host(make_fleet: MakeFleet) -> None:
    writer = "import sys\nfor _ in range(1600):\n    sys.stdout.write('x' * 65536)\nsys.stdout.flush()\n"
    fleet = make_fleet({"dev": {"command": ["python3", "-c", writer]}}, log_limit=1024 * 1024)
    worker = fleet.start_worker()
    client = fleet.client()
    record = client.wait(client.submit("dev", {}), 180)
    assert record.state == State.SUCCEEDED
    text = "".join(e.fields.get("data", "") for e in client.store.events.output(record.id))
    assert text.endswith("[fleet: output truncated at the log limit]\n")
    assert len(text) < 1024 * 1024 + 100
    peaks = consumer_peak_rss_mib(worker.process.pid)
    assert peaks and max(peaks) < 300, peaks  # 100 MB passed through without being held


def consumer_peak_rss_mib(worker_pid: int) -> list[float]:
    """The peak RSS of each process under `fleet worker` (its consumers), in MiB."""
    from fleet.cli.bench.measure import proc_kib, process_tree

    return [proc_kib(f"/proc/{pid}/status", "VmHWM") / 1024 for pid in process_tree(worker_pid)]
