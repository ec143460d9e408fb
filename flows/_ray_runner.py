"""prefect-ray's RayTaskRunner, with each batch's final state delivered to the Prefect API before it returns.

A batch's states (Running, Completed, Failed) reach the Prefect API as events, sent by a background service of the
process it ran in. On a Ray worker that process belongs to the run's Ray job: when the flow run ends, Ray stops its
workers, and events still queued there were lost (seen here: a batch left Running on the server forever after its
flow run completed). So each batch waits until the process's event queue is empty before it returns. Logs go
through a batching service that sends every `PREFECT_LOGGING_TO_API_BATCH_INTERVAL` seconds; the run sets that
short on its workers (flows/_ray.py) and waits a few intervals before it disconnects, instead of every batch
waiting for its log lines.

Stopping and restarting the services after each batch (`drain_all`) also delivers everything, but it cost a new
connection per batch: 289 ms per no-op task against 135 ms without (docs/benchmarks.md, section 7).

prefect-ray also makes a new Ray remote function for every task it submits, which the cluster exports and the
worker loads before the task runs; this runner's batch function is made once per set of options instead
(`_OneRemoteFunction`): 175 ms -> 139 ms per no-op task with the event wait, measured here on one worker.

Imported only with runner="ray" (Ray and prefect-ray are an extra)."""

from __future__ import annotations

import threading
import time
from typing import Any

import prefect_ray.task_runners as prefect_ray_runners
from prefect_ray import RayTaskRunner

FLUSH_TIMEOUT = 30.0  # seconds a batch waits for its events to be sent


def wait_for_events(timeout: float = FLUSH_TIMEOUT) -> bool:
    """Wait until this process's Prefect event services have sent everything queued (at most `timeout` s); True
    when they did. Reads the services' queues (prefect's QueueService keeps a queue.Queue whose task_done() follows
    each sent item); where that is not there, drains them, which also sends everything."""
    from prefect.events.worker import EventsWorker

    instances = [s for s in list(getattr(EventsWorker, "_instances", {}).values()) if isinstance(s, EventsWorker)]
    queues = [getattr(s, "_queue", None) for s in instances]
    if any(q is None or not hasattr(q, "unfinished_tasks") for q in queues):
        EventsWorker.drain_all(timeout=timeout)
        return True
    deadline = time.monotonic() + timeout
    while any(q.unfinished_tasks for q in queues):  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class FlushingRayTaskRunner(RayTaskRunner):
    """RayTaskRunner whose batches return once their Prefect events are sent."""

    @staticmethod
    def _run_prefect_task(*upstream_ray_obj_refs: Any, **kwargs: Any) -> Any:
        try:
            return RayTaskRunner._run_prefect_task(*upstream_ray_obj_refs, **kwargs)
        finally:
            wait_for_events()


class _OneRemoteFunction:
    """Stands in for the `ray` module inside prefect_ray.task_runners: `ray.remote(**options)(function)` returns one
    cached remote function per option set for FlushingRayTaskRunner's batch function; every other use goes to Ray
    unchanged."""

    def __init__(self, ray_module: Any) -> None:
        self._ray = ray_module
        self._functions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ray, name)

    def remote(self, *args: Any, **options: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not options:  # used bare: ray.remote(function)
            return self._function(args[0], {})
        return lambda function: self._function(function, options)

    def _function(self, function: Any, options: dict[str, Any]) -> Any:
        def make() -> Any:
            return self._ray.remote(**options)(function) if options else self._ray.remote(function)

        if function is not FlushingRayTaskRunner._run_prefect_task:
            return make()
        key = repr(sorted(options.items()))
        with self._lock:
            if key not in self._functions:
                self._functions[key] = make()
            return self._functions[key]


if not isinstance(prefect_ray_runners.ray, _OneRemoteFunction):
    prefect_ray_runners.ray = _OneRemoteFunction(prefect_ray_runners.ray)
