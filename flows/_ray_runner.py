"""prefect-ray's RayTaskRunner, with the Prefect events and logs of each batch delivered before it returns.

A batch's final state (Completed, Failed) reaches the Prefect API as an event, sent by a background service of the
process it ran in. On a Ray worker that process belongs to the run's Ray job: when the flow run ends, Ray stops its
workers, and events still queued there were lost (seen here: a batch left Running on the server forever after its
flow run completed). Each batch therefore drains the process's event and log services before its result goes
back; the next batch starts them again. Imported only with runner="ray" (Ray and prefect-ray are an extra)."""

from __future__ import annotations

from typing import Any

from prefect_ray import RayTaskRunner

FLUSH_TIMEOUT = 30.0  # seconds a batch waits for its events and logs to be sent


def flush_prefect_services(timeout: float = FLUSH_TIMEOUT) -> None:
    """Send what this process's Prefect event and log services hold, and wait (at most `timeout` s each)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout)


class FlushingRayTaskRunner(RayTaskRunner):
    """RayTaskRunner whose batches flush their Prefect events and logs before returning."""

    @staticmethod
    def _run_prefect_task(*upstream_ray_obj_refs: Any, **kwargs: Any) -> Any:
        try:
            return RayTaskRunner._run_prefect_task(*upstream_ray_obj_refs, **kwargs)
        finally:
            flush_prefect_services()
