"""The child processes of `fleet worker` (one consumer per agent, the
heartbeat and, when asked for, the on_done deliverer and the health probe), forked
from a parent that has imported what they need, and restarted with backoff
when one dies."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.process import BaseProcess

from fleet.settings import FleetSettings
from fleet.worker.consumer import serve_agent

log = logging.getLogger("fleet.worker")

RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
STABLE_AFTER_S = 60.0  # a consumer up this long before it died restarts without backoff


def end_with_parent(parent: int) -> None:
    """A consumer whose `fleet worker` died (SIGKILL, OOM) gets SIGTERM — a
    warm shutdown that hands its tasks back — rather than run on unseen: its
    host no longer beats, so it is shown lost and its tasks are taken over."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before we asked (we were re-parented)
        os.kill(os.getpid(), signal.SIGTERM)


class Children:
    """The consumer processes of this host and its heartbeat, restarted when
    one dies.

    Each is forked from this process, which has imported everything a
    consumer needs: a consumer starts in a fraction of the CPU a fresh
    interpreter would take, and shares those pages with its siblings."""

    def __init__(self, settings: FleetSettings, agents: list[str],
                 others: dict[str, Callable[[], int | None]]) -> None:
        """`others`: the children that are not consumers (the heartbeat, the
        on_done deliverer, the health probe), by name (no agent's name has a colon)."""
        self.settings = settings
        self.others = others
        self.agents = [*agents, *others]
        self.processes: dict[str, BaseProcess] = {}
        self.restarts: dict[str, int] = dict.fromkeys(self.agents, 0)
        self.started_at: dict[str, float] = {}
        self.stopping = False
        self.wake = threading.Event()  # set when told to stop

    def start(self, agent: str) -> None:
        # A SIGTERM between the fork and the bookkeeping would miss the new
        # child: hold the signals back until it is on the books.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            body = self.others.get(agent) or partial(serve_agent, self.settings, agent)
            process = multiprocessing.get_context("fork").Process(
                target=run_child, args=(body, os.getpid(), previous), name=f"fleet-{agent}")
            process.start()
            self.processes[agent] = process
            self.started_at[agent] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def signal(self, signum: int) -> None:
        for child in self.processes.values():
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signum)

    def supervise(self) -> int:
        for agent in self.agents:
            self.start(agent)
        while True:
            for agent, child in list(self.processes.items()):
                if child.is_alive():
                    continue
                if self.stopping:
                    self.processes.pop(agent)
                    continue
                if time.monotonic() - self.started_at[agent] > STABLE_AFTER_S:
                    self.restarts[agent] = 0  # it had been running fine: a fresh failure
                delay = RESTART_BACKOFF_S[min(self.restarts[agent], len(RESTART_BACKOFF_S) - 1)]
                self.restarts[agent] += 1
                log.error("consumer of %s exited with %s; restarting it in %d s", agent,
                          child.exitcode, delay)
                self.wake.wait(delay)  # a stop cuts the wait short
                if self.stopping:
                    self.processes.pop(agent)
                    continue
                self.start(agent)
            if not self.processes:
                return 0
            time.sleep(0.2)


def run_child(body: Callable[[], int | None], parent: int, mask: set[signal.Signals]) -> None:
    """A forked child of `fleet worker`: a consumer or the heartbeat."""
    # Its own session: a Ctrl-C reaches it once, through the parent. The
    # parent's signal handlers are not its own; Celery installs its own.
    os.setsid()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    end_with_parent(parent)
    sys.exit(body())
