"""The channel's protocol (fleet/forwarding/channel.py `Channel`) against a
fake supervisor on a socket pair: lines of JSON to it, Docker's multiplexed
stream framing from it (8-byte header: stream, 3 zero bytes, big-endian
length), as the exec session's attach stream carries them."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

import pytest

from fleet.errors import EngineError
from fleet.forwarding.base import ChannelBroken, ExitStatus, Job
from fleet.forwarding.channel import Channel
from fleet.forwarding.protocol import MAX_LINE, LineReader, ProtocolViolation

T = TypeVar("T")
WAIT_S = 5.0  # a bound for what happens at once; only a broken behaviour waits it out
STDOUT, STDERR = 1, 2


class FakeSupervisor:
    """The container's end: reads the channel's requests, writes framed replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT_S)
        self.lines = sock.makefile("rb")

    def frame(self, data: bytes, stream: int = STDOUT) -> None:
        self.sock.sendall(struct.pack(">BxxxL", stream, len(data)) + data)

    def send(self, message: dict[str, Any]) -> None:
        self.frame(line(message))

    def request(self) -> dict[str, Any]:
        raw = self.lines.readline()
        assert raw, "the channel closed its end"
        message: dict[str, Any] = json.loads(raw)
        return message

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


class Background(Generic[T]):
    """A blocking call on a thread of its own, with its result or error."""

    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self.value = self.call()
        except BaseException as error:
            self.error = error
        finally:
            self.done.set()

    def result(self) -> T:
        assert self.done.wait(WAIT_S), "the call is still blocked"
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message) + "\n").encode()


def out(task_id: str, stream: str, data: bytes) -> dict[str, Any]:
    return {"t": "out", "id": task_id, "s": stream, "d": base64.b64encode(data).decode()}


def job(task_id: str) -> Job:
    return Job(task_id=task_id, agent="dev", attempt=1, payload=b'{"x": 1}', command=["agent", "-v"],
               user="10001")


@pytest.fixture
def ends() -> Iterator[tuple[socket.socket, FakeSupervisor]]:
    ours, theirs = socket.socketpair()
    supervisor = FakeSupervisor(theirs)
    yield ours, supervisor
    supervisor.close()
    ours.close()


@pytest.fixture
def channel(ends: tuple[socket.socket, FakeSupervisor]) -> Iterator[Channel]:
    ours, supervisor = ends
    supervisor.send({"t": "ready", "pid": 42})
    opened = Channel.over(ours, "fake")
    yield opened
    opened.close()


@pytest.fixture
def supervisor(ends: tuple[socket.socket, FakeSupervisor]) -> FakeSupervisor:
    return ends[1]


def start_run(channel: Channel, supervisor: FakeSupervisor, task_id: str,
              output: list[tuple[str, bytes]] | None = None) -> Background[ExitStatus]:
    """A run, once the supervisor has its request (so the channel waits for its reply)."""
    sink = [] if output is None else output
    run = Background(lambda: channel.run(job(task_id), lambda s, d: sink.append((s, d))))
    request = supervisor.request()
    assert (request["op"], request["id"]) == ("run", task_id)
    return run


def test_ready_gives_the_supervisor_pid(channel: Channel) -> None:
    assert channel.supervisor_pid == 42
    assert channel.usable


def test_a_supervisor_gone_before_ready_did_not_start(
        ends: tuple[socket.socket, FakeSupervisor]) -> None:
    ours, supervisor = ends
    supervisor.close()
    with pytest.raises(EngineError, match="did not start"):
        Channel.over(ours, "fake")


