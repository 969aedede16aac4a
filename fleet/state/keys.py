"""Every Redis key fleet writes, in one place, under one namespace.

    {ns}:task:{id}              hash   the task record (JSON-encoded fields) and its payload
    {ns}:task:{id}:events       stream state transitions and output chunks, capped
    {ns}:index:agent:{agent}    zset   task ids of an agent, scored by creation time
    {ns}:index:state:{state}    zset   task ids in a state, scored by time of entry
    {ns}:index:schedule:{agent} zset   the agent's `scheduled` task ids, scored by when they are due
    {ns}:index:changes          stream every task's changes of state (task, agent, state, attempt),
                                       capped: what `fleet tasks --watch` follows (written with the
                                       records, by whoever writes them)
    {ns}:on-done:due            zset   deliveries of on_done hooks ("<task>|<attempt>|<hook>"), scored
                                       by when they are next tried (or until when one is being tried);
                                       added by a task's final transition, written by workers only
    {ns}:on-done:deliveries     hash   a delivery's tries so far, when it was scheduled, and the
                                       record as the task ended
    {ns}:on-done                pubsub "new deliveries are due": wakes the deliverers
    {ns}:agent:{agent}:running  zset   the agent's running task ids, scored by their lease's expiry
                                       (ms): its `max_running` slots, fleet-wide
    {ns}:stats:...                     counters of what tasks came to, for /metrics (fleet.state.stats)
    {ns}:idem:{sha256(key)}     string task id for an idempotency key
    {ns}:lease:{id}             string "<owner>|<attempt>" while an attempt runs; expires unless renewed
    {ns}:republishing:{id}      string a consumer is publishing a lost message of a queued task again
    {ns}:alerts                 stream credential failures, breaker openings and closings, capped
    {ns}:agent:{agent}:paused   hash   the agent's circuit breaker is open: reason, token, since
    {ns}:agent:{agent}:credential-failures  string  consecutive credential failures
    {ns}:control                pubsub "paused"/"resumed"/"cancel"/"drain" notices (the flags are the truth)
    {ns}:hosts                  zset   host ids, scored by their last heartbeat
    {ns}:host:{host}            hash   a host's registration (agents, slots, containers, version…) and
                                       its consumers' reports; expires a day after its last heartbeat
    {ns}:host:{host}:drain      string the host is drained (since when); kept until undrained
    {ns}:broker:...                    Celery/kombu's own keys (queues, unacked messages)
    {ns}:purged:{queue}         list   messages `celery purge` took off a queue, until a consumer
                                       has cancelled their tasks (fleet.broker.transport); outside
                                       the broker's keys, which a submitter may write
    {ns}:result:celery-task-meta-{id}  string  the task's state in Celery's result-backend format,
                                       written with every change of its record (also published
                                       on the channel of that name, for `AsyncResult.get`)

Finished tasks' record, events and idempotency key expire after
`retention_s`; index entries that point at expired records are pruned when
read."""

from __future__ import annotations

import hashlib

BROKER_PREFIX = ":broker:"


class Keys:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def task(self, task_id: str) -> str:
        return f"{self.namespace}:task:{task_id}"

    def events(self, task_id: str) -> str:
        return f"{self.namespace}:task:{task_id}:events"

    def by_agent(self, agent: str) -> str:
        return f"{self.namespace}:index:agent:{agent}"

    def by_state(self, state: str) -> str:
        return f"{self.namespace}:index:state:{state}"

    def schedule(self, agent: str) -> str:
        return f"{self.namespace}:index:schedule:{agent}"

    @property
    def changes(self) -> str:
        """Under `index:`: the roles that write records write it too."""
        return f"{self.namespace}:index:changes"

    @property
    def on_done_due(self) -> str:
        return f"{self.namespace}:on-done:due"

    @property
    def on_done_deliveries(self) -> str:
        return f"{self.namespace}:on-done:deliveries"

    @property
    def on_done_notice(self) -> str:
        return f"{self.namespace}:on-done"

    @property
    def stats_finished(self) -> str:
        return f"{self.namespace}:stats:finished"

    @property
    def stats_retries(self) -> str:
        return f"{self.namespace}:stats:retries"

    def stats_duration(self, agent: str) -> str:
        return f"{self.namespace}:stats:duration:{agent}"

    @property
    def stats_credential_failures(self) -> str:
        return f"{self.namespace}:stats:credential-failures"

    def running(self, agent: str) -> str:
        return f"{self.namespace}:agent:{agent}:running"

    def finished(self, task_id: str) -> str:
        """Set by a worker when the task reaches a final state, for as long as
        its record is kept: no role but the worker's writes it, so a finished
        task whose record was put back in the queue is known (replay)."""
        return f"{self.namespace}:finished:{task_id}"

    def lease(self, task_id: str) -> str:
        return f"{self.namespace}:lease:{task_id}"

    def republishing(self, task_id: str) -> str:
        return f"{self.namespace}:republishing:{task_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.namespace}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    @property
    def alerts(self) -> str:
        return f"{self.namespace}:alerts"

    def paused(self, agent: str) -> str:
        return f"{self.namespace}:agent:{agent}:paused"

    def credential_failures(self, agent: str) -> str:
        return f"{self.namespace}:agent:{agent}:credential-failures"

    @property
    def control(self) -> str:
        return f"{self.namespace}:control"

    @property
    def hosts(self) -> str:
        return f"{self.namespace}:hosts"

    def host(self, host: str) -> str:
        return f"{self.namespace}:host:{host}"

    def drain(self, host: str) -> str:
        return f"{self.namespace}:host:{host}:drain"

    @property
    def broker_prefix(self) -> str:
        """kombu's `global_keyprefix`: the broker's keys live under the namespace too."""
        return f"{self.namespace}{BROKER_PREFIX}"

    @property
    def result_prefix(self) -> str:
        """The Celery result backend's `global_keyprefix`."""
        return f"{self.namespace}:result:"

    def celery_result(self, task_id: str) -> str:
        """Celery's result key of a task (and the channel its changes are published on)."""
        return f"{self.result_prefix}celery-task-meta-{task_id}"

    def queue(self, queue_name: str) -> str:
        """The Redis list kombu keeps a queue's messages in."""
        return f"{self.broker_prefix}{queue_name}"

    def purged(self, queue_name: str) -> str:
        """Where `celery purge` puts the messages it took off a queue (fleet.broker.transport)."""
        return f"{self.namespace}:purged:{queue_name}"

    @classmethod
    def of_broker_prefix(cls, prefix: str) -> Keys | None:
        """The keys of the namespace whose broker prefix this is (None: not fleet's)."""
        namespace, found, rest = prefix.rpartition(BROKER_PREFIX)
        return cls(namespace) if found and namespace and not rest else None

    @property
    def unacked(self) -> str:
        """The hash kombu keeps delivered, not yet acknowledged messages in."""
        return f"{self.broker_prefix}unacked"

    @property
    def unacked_index(self) -> str:
        """kombu's sorted set of those messages' delivery tags, scored by when each was delivered."""
        return f"{self.broker_prefix}unacked_index"
