"""The Ray runner of `generate_images` against the thread runner: images/s, per-batch overhead, fixed start cost.

One process, one run, tiny models (`elite.model.tiny.make_tiny_models`), everything in a local folder: the 11
shared test concepts are encoded once (thread runner, not timed), then `flows.generate.generate_images` makes the
same images (one prompt, `--images` per concept, `--steps` steps at `--size` px, batches of `--batch-size`) with

- `threads`, devices ["cpu"], torch at its default thread count (2 here) and again with `torch.set_num_threads(1)`:
  a Ray CPU batch runs with one torch thread (Ray sets OMP_NUM_THREADS to the task's num_cpus=1), so the
  1-thread run is the like-for-like baseline;
- `ray` on a local cluster (`ray.cluster_utils.Cluster`: a head node with no CPUs, as the flow's host, and one
  worker node with 1, then 2 CPUs), each cluster running the flow twice: "cold" (the cluster just started) and
  "warm" (a second flow run on it; each run is a new Ray job, so its worker processes start again).

Prefect runs in ephemeral mode (a temporary API server in a subprocess, SQLite in a fresh PREFECT_HOME, telemetry
off); the Ray workers report their task runs to it over loopback. Per run, from the flow's report and from wrappers
in this process that only record (around the batch runner the flow calls, and around `ray.init`):

- images/s = generated / the report's wall time (planning, batches and the run's manifest), and its ratio to the
  thread runner at 1 thread and at its default;
- in-worker time per batch: the batch's own `seconds` (model + io) as it comes back with its result (reading
  embeddings, the pipeline call, PNG encoding, PNG and batch-manifest puts); a worker's first batch also loads the
  pipeline: "load" = that batch's model time minus the median of the others (the thread runner's second run
  finds the pipeline loaded by the first: its "load" is noise);
- overhead per batch, amortized over the whole flow wall time (loads and start-up included):
      (slots x wall - sum of in-worker time, loads included) / batches      # slot time not spent in a batch
- overhead per batch, steady, from each batch's task-run states as the API recorded them (Pending: its task
  engine created it in the worker; Running: the body starts; Completed), with each batch assigned to the worker
  that ran it (a worker runs one batch at a time): "engine" = Completed - Pending - in-worker time (Prefect's task
  engine around the body, and our glue in the task), "gap" = this batch's Pending - the same worker's previous
  Completed (Ray returning one result and dispatching the next task, argument and context deserialization,
  Prefect's context set-up); steady = engine + gap over every batch but a worker's first (median; mean in JSON);
- fixed cost of the runner: from the runner called to the first batch's Pending (ray.init's connect, the job's
  first worker process started and its imports, the first Prefect task run set up there; the pipeline load
  comes after, in the first batch's in-worker time); `ray.init` alone is timed too;
- Ray worker processes seen running batches (titles `ray::generate_batch_task` in /proc, sampled) and their peak
  RSS; the API writes per task run (its states and log lines, read back from the API);
- CPU of this process and its children (Ray nodes and workers, the API server) and how busy the rest of the
  machine was (from /proc/stat): another engineer may be running tests.

The target check: the steady overhead per batch as a share of a real-size batch of 4 images, 512x512, 50 steps,
from published per-image times of SD 1.5 (batch 1, times 4, which overstates a batched GPU's batch time, so the
check errs strict): 1.59 s/image on an A100 with diffusers and SDPA, 0.75 s/image on an H100 PCIe with TensorRT
(the figures quoted in docs/benchmarks.md section 7). Target: under 2%.

    python benchmarks/bench_ray.py            # 132 images per configuration, ~8 min here (470 s, machine shared)
    python benchmarks/bench_ray.py --quick    # 44 images, ~4 min (results/ray_quick.json)
    python benchmarks/bench_ray.py --images 20 --steps 8 --size 64 --batch-size 4

Figures go to benchmarks/results/ray.json (ray_quick.json with --quick) with the machine, the load, the versions
of ray, prefect-ray, prefect and torch, and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # flows/ is not an installed package

from bench_orchestration import CONCEPT_DIR, proc_stat, wait_for_idle  # noqa: E402

PROMPT = "a photo of a S"
TARGET_PERCENT = 2.0
# Published per-image times of SD 1.5, 512x512, 50 steps, batch 1 (docs/benchmarks.md section 7 cites them)
GPU_SECONDS_PER_IMAGE = {"A100, diffusers + SDPA": 1.59, "H100 PCIe, TensorRT": 0.75}
REAL_BATCH = 4


# --------------------------------------------------------------------------------------------------
# recording: the batch runner's results, ray.init, Ray worker processes, CPU of our process tree
# --------------------------------------------------------------------------------------------------

class Recorder:
    """Wraps the batch runners `flows.generate` calls (`run_bounded`, `run_on_ray`), the task runners' `submit`
    and `ray.init`; records when the runner was called, each batch's task run id and submit time, when each result
    came back and its in-worker seconds. Changes nothing they do. Times are `time.time()` (the task runs' state
    timestamps, made by the workers on this host, are compared with them)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.called = 0.0
        self.submitted: list[tuple[float, Any]] = []  # (time, task run id), in submission order
        self.results: list[tuple[float, dict[str, float]]] = []  # (time, in-worker seconds), same order
        self.ray_init_s: list[float] = []

    def wrap_runner(self, runner: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def recorded(*args: Any, **kwargs: Any) -> Iterator[Any]:
            self.called = time.time()
            for result in runner(*args, **kwargs):
                seconds = getattr(result, "seconds", None)
                self.results.append((time.time(), dict(seconds) if seconds else {}))
                yield result

        return recorded

    def wrap_submit(self, cls: Any) -> None:
        submit = cls.submit

        def recorded(runner: Any, *args: Any, **kwargs: Any) -> Any:
            future = submit(runner, *args, **kwargs)
            self.submitted.append((time.time(), future.task_run_id))
            return future

        cls.submit = recorded

    def install(self) -> None:
        import ray
        from prefect.task_runners import ThreadPoolTaskRunner
        from prefect_ray import RayTaskRunner

        import flows.generate

        flows.generate.run_bounded = self.wrap_runner(flows.generate.run_bounded)  # type: ignore[assignment]
        flows.generate.run_on_ray = self.wrap_runner(flows.generate.run_on_ray)  # type: ignore[assignment]
        self.wrap_submit(ThreadPoolTaskRunner)
        self.wrap_submit(RayTaskRunner)
        init = ray.init

        def timed_init(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return init(*args, **kwargs)
            finally:
                self.ray_init_s.append(time.perf_counter() - start)

        ray.init = timed_init  # prefect_ray calls ray.init through the module


def task_run_times(task_run_ids: list[Any], timeout: float = 30.0) -> list[dict[str, float]]:
    """Per task run, the timestamps of its Pending, Running and Completed states (made in the process that ran it:
    Pending when its task engine created it, Running before the body, Completed after). The API server records
    them from events, a moment after the flow returns: polled until every run has its Completed state."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            times = []
            for run_id in task_run_ids:
                states = client.read_task_run_states(run_id)
                times.append({state.type.value.lower(): state.timestamp.timestamp() for state in states})
            if all("completed" in t for t in times) or time.monotonic() > deadline:
                return times
            time.sleep(1.0)


class Sampler(threading.Thread):
    """Every 0.2 s: the CPU seconds of this process and every descendant (last value seen per pid, so processes
    that exit during the run still count), and the Ray workers running a batch (pid -> peak RSS)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.cpu: dict[int, float] = {}
        self.workers: dict[int, int] = {}

    def reset(self) -> None:
        with self.lock:
            self.cpu, self.workers = {}, {}
        self.sample()

    def total_cpu(self) -> float:
        self.sample()
        with self.lock:
            return sum(self.cpu.values())

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                with self.lock:
                    self.cpu[proc.pid] = times.user + times.system + times.children_user + times.children_system
                if proc.pid != me.pid and proc.cmdline()[:1] and proc.cmdline()[0].startswith(
                        "ray::generate_batch_task"):
                    rss = proc.memory_info().rss
                    with self.lock:
                        self.workers[proc.pid] = max(self.workers.get(proc.pid, 0), rss)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.sample()


# --------------------------------------------------------------------------------------------------
# setup and one measured run
# --------------------------------------------------------------------------------------------------

def prepare(work: Path, images_per_concept: int) -> dict[str, Any]:
    """Tiny models, the shared concepts copied into a catalog folder and encoded (thread runner), the prompt file."""
    from elite.model.tiny import make_tiny_models
    from flows.encode import encode_concepts

    start = time.perf_counter()
    tiny = make_tiny_models(work / "models")
    models = {"pretrained_model": str(tiny.pretrained_model), "global_mapper": str(tiny.global_mapper),
              "local_mapper": str(tiny.local_mapper)}
    catalog = work / "catalog"
    catalog.mkdir()
    sources = sorted(p for p in CONCEPT_DIR.iterdir() if p.suffix in (".jpg", ".png"))
    if not [p for p in sources if not p.stem.endswith("_bg")]:
        raise SystemExit(f"no concept images in {CONCEPT_DIR}; set ELITE_TEST_CONCEPTS")
    for path in sources:
        shutil.copyfile(path, catalog / path.name)
    encoded = encode_concepts(str(catalog), str(work / "embeddings"), vision_model=str(tiny.vision_model), **models)
    if encoded["failed"]:
        raise SystemExit(f"encoding failed: {encoded}")
    (work / "prompts.jsonl").write_text(f'{{"prompt": "{PROMPT}", "images": {images_per_concept}}}\n')
    return {"models": models, "encoder_id": encoded["encoder_id"], "concepts": len(encoded["concept_ids"]),
            "seconds": round(time.perf_counter() - start, 1)}


def api_writes(out_uri: str) -> dict[str, Any]:
    """Task runs of the flow run that wrote `out_uri`, and per task run its states and log lines (read back)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[f"generate {out_uri}"])))
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id])), limit=200)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
                                limit=200)
        states = [len(client.read_task_run_states(run.id)) for run in task_runs[:5]]
    task_logs = [log for log in logs if log.task_run_id is not None]
    return {"task_runs": len(task_runs), "states_per_task_run": states,
            "task_run_log_lines": len(task_logs), "flow_run_log_lines": len(logs) - len(task_logs),
            "log_lines_per_task_run": round(len(task_logs) / max(len(task_runs), 1), 2)}


def measure(name: str, args: argparse.Namespace, work: Path, setup: dict[str, Any], recorder: Recorder,
            sampler: Sampler, slots: int, **runner: Any) -> dict[str, Any]:
    from _common import gemm_probe

    from flows.generate import generate_images

    out = work / f"out-{name}"
    other_before = wait_for_idle(args.wait_idle)
    probe = gemm_probe()
    recorder.reset()
    sampler.reset()
    cpu0 = sampler.total_cpu()
    busy0, total0 = proc_stat()
    start = time.perf_counter()
    report = generate_images(str(work / "embeddings"), str(work / "prompts.jsonl"), str(out),
                             **setup["models"], encoder_id=setup["encoder_id"], steps=args.steps, height=args.size,
                             width=args.size, batch_size=args.batch_size, **runner)
    call = time.perf_counter() - start
    busy1, total1 = proc_stat()
    ours = sampler.total_cpu() - cpu0
    cores = os.cpu_count() or 1
    machine = cores * (busy1 - busy0) / max(total1 - total0, 1) * call  # core-seconds, whole machine
    if report["failed"] or report["generated"] != setup["concepts"] * args.images:
        raise SystemExit(f"{name}: the run failed items: {report['failed']} failed, {report['generated']} made")
    row = summarize(name, report, recorder, slots)
    hashes, per_image = read_manifest(report["manifest_uri"])
    with sampler.lock:
        workers = dict(sampler.workers)
    row.update({
        "call_s": round(call, 3), "ray_init_s": [round(s, 3) for s in recorder.ray_init_s],
        "ray_workers_seen": len(workers),
        "ray_worker_peak_rss_mib": round(max(workers.values()) / 2**20, 1) if workers else None,
        "cpu_ours_s": round(ours, 2), "other_busy_cores": round(max(0.0, machine - ours) / call, 2),
        "other_busy_cores_before": other_before, "gemm_probe_gflops": round(probe, 1),
        "api": api_writes(str(out)), "sha256": hashes,
        "generation_per_batch_ms": round(1000 * per_image * args.batch_size, 1)})
    print(f"  {name}: {row['images_per_s']} images/s, steady overhead {row['steady_overhead_ms']} ms/batch "
          f"(engine {row['engine_per_batch_ms']} + gap {row['gap_per_batch_ms']}), fixed {row['fixed_s']} s, "
          f"other load {row['other_busy_cores']} cores", flush=True)
    return row


def assign_workers(times: list[dict[str, float]], slots: int) -> list[int]:
    """Which of `slots` workers ran each batch: batches in order of their Pending time, each to the worker that
    finished its last batch most recently before it (a worker runs one batch at a time)."""
    free_at = [0.0] * slots
    owner = [0] * len(times)
    for i in sorted(range(len(times)), key=lambda i: times[i]["pending"]):
        ready = [w for w in range(slots) if free_at[w] <= times[i]["pending"]]
        worker = max(ready, key=lambda w: free_at[w]) if ready else min(range(slots), key=lambda w: free_at[w])
        owner[i], free_at[worker] = worker, times[i]["completed"]
    return owner


def summarize(name: str, report: dict[str, Any], recorder: Recorder, slots: int) -> dict[str, Any]:
    """Throughput, in-worker time, loads, per-batch overheads and the fixed cost of one run (module docstring)."""
    results = recorder.results
    ids = [run_id for _, run_id in recorder.submitted]
    if len(ids) != len(results):
        raise SystemExit(f"{name}: {len(ids)} task runs submitted, {len(results)} results")
    times = task_run_times(ids)
    wall = report["seconds"]["wall"]
    model = [s.get("model", 0.0) for _, s in results]
    busy = [s.get("model", 0.0) + s.get("io", 0.0) for _, s in results]
    batches = len(results)
    owner = assign_workers(times, slots)
    firsts = {min((i for i in range(batches) if owner[i] == w), key=lambda i: times[i]["pending"])
              for w in set(owner)}
    # a worker's first batch also loads the pipeline (unless this process has it already: threads-1t)
    median_model = statistics.median([m for i, m in enumerate(model) if i not in firsts] or model)
    loads = [model[i] - median_model for i in sorted(firsts)]
    engine, gaps, steady = [], [], []
    last_done: dict[int, float] = {}
    for i in sorted(range(batches), key=lambda i: times[i]["pending"]):
        in_engine = times[i]["completed"] - times[i]["pending"] - busy[i]  # Prefect's task engine + our glue
        engine.append(in_engine)
        if owner[i] in last_done:  # not this worker's first batch: the gap since its last one
            gaps.append(times[i]["pending"] - last_done[owner[i]])
            steady.append(gaps[-1] + in_engine)
        last_done[owner[i]] = times[i]["completed"]
    first_pending = min(t["pending"] for t in times)
    return {
        "config": name, "slots": slots, "images": report["generated"], "batches": batches,
        "wall_s": round(wall, 3), "images_per_s": round(report["generated"] / wall, 3),
        "report_model_s": round(report["seconds"]["model"], 3), "report_io_s": round(report["seconds"]["io"], 3),
        "in_worker_per_batch_ms": round(1000 * statistics.median(busy), 1),
        "in_worker_sum_s": round(sum(busy), 3), "loads_s": [round(x, 3) for x in loads],
        "amortized_overhead_ms": round(1000 * (slots * wall - sum(busy)) / batches, 1),
        "engine_per_batch_ms": round(1000 * statistics.median(engine), 1),
        "gap_per_batch_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "steady_overhead_ms": round(1000 * statistics.median(steady), 1) if steady else None,
        "steady_overhead_mean_ms": round(1000 * statistics.mean(steady), 1) if steady else None,
        "result_latency_ms": round(1000 * statistics.median(
            r - t["completed"] for (r, _), t in zip(results, times, strict=True)), 1),
        "fixed_s": round(first_pending - recorder.called, 3),
        "driver_outside_runner_s": round(wall - (results[-1][0] - recorder.called), 3),
        "timeline": [{"submitted": round(sub - recorder.called, 3), **{k: round(v - recorder.called, 3)
                                                                         for k, v in t.items()},
                      "result": round(r - recorder.called, 3), "worker": w, "in_worker_s": round(b, 3)}
                     for (sub, _), t, (r, _), w, b in zip(recorder.submitted, times, results, owner, busy,
                                                          strict=True)],
    }


def read_manifest(manifest_uri: str) -> tuple[dict[str, str], float]:
    """The run's images (output key -> sha256) and the median generation time per image (the `seconds` column:
    the pipeline call of its batch divided by the batch size)."""
    import pyarrow.parquet as pq

    table = pq.read_table(manifest_uri.removeprefix("file://"), columns=["output_key", "sha256", "seconds"])
    hashes = dict(zip(table.column("output_key").to_pylist(), table.column("sha256").to_pylist(), strict=True))
    return hashes, statistics.median(table.column("seconds").to_pylist())


def start_cluster(cpus: int, temp_dir: Path) -> Any:
    from ray.cluster_utils import Cluster

    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "temp_dir": str(temp_dir)})
    cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    print(f"  Ray cluster with {cpus} worker CPU(s) up in {time.perf_counter() - start:.1f} s", flush=True)
    return cluster


# --------------------------------------------------------------------------------------------------
# the target check, the table
# --------------------------------------------------------------------------------------------------

def target_check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for row in rows:
        if not row["config"].startswith("ray"):
            continue
        for gpu, per_image in GPU_SECONDS_PER_IMAGE.items():
            batch_s = REAL_BATCH * per_image
            share = 100 * row["steady_overhead_ms"] / 1000 / batch_s
            checks.append({"config": row["config"], "gpu": gpu, "batch_s": round(batch_s, 2),
                           "overhead_ms": row["steady_overhead_ms"], "percent": round(share, 2),
                           "pass": share < TARGET_PERCENT})
    return checks


def print_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    base = {r["config"]: r["images_per_s"] for r in rows}
    head = ("config", "slots", "batches", "wall s", "images/s", "vs thr-1t", "vs thr", "in-worker ms/batch",
            "loads s", "amortized ovh ms/batch", "engine ms", "gap ms", "steady ovh ms/batch", "fixed s",
            "ray.init s", "workers", "other load")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["config"], r["slots"], r["batches"], r["wall_s"], r["images_per_s"],
                 f"{r['images_per_s'] / base['threads-1t']:.2f}x", f"{r['images_per_s'] / base['threads']:.2f}x",
                 r["in_worker_per_batch_ms"], "+".join(f"{x:.2f}" for x in r["loads_s"]) or "-",
                 r["amortized_overhead_ms"], r["engine_per_batch_ms"], r["gap_per_batch_ms"],
                 r["steady_overhead_ms"], r["fixed_s"],
                 "+".join(f"{x:.2f}" for x in r["ray_init_s"]) or "-", r["ray_workers_seen"] or "-",
                 r["other_busy_cores"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\ntarget: steady overhead per batch < {TARGET_PERCENT:g}% of a batch of {REAL_BATCH} images, 50 steps")
    for c in checks:
        print(f"  {c['config']:12s} {c['gpu']:24s} batch {c['batch_s']:.2f} s: {c['overhead_ms']} ms = "
              f"{c['percent']:.2f}% -> {'PASS' if c['pass'] else 'FAIL'}")


# --------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 images per concept (44 in all), ~4 min")
    parser.add_argument("--images", type=int, default=12, help="images per concept (11 concepts; default 12)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4, the flow's)")
    parser.add_argument("--wait-idle", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--work-dir", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--name", default="ray", help="results file name under benchmarks/results")
    parser.add_argument("--out", default=None, help="results path (overrides --name)")
    args = parser.parse_args()
    if args.quick:
        args.images = 4
        if args.name == "ray":
            args.name = "ray_quick"
    return args


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_ray_"))
    os.environ.update({"PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_KEY", "PREFECT_PROFILES_PATH"):
        os.environ.pop(name, None)

    import torch
    from _common import announce, exact_command, save_results

    began = time.perf_counter()
    info = announce()
    default_threads = torch.get_num_threads()
    recorder = Recorder()
    recorder.install()
    sampler = Sampler()
    sampler.start()
    rows: list[dict[str, Any]] = []
    clusters: list[Any] = []
    try:
        print("setup: tiny models, 11 concepts encoded, Prefect's ephemeral server ...", flush=True)
        setup = prepare(work, args.images)
        print(f"  {setup['seconds']} s", flush=True)
        rows.append(measure("threads", args, work, setup, recorder, sampler, 1, devices=["cpu"]))
        torch.set_num_threads(1)
        try:
            rows.append(measure("threads-1t", args, work, setup, recorder, sampler, 1, devices=["cpu"]))
        finally:
            torch.set_num_threads(default_threads)
        for cpus in (1, 2):
            cluster = start_cluster(cpus, Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")))
            clusters.append(cluster)
            for run in ("cold", "warm"):
                rows.append(measure(f"ray-{cpus}cpu-{run}", args, work, setup, recorder, sampler, cpus,
                                    devices=["cpu"], runner="ray", ray_address=cluster.address))
            import ray

            ray.shutdown()
            cluster.shutdown()
            clusters.remove(cluster)
    finally:
        sampler.stop.set()
        for cluster in clusters:
            with contextlib.suppress(Exception):
                cluster.shutdown()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    reference = rows[1]["sha256"]
    for row in rows:
        row["same_images_as_threads_1t"] = row.pop("sha256") == reference
    checks = target_check(rows)
    print_table(rows, checks)
    payload = {
        "benchmark": "bench_ray", "command": exact_command(), "machine": info,
        "versions": {name: version(name) for name in ("ray", "prefect", "prefect-ray", "torch")},
        "settings": {"images_per_concept": args.images, "concepts": setup["concepts"], "steps": args.steps,
                     "size": args.size, "batch_size": args.batch_size, "default_torch_threads": default_threads,
                     "setup_s": setup["seconds"]},
        "runs": rows, "gpu_seconds_per_image": GPU_SECONDS_PER_IMAGE, "target_percent": TARGET_PERCENT,
        "target": checks, "total_s": round(time.perf_counter() - began, 1)}
    print(f"\nsaved {save_results(args.name, payload, args.out)} ({payload['total_s']} s)")


if __name__ == "__main__":
    main()