class FakeAPI:
    """The engine's exec calls, answering with our end of the socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.created: list[tuple[str, list[str], dict[str, Any]]] = []

    def exec_create(self, container_id: str, cmd: list[str], **options: Any) -> dict[str, str]:
        self.created.append((container_id, cmd, options))
        return {"Id": "exec-1"}

    def exec_start(self, exec_id: str, socket: bool) -> Any:
        assert (exec_id, socket) == ("exec-1", True)
        return self.sock


def test_opening_on_a_container_starts_the_supervisor_in_an_exec_session(
        ends: tuple[socket.socket, FakeSupervisor]) -> None:
    ours, supervisor = ends
    api = FakeAPI(ours)
    container = SimpleNamespace(id="c123", name="fleet-dev-h1", client=SimpleNamespace(api=api))
    supervisor.send({"t": "ready", "pid": 7})
    opened = Channel(container, "10001", grace_s=3.0, keepalive_s=20.0)  # type: ignore[arg-type]
    try:
        [(container_id, cmd, options)] = api.created
        assert container_id == "c123"
        # Isolated (-I -S) and from /: nothing the agent planted is on its path.
        assert cmd[:4] == ["python3", "-I", "-S", "-c"] and cmd[5:] == ["supervise", "3.0"]
        assert (options["user"], options["stdin"], options["workdir"]) == ("10001", True, "/")
        assert (opened.container_id, opened.name, opened.supervisor_pid) == ("c123", "fleet-dev-h1", 7)
        assert opened.keepalive_s == 20.0 and opened.usable
    finally:
        opened.close()


def test_the_run_request_carries_the_job(channel: Channel, supervisor: FakeSupervisor) -> None:
    run = Background(lambda: channel.run(job("t1"), lambda s, d: None))
    request = supervisor.request()
    assert request["op"] == "run" and request["id"] == "t1"
    assert request["argv"] == ["agent", "-v"]
    assert request["env"] == job("t1").environment
    assert base64.b64decode(request["stdin"]) == b'{"x": 1}'
    supervisor.send({"t": "exit", "id": "t1", "code": 0, "left": 0})
    assert run.result() == ExitStatus(code=0)


def test_output_split_across_frames_arrives_intact_and_in_order(
        channel: Channel, supervisor: FakeSupervisor) -> None:
    output: list[tuple[str, bytes]] = []
    run = start_run(channel, supervisor, "t1", output)
    first = line(out("t1", "stdout", b"hello "))
    supervisor.frame(first[:10])  # one line in two frames
    supervisor.frame(first[10:])
    supervisor.frame(line(out("t1", "stderr", b"warn\n")) + line(out("t1", "stdout", b"world")))  # two in one
    supervisor.frame(b"supervisor chatter\n", stream=STDERR)  # logged, not parsed
    supervisor.send({"t": "exit", "id": "t1", "code": 3, "left": 2})
    assert run.result() == ExitStatus(code=3, leftovers=2)
    assert output == [("stdout", b"hello "), ("stderr", b"warn\n"), ("stdout", b"world")]


def test_the_exit_reply_gives_code_and_leftovers(channel: Channel, supervisor: FakeSupervisor) -> None:
    first = start_run(channel, supervisor, "t1")
    second = start_run(channel, supervisor, "t2")
    supervisor.send({"t": "exit", "id": "t2", "code": 137, "left": 0})
    supervisor.send({"t": "exit", "id": "t1", "code": 1, "left": 4})
    assert second.result() == ExitStatus(code=137, leftovers=0)
    assert first.result() == ExitStatus(code=1, leftovers=4)
    assert channel.usable


@pytest.mark.parametrize("message", [
    {"t": "alive"},  # unsolicited: liveness is an answer to a ping now
    {"t": "from-a-newer-supervisor", "id": "t1", "code": 9},
    {"t": "exit", "id": "t1", "code": "0", "left": 0},
    {"t": "exit", "id": "t1", "code": True, "left": 0},
    {"t": "exit", "id": "t1", "code": 0},
    {"t": "out", "id": "t1", "s": "stdin", "d": ""},
    {"t": "out", "id": "t1", "s": "stdout", "d": "not base64!"},
    {"t": "pong", "nonce": "never-sent"},
    {"t": "ready", "pid": 43},  # a second one
    ["t", "exit"],
])
def test_a_message_outside_the_protocol_breaks_the_channel(
        channel: Channel, supervisor: FakeSupervisor, message: Any) -> None:
    run = start_run(channel, supervisor, "t1")
    supervisor.frame((json.dumps(message) + "\n").encode())
    with pytest.raises(ChannelBroken, match="protocol violation"):
        run.result()
    assert not channel.usable and channel.broken is not None


def test_a_malformed_line_ends_the_channel_and_fails_every_waiting_run(
        channel: Channel, supervisor: FakeSupervisor) -> None:
    first = start_run(channel, supervisor, "t1")
    second = start_run(channel, supervisor, "t2")
    supervisor.frame(b"this is not json\n")
    for run in (first, second):
        with pytest.raises(ChannelBroken, match="protocol violation: not JSON"):
            run.result()
    assert not channel.alive and not channel.usable
    with pytest.raises(ChannelBroken):
        channel.run(job("t3"), lambda s, d: None)


def test_a_line_without_end_is_refused_at_the_cap(channel: Channel, supervisor: FakeSupervisor) -> None:
    run = start_run(channel, supervisor, "t1")
    chunk = b"x" * 65536
    with contextlib.suppress(OSError):  # the channel hangs up once over the cap
        for _ in range(MAX_LINE // len(chunk) + 2):
            supervisor.frame(chunk)
    with pytest.raises(ChannelBroken, match="longer than"):
        run.result()


def test_the_supervisor_closing_fails_waiting_runs(channel: Channel, supervisor: FakeSupervisor) -> None:
    run = start_run(channel, supervisor, "t1")
    supervisor.close()
    with pytest.raises(ChannelBroken, match="during task t1: the supervisor's stream ended"):
        run.result()
    assert not channel.usable


def test_fleet_letting_go_is_not_a_breakage(channel: Channel, supervisor: FakeSupervisor) -> None:
    run = start_run(channel, supervisor, "t1")
    channel.close()
    with pytest.raises(EngineError) as raised:
        run.result()
    assert not isinstance(raised.value, ChannelBroken) and channel.broken is None


def test_pings_are_answered_by_nonce_and_silence_breaks_the_channel(
        ends: tuple[socket.socket, FakeSupervisor]) -> None:
    ours, supervisor = ends
    supervisor.send({"t": "ready", "pid": 42})
    opened = Channel.over(ours, "fake", keepalive_s=0.05)
    try:
        for _ in range(3):
            ping = supervisor.request()
            assert ping["op"] == "ping" and len(ping["nonce"]) >= 16
            supervisor.send({"t": "pong", "nonce": ping["nonce"]})
        assert opened.usable
        # Now it stops answering (hung, or stopped by a task): given up after three pings.
        deadline = time.monotonic() + WAIT_S
        while opened.usable and time.monotonic() < deadline:
            time.sleep(0.01)  # a poll with a bound: the pings themselves are the clock here
        assert opened.broken is not None and "answered none" in opened.broken
    finally:
        opened.close()


def test_supervisor_stderr_is_masked_cut_short_and_rate_limited(
        ends: tuple[socket.socket, FakeSupervisor], caplog: pytest.LogCaptureFixture) -> None:
    ours, supervisor = ends
    supervisor.send({"t": "ready", "pid": 42})
    opened = Channel.over(ours, "fake", mask=lambda text: text.replace("s3cret", "[masked]"))
    try:
        run = start_run(opened, supervisor, "t1")
        supervisor.frame(("leaked s3cret " + "y" * 5000 + "\n").encode(), stream=STDERR)
        supervisor.frame(b"".join(b"line %d\n" % n for n in range(100)), stream=STDERR)
        supervisor.send({"t": "exit", "id": "t1", "code": 0, "left": 0})
        run.result()
    finally:
        opened.close()
    logged = [r.getMessage() for r in caplog.records if "supervisor in fake" in r.getMessage()]
    assert "s3cret" not in "".join(logged) and "[masked]" in logged[0]
    assert max(len(m) for m in logged) < 600
    assert len(logged) <= 20


def test_the_line_reader_splits_across_chunks_and_scans_each_byte_once() -> None:
    reader = LineReader(limit=100)
    assert reader.feed(b"ab") == []
    assert reader.feed(b"c\nde\nf") == [b"abc", b"de"]
    assert reader.feed(b"\n") == [b"f"]
    with pytest.raises(ProtocolViolation):
        reader.feed(b"z" * 101)


def test_kill_gets_its_reply_by_ref(channel: Channel, supervisor: FakeSupervisor) -> None:
    run = start_run(channel, supervisor, "t1")
    kill = Background(lambda: channel.kill(job("t1"), 2.0, ["t1", "t9"]))
    request = supervisor.request()
    assert (request["op"], request["id"], request["grace"], request["spare"]) == \
        ("kill", "t1", 2.0, ["t1", "t9"])
    supervisor.send({"t": "killed", "ref": request["ref"] + "-other", "n": 99})  # not its reply
    supervisor.send({"t": "killed", "ref": request["ref"], "n": 3})
    assert kill.result() == 3
    assert not run.done.is_set()  # the kill's reply is not the run's
    supervisor.send({"t": "exit", "id": "t1", "code": -15, "left": 0})
    assert run.result() == ExitStatus(code=-15)


def test_opening_a_channel_does_not_hold_up_looking_at_the_others(
        ends: tuple[socket.socket, FakeSupervisor]) -> None:
    from fleet.forwarding.channel import ChannelForwarder

    ours, supervisor = ends
    api = FakeAPI(ours)
    slow = SimpleNamespace(id="c-slow", name="slow", client=SimpleNamespace(api=api))
    other = SimpleNamespace(id="c-other", name="other")
    forwarder = ChannelForwarder("10001", grace_s=1)
    opening = Background(lambda: forwarder.channel(slow))  # type: ignore[arg-type]
    deadline = time.monotonic() + WAIT_S
    while not api.created and time.monotonic() < deadline:  # its exec session is being made
        time.sleep(0.001)
    assert api.created
    looked = Background(lambda: forwarder.connected(other))  # type: ignore[arg-type]
    assert looked.result() is False  # at once, while the other container's supervisor is still starting
    assert not opening.done.is_set()
    supervisor.send({"t": "ready", "pid": 9})
    assert opening.result().supervisor_pid == 9
    opening.result().close()
