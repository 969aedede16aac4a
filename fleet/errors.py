"""One error tree for fleet. Docker and Redis exceptions are translated into
these at the boundary so the CLI can print one line and pick an exit code."""


class FleetError(Exception):
    """Base of every error fleet raises on purpose."""

    exit_code = 1


class UsageError(FleetError):
    """Bad input from the user: a flag, a payload, a name. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration file or an FLEET_* variable is invalid."""


class UnknownAgent(UsageError):
    def __init__(self, agent: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none configured"
        super().__init__(f"unknown agent {agent!r} (configured: {listed})")


class TaskNotFound(UsageError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task {task_id!r}")


class EngineError(FleetError):
    """The Docker engine refused or failed a request."""


class ImageError(EngineError):
    """The agent image is missing or could not be built."""


class StateStoreError(FleetError):
    """Redis (the broker and state store) could not be reached or refused."""


class StaleTransition(FleetError):
    """A state change that would move a task backwards (e.g. out of a final
    state) was refused."""


class LeaseHeld(FleetError):
    """The task is running elsewhere under a live lease."""


class SlotsTaken(FleetError):
    """The agent already runs its `max_running` tasks on all hosts together."""


class WaitTimeout(FleetError):
    def __init__(self, task_id: str, timeout: float) -> None:
        super().__init__(f"task {task_id} is not final after {timeout:g} s")


class TaskFailed(FleetError):
    """A fleet task that failed, as a Celery client sees it: the exception
    `AsyncResult(id).get()` raises, its message "<kind>: <fleet's message>".
    Where fleet is not imported, Celery makes a class of this name itself."""
