"""Ray as the flows' fan-out engine: each batch is a Prefect task run executed on a Ray worker process.

    run_on_ray(generate_batch_task, parameters, device="auto", options=RayOptions("ray://head:10001"))

Built on prefect-ray's `RayTaskRunner`, so every batch is a task run in the Prefect UI with its logs and retries,
and Ray places it by its resource request: `num_gpus=1` for a batch meant for a GPU when the cluster has GPUs,
else `num_cpus=1`. What the runner leaves to us, and this module adds:

- worker reuse: Ray retires a GPU task's worker process after one call by default (`max_calls=1`), which would
  load the pipeline again for every batch; batches ask for `max_calls=0`, so a worker process loads the models
  once (elite.jobs' per-process caches) and serves batch after batch;
- the Prefect API: a Ray worker is a process of its own, started by the Ray node, not by the flow; with no
  `PREFECT_API_URL` it would start a temporary Prefect server of its own and record the batch there. The runner
  passes the flow's API URL (and elite's non-secret `ELITE_*` settings) to the workers in Ray's runtime
  environment, and refuses a loopback API URL when the cluster has nodes on other hosts, which cannot reach it;
- delivery: each batch returns once its Prefect state events are sent (flows/_ray_runner.py), and workers send
  their log lines every 0.1 s, since Ray stops a run's worker processes when the run ends;
- a bounded window: at most `window` batches are submitted at a time (default twice the cluster's slots), so a
  run of 10^5 batches does not queue 10^5 Ray tasks and Prefect task runs up front;
- lost hosts: Ray re-runs a batch whose worker process or node died (`max_retries` times); when no batch finishes
  for `stall_timeout` seconds (a host that never comes back, a cluster with no node that fits), the unfinished
  batches are cancelled and returned as `BatchNotFinished`, which the jobs record as failure rows.

Ray is imported only here and only when the runner is "ray": the library and the thread runner do not need it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from elite.errors import EliteError, InputError

logger = logging.getLogger("elite.flows.ray")

RUNNERS = ("threads", "ray")
# Settings forwarded to Ray workers: elite's own (model locations, S3 endpoint and retry settings), never anything
# that looks like a credential (those stay with the workers: instance roles, ~/.aws, their own environment).
FORWARDED = re.compile(r"ELITE_[A-Z0-9_]+")
SECRET = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# Prefect settings that make sense on every worker of a run (telemetry off, as the driver has it)
PREFECT_FORWARDED = ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "PREFECT_LOGGING_LEVEL")
# Workers send their log lines this often (Prefect's default, 2 s, would hold a worker's last lines past the end of
# the run, when Ray stops its workers); the run waits LOG_WAITS intervals before it disconnects.
LOG_INTERVAL = "0.1"
LOG_WAITS = 3


class BatchNotFinished(EliteError):
    """A batch that no Ray worker finished: its host was lost and no other could take it in time."""


@dataclass(frozen=True)
class RayOptions:
    """How the flows use a Ray cluster."""

    address: str | None = None  # "ray://head:10001", "head:6379" or "auto"; None: RAY_ADDRESS, else a local Ray
    stall_timeout: float = 900.0  # seconds without any finished batch before the unfinished ones are given up
    max_retries: int = 3  # times Ray runs a batch again after its worker process or host died
    window: int | None = None  # batches submitted at a time; None: twice the cluster's slots (at least 2)

    def __post_init__(self) -> None:
        if isinstance(self.stall_timeout, bool) or not isinstance(self.stall_timeout, int | float) \
                or not self.stall_timeout > 0:
            raise InputError(f"ray_stall_timeout must be a number of seconds > 0, got {self.stall_timeout!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InputError(f"ray max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise InputError(f"ray window must be an integer >= 1, got {self.window!r}")


def check_runner(runner: str) -> None:
    """Refuse an unknown runner, and the Ray runner where prefect-ray is not installed, before any work starts."""
    if runner not in RUNNERS:
        raise InputError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner == "ray":
        try:
            import prefect_ray  # noqa: F401
            import ray  # noqa: F401
        except ImportError as err:
            raise InputError(f"runner 'ray' needs Ray and prefect-ray on the flow's host: pip install -e '.[ray]' "
                             f"({err})") from err


# ---- the driver side ------------------------------------------------------------------------------

def prefect_api_url() -> str:
    """The URL of the Prefect API this process talks to: PREFECT_API_URL, or the temporary server of an ephemeral
    run (then only reachable from this host)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def worker_env(api_url: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables a run gives its Ray workers: the Prefect API URL, elite's non-secret settings."""
    env = dict(os.environ if environ is None else environ)
    forwarded = {name: value for name, value in env.items()
                 if FORWARDED.fullmatch(name) and not SECRET.search(name) and value}
    forwarded.update({name: env[name] for name in PREFECT_FORWARDED if env.get(name)})
    forwarded["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = env.get("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", LOG_INTERVAL)
    return {**forwarded, "PREFECT_API_URL": api_url}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_reachable(api_url: str, node_addresses: Sequence[str], local_addresses: Sequence[str]) -> None:
    """A loopback API URL (an ephemeral Prefect server, or PREFECT_API_URL=http://127.0.0.1:...) works only when
    every Ray node runs on this host; refuse it otherwise, before any batch is recorded nowhere."""
    host = urllib.parse.urlsplit(api_url).hostname or ""
    remote = sorted({a for a in node_addresses if a not in local_addresses and not _is_loopback(a)})
    if _is_loopback(host) and remote:
        raise InputError(f"the Prefect API of this run is {api_url}, which Ray workers on other hosts "
                         f"({', '.join(remote)}) cannot reach; start a Prefect server and set PREFECT_API_URL to an "
                         f"address the whole cluster reaches (infra/README.md, 'Ray')")


def _local_addresses() -> list[str]:
    names = {"127.0.0.1", "localhost", socket.gethostname()}
    try:
        names.update(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    try:
        import ray

        names.add(ray.util.get_node_ip_address())
    except Exception:  # not connected: the names above are what we know
        pass
    return sorted(str(name) for name in names)


def ray_device(devices: Sequence[str]) -> str:
    """What a Ray batch asks for, from a flow's device setting(s): "cpu", "cuda" (any "cuda..." device: on a Ray
    worker the GPU it was given is its cuda:0) or "auto" (a GPU when the cluster has any). Ray places each batch on
    one device, so the devices named must all be of one kind."""
    kinds = {"cpu" if d == "cpu" else "auto" if d == "auto" else "cuda" if d.startswith("cuda") else d
             for d in devices}
    if len(kinds) != 1 or not kinds <= {"cpu", "cuda", "auto"}:
        raise InputError(f"with runner 'ray', devices must be all 'cpu' or all 'cuda...' (or 'auto'; Ray places "
                         f"each batch on one device), got {list(devices)!r}")
    return kinds.pop()


def batch_resources(device: str, cluster: dict[str, float]) -> dict[str, float]:
    """The Ray resource request of one batch meant for `device` ("auto", "cpu", "cuda", "cuda:N") on a cluster
    with these total resources: one GPU where the batch wants one and the cluster has any, else one CPU."""
    gpus = cluster.get("GPU", 0.0)
    if device == "cpu":
        return {"num_cpus": 1}
    if device != "auto" and gpus <= 0:
        raise InputError(f"device {device!r} asked for, but the Ray cluster has no GPU (resources: "
                         f"{ {k: v for k, v in sorted(cluster.items()) if k in ('CPU', 'GPU')} })")
    return {"num_gpus": 1} if gpus > 0 else {"num_cpus": 1}


def cluster_slots(resources: dict[str, float], cluster: dict[str, float]) -> int:
    """How many batches of this request the cluster runs at once."""
    if "num_gpus" in resources:
        return int(cluster.get("GPU", 0.0) // resources["num_gpus"])
    return int(cluster.get("CPU", 0.0) // resources.get("num_cpus", 1))


class RaySession:
    """A flow's connection to its Ray cluster: batches of several kinds run on the same Ray job, so a worker that
    loaded a model for one (the encoder, asked for its id) keeps it for the next."""

    def __init__(self, runner: Any, api_url: str, runtime_env: dict[str, Any], options: RayOptions) -> None:
        self.runner = runner
        self.api_url = api_url
        self.runtime_env = runtime_env
        self.options = options

    def run(self, task: Any, parameters: Sequence[dict[str, Any]], device: str) -> Iterator[Any]:
        """Run `task` once per parameter dict, each a Prefect task run of this flow run, at most `options.window`
        at a time; yield each result, or the exception its batch ended with, in submission order (a BatchRunner
        of elite.jobs)."""
        import ray
        from prefect_ray.context import remote_options

        if not parameters:
            return
        cluster = ray.cluster_resources()
        resources = batch_resources(device, cluster)
        window = self.options.window or max(2, 2 * cluster_slots(resources, cluster))
        logger.info("Ray cluster resources: %s; batches ask for %s; %d in flight at most; Prefect API for the "
                    "workers: %s", ", ".join(f"{k} {v:g}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU")),
                    resources, window, self.api_url)
        # the runtime environment per task as well: prefect-ray ignores init_kwargs when this process is connected
        # to Ray already (ray.init called before the flow), and the workers would miss PREFECT_API_URL
        request = {**resources, "max_calls": 0, "max_retries": self.options.max_retries, "retry_exceptions": False,
                   "runtime_env": self.runtime_env}
        yield from _windowed(self.runner, task, parameters, request, window, self.options.stall_timeout,
                             remote_options)


@contextmanager
def ray_session(options: RayOptions) -> Iterator[RaySession]:
    """Connect to the Ray cluster of `options` (or start a local Ray) for the time of the block, with the Prefect
    API URL and elite's settings in the workers' environment; a loopback API URL is refused when the cluster has
    nodes on other hosts."""
    import ray

    from flows._ray_runner import FlushingRayTaskRunner

    api_url = prefect_api_url()
    runtime_env = {"env_vars": worker_env(api_url)}
    if ray.is_initialized() and options.address:
        logger.warning("this process is connected to Ray already: ray_address %s is not used", options.address)
    with FlushingRayTaskRunner(address=options.address, init_kwargs={"runtime_env": runtime_env}) as runner:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        check_api_reachable(api_url, [str(node.get("NodeManagerAddress", "")) for node in nodes],
                            _local_addresses())
        yield RaySession(runner, api_url, runtime_env, options)
        # the workers' last log lines leave within a log interval or two; Ray stops the workers on disconnect
        time.sleep(LOG_WAITS * float(runtime_env["env_vars"]["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"]))


def run_on_ray(task: Any, parameters: Sequence[dict[str, Any]], device: str, options: RayOptions) -> Iterator[Any]:
    """`RaySession.run` in a session of its own."""
    if not parameters:
        return
    with ray_session(options) as session:
        yield from session.run(task, parameters, device)


def _windowed(runner: Any, task: Any, parameters: Sequence[dict[str, Any]], request: dict[str, Any], window: int,
              stall_timeout: float, remote_options: Any) -> Iterator[Any]:
    import ray

    futures: dict[int, Any] = {}
    pending: dict[Any, int] = {}  # Ray object ref -> batch number
    results: dict[int, Any] = {}
    submitted = yielded = 0
    total = len(parameters)
    while yielded < total:
        while submitted < total and len(pending) < window:
            with remote_options(**request):
                future = runner.submit(task, parameters[submitted])
            futures[submitted] = future
            pending[future.wrapped_future] = submitted
            submitted += 1
        while yielded in results:
            yield results.pop(yielded)
            yielded += 1
        if yielded >= total or not pending:
            continue
        done, _ = ray.wait(list(pending), num_returns=1, timeout=stall_timeout)
        if not done:  # nothing finished for stall_timeout: the cluster lost the hosts these batches need
            reason = (f"no Ray worker finished a batch for {stall_timeout:g} s (a worker host lost and none to take "
                      f"over?); this batch was not finished")
            for ref, number in pending.items():
                ray.cancel(ref, force=True)
                results[number] = BatchNotFinished(reason)
            pending.clear()
            for number in range(submitted, total):
                results[number] = BatchNotFinished(reason.replace("was not finished", "was not started"))
            submitted = total
            logger.error("%s: %d batch(es) given up", reason.split(";")[0], len(results))
            continue
        for ref in done:
            number = pending.pop(ref)
            try:
                results[number] = futures.pop(number).result()
            except Exception as err:  # failed after Prefect's and Ray's retries: the job records its items
                results[number] = err


# ---- the worker side ------------------------------------------------------------------------------

_BOUND_GPUS: list[str] = []  # the GPU ids this worker process was first given


def worker_devices() -> list[str]:
    """The generation slot of a batch running on a Ray worker: the GPU Ray gave it (CUDA_VISIBLE_DEVICES then
    names only that one, so it is cuda:0 in this process), else the CPU.

    A worker process keeps its CUDA context for life: should Ray hand a reused worker another GPU than the one its
    models sit on, the process exits before touching either (Ray runs the batch again on a fresh worker) rather
    than run two workers' batches on one GPU."""
    import ray

    gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
    if not gpu_ids:
        return ["cpu"]
    if not _BOUND_GPUS:
        _BOUND_GPUS.append(gpu_ids)
    elif _BOUND_GPUS[0] != gpu_ids:
        import torch

        if torch.cuda.is_initialized():
            logger.error("this Ray worker holds models on GPU %s but was given GPU %s; exiting so that Ray runs the "
                         "batch on a fresh worker", _BOUND_GPUS[0], gpu_ids)
            os._exit(75)
        _BOUND_GPUS[0] = gpu_ids
    return ["cuda:0"]


def in_ray_worker() -> bool:
    """True inside a Ray worker process (where batches of the Ray runner run)."""
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized() and ray.get_runtime_context().worker.mode == 1)  # WORKER_MODE
