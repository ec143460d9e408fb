"""Orchestration overhead of the `personalize_catalog` flow: 10, 100 and 1,000 concepts on tiny models, a local folder.

The flow's report splits its time into `model` (model calls, image decoding, PNG encoding, model loading) and `io`
(storage), summed over tasks, and `wall` (the flow function's own time). Orchestration overhead is what is left:

    overhead = wall - model - io          (the issue's formula; target: <= 20 ms per concept)

Encode batches run concurrently (the flow's default ThreadPoolTaskRunner), so their summed `model` and `io` can
exceed the wall time they cover; the script therefore also records every Stopwatch interval (a wrapper around
`elite.jobs.common.Stopwatch.time` in the flow process, which only records) and reports

    overhead (path) = wall - |union of all model and io intervals|

the time during which no model call and no storage I/O was running: orchestration on the critical path.

Encode concurrencies run side by side (`--encode-concurrency`, the flow's `encode_concurrency`): `c2`, the flow's
default (two encode batches in flight, so their summed model and io overlap), and `c1` (one batch at a time: the
formula's terms add up). Generation batches run one at a time in both (generate_images' runner: one slot per
device). Older flows without the parameter ran every encode batch at once (Prefect's default runner);
`--encode-concurrency default` leaves the parameter out.

Each (configuration, count) runs in a fresh process with its own Prefect home (ephemeral mode: a temporary API
server in a subprocess, a fresh SQLite database, telemetry off). In that process: a trivial flow first (it pays the
server's start-up, reported apart), three more (the steady cost of one flow run), then `personalize_catalog` on a
catalog of N concepts that has nothing stored yet (N encodings, N images: one prompt, one image per concept,
`--steps` steps at `--size` px, default batch sizes), then the same call again (a rerun: nothing to do; listing,
hashing, planning and three flow runs). Per run: wall, model, io, the union, process and API-server CPU seconds,
peak and growth of the flow process's RSS, peak OS threads, the API server's RSS, and how busy the rest of the
machine was (from /proc/stat). A line fitted across the counts, overhead = a + b * N, splits the per-run fixed cost
a (three flow runs, model loading, report tables) from the per-concept cost b, the figure to hold to the 20 ms
target.

The catalog: N concepts made from the 11 shared test concepts (`<id>.jpg`/`.png` + `<id>_bg.png`), each image
re-saved with one pixel changed and its index in a comment, so every concept's bytes (and sha256) differ; masks are
the source's.

    python benchmarks/bench_orchestration.py --profile            # 10, 100, 1000 concepts, c2 and c1 (~12 min)
    python benchmarks/bench_orchestration.py --quick              # 5 and 20 concepts (~2 min)
    python benchmarks/bench_orchestration.py --counts 10 100 --encode-concurrency 1 4
    python benchmarks/bench_orchestration.py --profile-only 1000  # only the profiles of one count

`--profile` adds one more process per configuration for the largest count, run under cProfile in every thread
(per-thread CPU time, `time.thread_time`): its figures are inflated by the profiler and kept out of the table; the
top functions and the time in named parts of the flows go to the JSON under "profile".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # flows/ is not an installed package

CONCEPT_DIR = Path(os.environ.get("ELITE_TEST_CONCEPTS", REPO.parent / "shared" / "data" / "elite-test-concepts"))
PROMPT = "a photo of a S"
TARGET_MS = 20.0
ENCODE_BATCH, GENERATE_BATCH = 8, 4  # personalize_catalog's defaults, used as they are


# --------------------------------------------------------------------------------------------------
# machine state
# --------------------------------------------------------------------------------------------------

def proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def cpu_busy_cores(seconds: float = 1.0) -> float | None:
    """Cores in use on the whole machine over `seconds` while this process sleeps (other processes' load)."""
    try:
        busy0, total0 = proc_stat()
        time.sleep(seconds)
        busy1, total1 = proc_stat()
    except (OSError, ValueError, IndexError):
        return None
    return round((os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1), 2)


def wait_for_idle(limit_s: float, threshold: float = 0.3) -> float | None:
    """Wait (up to `limit_s`) until other processes use less than `threshold` cores; returns the last reading."""
    deadline = time.perf_counter() + limit_s
    busy = cpu_busy_cores()
    while busy is not None and busy > threshold and time.perf_counter() < deadline:
        print(f"  {busy} cores busy by other processes; waiting", flush=True)
        time.sleep(5)
        busy = cpu_busy_cores()
    if busy is not None and busy > threshold:
        print(f"  WARNING: {busy} cores busy by other processes: the machine is shared", flush=True)
    return busy


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads of this process, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "Threads"):
            out[name] = int(value.split()[0])
    return out


# --------------------------------------------------------------------------------------------------
# parent: build the inputs, run one process per count, fit, print, save
# --------------------------------------------------------------------------------------------------

def build_pool(folder: Path, count: int) -> list[tuple[str, str]]:
    """`count` concepts c00000.jpg/.png + c00000_bg.png made from the shared ones, all with distinct bytes.
    Returns (image file name, mask file name) per concept."""
    from PIL import Image

    from elite.fileio import sha256_file

    sources = sorted(p for p in CONCEPT_DIR.iterdir() if p.suffix in (".jpg", ".png") and not p.stem.endswith("_bg"))
    if not sources:
        raise SystemExit(f"no concept images in {CONCEPT_DIR}; set ELITE_TEST_CONCEPTS")
    folder.mkdir(parents=True, exist_ok=True)
    images = {src: Image.open(src).convert("RGB") for src in sources}
    names = []
    for n in range(count):
        src = sources[n % len(sources)]
        image = images[src].copy()
        image.putpixel((0, 0), (n % 256, (n // 256) % 256, 7))  # a tiny change per concept
        name = f"c{n:05d}{src.suffix}"
        if src.suffix == ".jpg":
            image.save(folder / name, quality=95, comment=f"concept {n}".encode())
        else:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("concept", str(n))
            image.save(folder / name, pnginfo=info)
        mask = f"c{n:05d}_bg.png"
        shutil.copyfile(CONCEPT_DIR / f"{src.stem}_bg.png", folder / mask)
        names.append((name, mask))
    digests = {sha256_file(folder / image) for image, _ in names}
    if len(digests) != count:
        raise SystemExit(f"catalog images are not all distinct: {len(digests)} digests for {count} concepts")
    return names


def child_env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_KEY", "PREFECT_PROFILES_PATH")}
    env.update({"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


def run_child(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    """Run one measuring process in its own session (so a timeout ends it and its API server, nothing else)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SystemExit(f"child timed out after {timeout:.0f} s; log: {log}") from None
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"child failed ({code}): {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b * x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def prepare(work: Path, counts: list[int]) -> dict[str, Any]:
    """Tiny models, the concept pool, one catalog folder per count (hard links into the pool), the prompt file."""
    from elite.model.tiny import make_tiny_models

    start = time.perf_counter()
    tiny = make_tiny_models(work / "models")
    models = {"pretrained_model": str(tiny.pretrained_model), "vision_model": str(tiny.vision_model),
              "global_mapper": str(tiny.global_mapper), "local_mapper": str(tiny.local_mapper)}
    pool = build_pool(work / "pool", max(counts))
    for count in counts:
        catalog = work / f"n{count}" / "catalog"
        catalog.mkdir(parents=True)
        for image, mask in pool[:count]:
            for name in (image, mask):
                os.link(work / "pool" / name, catalog / name)
    (work / "prompts.txt").write_text(PROMPT + "\n")
    return {"models": models, "seconds": round(time.perf_counter() - start, 1)}


def config_name(concurrency: str) -> str:
    return "default" if concurrency == "default" else f"c{concurrency}"


def measure(args: argparse.Namespace, work: Path, count: int, models: dict[str, str], concurrency: str,
            profile: bool) -> dict[str, Any]:
    tag = f"{config_name(concurrency)}-n{count}" + ("-profile" if profile else "")
    run_dir = work / tag
    # a fresh output (embedding store, images) per process; the catalog is shared (read only)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "catalog").symlink_to(work / f"n{count}" / "catalog")
    prefect_home = run_dir / "prefect-home"
    result_file = run_dir / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--count", str(count),
           "--work-dir", str(work), "--run-dir", str(run_dir), "--steps", str(args.steps), "--size", str(args.size),
           "--result", str(result_file), "--models", json.dumps(models), "--concurrency", concurrency]
    if profile:
        cmd.append("--profile")
    busy = wait_for_idle(args.wait_idle)
    load = os.getloadavg()
    print(f"[{tag}] fresh process (other processes' CPU before: {busy} cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}) ...", flush=True)
    start = time.perf_counter()
    run_child(cmd, child_env(prefect_home), run_dir / "child.log", args.child_timeout)
    result = json.loads(result_file.read_text())
    result["process_seconds"] = round(time.perf_counter() - start, 1)
    result["before"] = {"other_busy_cores": busy, "load_average": [round(x, 2) for x in load]}
    return result


def summarize(counts: list[int], results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Fits of overhead = a + b * N (and of the API server's CPU seconds), per run kind and overhead definition."""
    fits: dict[str, Any] = {}
    if len(counts) < 2:
        return fits
    for run in ("first", "rerun"):
        for kind in ("overhead_s", "overhead_path_s", "overhead_no_heartbeat_s", "cpu_server_s"):
            a, b = fit_line([float(n) for n in counts], [results[n][run][kind] for n in counts])
            fits[f"{run}.{kind}"] = {"a_s": round(a, 3), "b_ms_per_concept": round(1000 * b, 2)}
    return fits


def print_table(counts: list[int], results: dict[str, dict[int, dict[str, Any]]], fits: dict[str, Any]) -> None:
    head = (f"{'encode':<10} {'N':>5} {'run':<6} {'call s':>7} {'wall s':>7} {'model s':>8} {'io s':>6} "
            f"{'ovh s':>7} {'ms/c':>7} {'path s':>6} {'ms/c':>6} {'hb s':>5} {'cpu s':>6} {'srv s':>6} {'RSS MB':>7} "
            f"{'+RSS':>6} {'thr':>4} {'other':>5}")
    print("\n" + head)
    print("-" * len(head))
    for config, by_count in results.items():
        for n in counts:
            for run in ("first", "rerun"):
                r = by_count[n][run]
                print(f"{config:<10} {n:>5} {run:<6} {r['call_s']:>7.2f} {r['wall_s']:>7.2f} {r['model_s']:>8.2f} "
                      f"{r['io_s']:>6.2f} {r['overhead_s']:>7.2f} {1000 * r['overhead_s'] / n:>7.1f} "
                      f"{r['overhead_path_s']:>6.2f} {1000 * r['overhead_path_s'] / n:>6.1f} "
                      f"{r['heartbeat_in_wall_s']:>5.2f} {r['cpu_process_s']:>6.1f} {r['cpu_server_s']:>6.1f} "
                      f"{r['peak_rss_mib']:>7.0f} "
                      f"{r['rss_growth_mib']:>6.0f} {r['peak_threads']:>4} {r['other_busy_cores']:>5.2f}")
    print("encode: cK = encode_concurrency=K (K encode batches in flight; c2 is the flow's default). call = the "
          "flow call as the caller sees it; wall/model/io = the report's seconds; ovh = wall - model - io (ms/c: per "
          "concept); "
          "path = wall - union of model and io intervals; hb = the subflows' exits waiting for their heartbeat "
          "threads (inside ovh); cpu/srv = CPU seconds of the flow process / the API "
          "server; RSS = the flow process's peak RSS (ru_maxrss) after the run; +RSS = its growth during the run; "
          "thr = peak OS threads; other = cores busy with other processes during the run")
    print("\nwhere 'path' goes, first runs: in task bodies outside model/io | between consecutive encode tasks "
          "(per task) | between generate tasks (per task) | the rest (of which the subflows' heartbeat waits)")
    for config, by_count in results.items():
        for n in counts:
            r = by_count[n]["first"]
            t = r["overhead_path_split"]
            print(f"{config:<10} {n:>5}: {t['in_task_bodies_untimed_s']:6.2f} s | {t['between_encode_tasks_s']:6.2f} s "
                  f"({t['between_encode_tasks_ms_per_task']:5.1f} ms) | {t['between_generate_tasks_s']:6.2f} s "
                  f"({t['between_generate_tasks_ms_per_task']:5.1f} ms) | {t['rest_s']:6.2f} s "
                  f"({r['heartbeat_in_wall_s']:.2f} s)")
    for config, by_count in results.items():
        for n in counts:
            s = by_count[n]["startup"]
            print(f"{config} N={n}: first flow run of the process (ephemeral server start-up) "
                  f"{s['first_flow_s']:.2f} s, a trivial flow run after it {s['steady_flow_s']:.2f} s, RSS before "
                  f"the runs {s['rss_mib']:.0f} MiB")
    for config, config_fits in fits.items():
        for key, fit in config_fits.items():
            print(f"fit {config:<10} {key:<24}: a = {fit['a_s']:7.2f} s per run, b = "
                  f"{fit['b_ms_per_concept']:8.2f} ms per concept")


def flows_modified() -> bool | None:
    """Whether flows/ differs from the commit recorded under machine.code (a read-only git query)."""
    try:
        return bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "flows"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def parent_main(args: argparse.Namespace) -> None:
    import torch
    from _common import announce, exact_command, save_results

    info = announce()
    load_start = [round(x, 2) for x in os.getloadavg()]
    counts = sorted(args.counts)
    temp_work = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="elite-orchestration-bench-"))
    print(f"work folder: {work}")
    started = time.perf_counter()
    try:
        profile_count = (args.profile_only or [max(counts)])[0] if (args.profile or args.profile_only) else None
        setup = prepare(work, sorted(set(counts) | ({profile_count} if profile_count else set())))
        print(f"tiny models and a catalog pool of {max([*counts, profile_count or 0])} concepts: "
              f"{setup['seconds']} s", flush=True)
        results: dict[str, dict[int, dict[str, Any]]] = {}
        if not args.profile_only:
            for count in counts:  # configurations side by side per count, so a busy stretch hits them alike
                for concurrency in args.encode_concurrency:
                    result = measure(args, work, count, setup["models"], concurrency, profile=False)
                    results.setdefault(config_name(concurrency), {})[count] = result
                    first, rerun = result["first"], result["rerun"]
                    print(f"  first: wall {first['wall_s']:.2f} s, overhead {1000 * first['overhead_s'] / count:.1f} "
                          f"ms/concept ({1000 * first['overhead_path_s'] / count:.1f} on the path); rerun: wall "
                          f"{rerun['wall_s']:.2f} s; peak RSS {first['peak_rss_mib']:.0f} MiB", flush=True)
        profiles = {}
        if profile_count is not None:
            for concurrency in args.encode_concurrency:
                profile = measure(args, work, profile_count, setup["models"], concurrency, profile=True)["profile"]
                profiles[config_name(concurrency)] = profile
                print_profile(config_name(concurrency), profile)
        fits = {config: summarize(counts, by_count) for config, by_count in results.items()}
        if results:
            print_table(counts, results, fits)
        payload = {
            "benchmark": "orchestration",
            "command": exact_command(),
            "machine": {**info, "cpu_count": os.cpu_count(), "prefect": version("prefect"),
                        "flows_modified": flows_modified(),
                        "torch_threads": torch.get_num_threads(),
                        "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()],
                        "shared": "2 cores shared with other engineers' processes: see each run's other_busy_cores "
                                  "(during the run) and before (just before its process started)"},
            "settings": {"counts": counts, "encode_concurrency": args.encode_concurrency, "steps": args.steps,
                         "size": args.size, "prompt": PROMPT, "images_per_concept": 1,
                         "encode_batch_size": ENCODE_BATCH, "generate_batch_size": GENERATE_BATCH,
                         "store": "local folder",
                         "prefect": "ephemeral API server (subprocess), fresh PREFECT_HOME per process",
                         "target_ms_per_concept": TARGET_MS},
            "setup_seconds": setup["seconds"],
            "results": {config: {str(n): r for n, r in by_count.items()} for config, by_count in results.items()},
            "fits": fits,
            "profile": profiles or None,
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        path = save_results(args.name, payload, args.out)
        print(f"\nsaved {path} ({payload['total_seconds']} s)")
    finally:
        if temp_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif temp_work:
            print(f"kept {work}")


def print_profile(config: str, profile: dict[str, Any]) -> None:
    print(f"\nprofile [{config}] ({profile['count']} concepts, first run; CPU seconds per thread summed over "
          f"{profile['threads_profiled']} threads; profiler-inflated wall {profile['wall_s']:.1f} s, model "
          f"{profile['model_s']:.1f} s, io {profile['io_s']:.1f} s; API server CPU {profile['cpu_server_s']:.1f} s):")
    for name, seconds in profile["parts"].items():
        print(f"  {seconds:8.2f} s  {name}")
    print("  top functions by own CPU time:")
    for row in profile["top_tottime"][:20]:
        print(f"  {row['tottime']:8.2f} s own, {row['cumtime']:8.2f} s cum, {row['calls']:>8} calls  {row['function']}")


# --------------------------------------------------------------------------------------------------
# child: one count in a fresh process
# --------------------------------------------------------------------------------------------------

INTERVALS: list[tuple[str, float, float]] = []  # every Stopwatch.time interval of the flows: (kind, start, end)
THREADS: list[str] = []  # the thread of each interval, roughly (appended right after it; for the timeline dump)


def record_intervals() -> None:
    """Wrap elite.jobs.common.Stopwatch.time so each interval is also recorded (the jobs' timing is unchanged)."""
    import elite.jobs.common as common

    def timed(self: Any, kind: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            INTERVALS.append((kind, start, end))  # list.append is atomic under the GIL
            THREADS.append(threading.current_thread().name)
            self.add({kind: end - start})

    common.Stopwatch.time = contextlib.contextmanager(timed)  # type: ignore[method-assign]


TASK_BODIES: list[tuple[str, float, float]] = []  # every task body (encode_batch / generate_batch): (kind, start, end)


def record_task_bodies() -> None:
    """Wrap the two tasks' functions (Task.fn) so each body's start and end are recorded."""
    import flows.encode
    import flows.generate

    def timed(kind: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                TASK_BODIES.append((kind, start, time.perf_counter()))
        return body

    flows.encode.encode_batch_task.fn = timed("encode", flows.encode.encode_batch_task.fn)
    flows.generate.generate_batch_task.fn = timed("generate", flows.generate.generate_batch_task.fn)


def timeline(wall: float, intervals: list[tuple[str, float, float]],
             bodies: list[tuple[str, float, float]]) -> dict[str, float]:
    """Where the time outside model and io intervals goes (`wall - union(model, io)`): inside task bodies (our code
    between the Stopwatch intervals), between consecutive task bodies of each phase (the task engine's per-task wall
    cost when batches run one at a time), and the rest (flow runs, planning outside io, submission, reports)."""
    timed = [(s, e) for _, s, e in intervals]
    covered = union_seconds(timed)
    everything = timed + [(s, e) for _, s, e in bodies]
    in_bodies = union_seconds(everything) - covered
    out = {"in_task_bodies_untimed_s": round(in_bodies, 3)}
    gaps_total = 0.0
    for kind in ("encode", "generate"):
        spans = [(s, e) for k, s, e in bodies if k == kind]
        if not spans:
            out[f"between_{kind}_tasks_s"] = 0.0
            out[f"between_{kind}_tasks_ms_per_task"] = 0.0
            continue
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        clipped = [(max(s, lo), min(e, hi)) for s, e in everything if e > lo and s < hi]
        gaps = (hi - lo) - union_seconds(clipped)
        gaps_total += gaps
        out[f"between_{kind}_tasks_s"] = round(gaps, 3)
        out[f"between_{kind}_tasks_ms_per_task"] = round(1000 * gaps / max(len(spans) - 1, 1), 2)
    out["rest_s"] = round(wall - covered - in_bodies - gaps_total, 3)
    return out


HEARTBEAT_WAITS: list[float] = []  # per flow run: seconds its exit waited for the heartbeat thread to stop


def record_heartbeat_waits() -> None:
    """Wrap prefect.flow_engine._send_heartbeats so the time its exit spends joining the heartbeat thread (which
    sleeps in 1 s steps) is recorded: a flow run's end waits up to a second for it."""
    import prefect.flow_engine as engine

    original = engine._send_heartbeats

    @contextlib.contextmanager
    def timed(*args: Any, **kwargs: Any) -> Iterator[None]:
        with original(*args, **kwargs):
            try:
                yield
            finally:
                mark = time.perf_counter()  # the wrapped exit (stop, join) runs right after this
        HEARTBEAT_WAITS.append(time.perf_counter() - mark)

    engine._send_heartbeats = timed  # type: ignore[assignment]


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class Sampler(threading.Thread):
    """Every 50 ms: this process's RSS and OS threads, the API server's RSS; keeps the peaks since `reset`."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.stop = threading.Event()
        self.reset()

    def reset(self) -> None:
        self.peak_rss_kib = self.peak_threads = self.peak_server_rss = 0

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.05):
            status = proc_status()
            self.peak_rss_kib = max(self.peak_rss_kib, status.get("VmRSS", 0))
            self.peak_threads = max(self.peak_threads, status.get("Threads", 0))
            with contextlib.suppress(psutil.Error):
                server = sum(p.memory_info().rss for p in me.children(recursive=True))
                self.peak_server_rss = max(self.peak_server_rss, server)


def server_cpu() -> float:
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def child_main(args: argparse.Namespace) -> None:
    import resource

    profilers = install_thread_profiles() if args.profile else None

    import torch
    from prefect import flow

    from flows.personalize import personalize_catalog

    record_intervals()
    record_task_bodies()
    record_heartbeat_waits()
    run_dir = Path(args.run_dir)
    models = json.loads(args.models)
    concurrency = {} if args.concurrency == "default" else {"encode_concurrency": int(args.concurrency)}

    @flow(name="bench-warmup")
    def warmup() -> int:
        return 1

    sampler = Sampler()
    sampler.start()
    out: dict[str, Any] = {"count": args.count, "torch_threads": torch.get_num_threads()}
    start = time.perf_counter()
    warmup()
    first_flow = time.perf_counter() - start
    steady = []
    for _ in range(3):
        start = time.perf_counter()
        warmup()
        steady.append(time.perf_counter() - start)
    out["startup"] = {"first_flow_s": round(first_flow, 3), "steady_flow_s": round(sorted(steady)[1], 3),
                      "rss_mib": round(proc_status()["VmRSS"] / 1024, 1)}

    runs: list[float] = []

    def one_run() -> dict[str, Any]:
        INTERVALS.clear()
        THREADS.clear()
        TASK_BODIES.clear()
        HEARTBEAT_WAITS.clear()
        sampler.reset()
        rss_before = proc_status()["VmRSS"]
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        own = resource.getrusage(resource.RUSAGE_SELF)
        server0 = server_cpu()
        busy0, total0 = proc_stat()
        start = time.perf_counter()
        report = personalize_catalog(str(run_dir / "catalog"), str(Path(args.work_dir) / "prompts.txt"),
                                     str(run_dir / "out"), **models, steps=args.steps, height=args.size,
                                     width=args.size, encode_batch_size=ENCODE_BATCH,
                                     generate_batch_size=GENERATE_BATCH, **concurrency)
        call = time.perf_counter() - start
        busy1, total1 = proc_stat()
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        server = server_cpu() - server0
        cpu = (own1.ru_utime - own.ru_utime) + (own1.ru_stime - own.ru_stime)
        cores = os.cpu_count() or 1
        machine_busy = cores * (busy1 - busy0) / max(total1 - total0, 1) * call  # core-seconds, whole machine
        seconds = report["seconds"]
        spans = [(s, e) for _, s, e in INTERVALS]
        covered = union_seconds(spans)
        (run_dir / f"timeline-{len(runs)}.json").write_text(json.dumps({
            "call": [start, start + call], "intervals": INTERVALS, "threads": THREADS, "bodies": TASK_BODIES}))
        runs.append(call)
        waits = list(HEARTBEAT_WAITS)  # the subflows' first, the outer flow's last (outside the report's wall)
        in_wall = sum(waits[:-1])
        return {
            "call_s": round(call, 3), "wall_s": round(seconds["wall"], 3), "model_s": round(seconds["model"], 3),
            "io_s": round(seconds["io"], 3),
            "overhead_s": round(seconds["wall"] - seconds["model"] - seconds["io"], 3),
            "model_io_union_s": round(covered, 3),
            "model_union_s": round(union_seconds([(s, e) for k, s, e in INTERVALS if k == "model"]), 3),
            "io_union_s": round(union_seconds([(s, e) for k, s, e in INTERVALS if k == "io"]), 3),
            "overhead_path_s": round(seconds["wall"] - covered, 3),
            "overhead_path_split": timeline(seconds["wall"], INTERVALS, TASK_BODIES),
            "heartbeat_waits_s": [round(w, 3) for w in waits], "heartbeat_in_wall_s": round(in_wall, 3),
            "overhead_no_heartbeat_s": round(seconds["wall"] - seconds["model"] - seconds["io"] - in_wall, 3),
            "cpu_process_s": round(cpu, 2), "cpu_server_s": round(server, 2),
            "other_busy_cores": round(max(0.0, machine_busy - cpu - server) / call, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_before_mib": round(maxrss_before / 1024, 1),
            "rss_growth_mib": round((sampler.peak_rss_kib - rss_before) / 1024, 1),
            "rss_after_mib": round(proc_status()["VmRSS"] / 1024, 1),
            "peak_threads": sampler.peak_threads,
            "server_peak_rss_mib": round(sampler.peak_server_rss / 2**20, 1),
            "encoded": report["encoded"], "encode_skipped": report["encode_skipped"],
            "generated": report["generated"], "generate_skipped": report["generate_skipped"],
            "failed": report["failed"], "tasks": -(-report["encoded"] // ENCODE_BATCH)
            + -(-report["generated"] // GENERATE_BATCH)}

    if profilers is not None:
        import cProfile

        main_profiler = cProfile.Profile(time.thread_time)
        profilers.append(main_profiler)
        main_profiler.enable()
        out["first"] = one_run()
        main_profiler.disable()
    else:
        out["first"] = one_run()
    if out["first"]["failed"] or out["first"]["generated"] != args.count:
        raise SystemExit(f"the run failed items: {out['first']}")
    if profilers is not None:
        out["profile"] = {"count": args.count, **{k: out["first"][k] for k in
                                                 ("wall_s", "model_s", "io_s", "cpu_server_s")},
                          **profile_summary(profilers, run_dir / "profile.pstats")}
    else:
        out["rerun"] = one_run()
    sampler.stop.set()
    Path(args.result).write_text(json.dumps(out, indent=2) + "\n")


# ---- profiling: cProfile in every thread, CPU time per thread ------------------------------------------

def install_thread_profiles() -> list[Any]:
    """A cProfile.Profile (timer: time.thread_time) in every thread started from now on (the main thread's is
    started around the measured run by the caller, so imports and the warm-up flows stay out of it)."""
    import cProfile

    profilers: list[Any] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        profilers.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    return profilers


class _Snapshot:
    """What pstats.Stats needs of a profile, without disabling it (threads still running keep their profiler)."""

    def __init__(self, stats: dict[Any, Any]) -> None:
        self.stats = stats

    def create_stats(self) -> None:
        pass


# named parts of the flows and of Prefect: (label, file suffix, function name); cumulative CPU time, summed over threads
PARTS = [
    ("prefect: task runs in worker threads (engine + task body)", "prefect/task_engine.py", "run_task_sync"),
    ("  our task body: encode_batch", "elite/jobs/encode.py", "encode_batch"),
    ("  our task body: generate_batch", "elite/jobs/generate.py", "generate_batch"),
    ("    of which ElitePipeline.device (diffusers walks modules on each use)", "elite/model/pipeline.py", "device"),
    ("prefect: Task.submit / runner.submit (flow thread)", "prefect/task_runners.py", "submit"),
    ("prefect: flow runs (run_flow_sync, outermost: the whole run)", "prefect/flow_engine.py", "run_flow_sync"),
    ("  our flow body: personalize_catalog", "flows/personalize.py", "personalize_catalog"),
    ("  our flow body: encode_concepts", "flows/encode.py", "encode_concepts"),
    ("  our flow body: generate_images", "flows/generate.py", "generate_images"),
    ("  future.result() waits (flow thread)", "prefect/futures.py", "result"),
    ("our planning: list_concepts", "elite/data/sources.py", "list_concepts"),
    ("our planning: plan_encode (flow thread only)", "elite/jobs/encode.py", "plan_encode"),
    ("our planning: _hash (hash threads)", "elite/jobs/encode.py", "_hash"),
    ("our planning: plan_generate / read_info", "elite/jobs/generate.py", "plan_generate"),
    ("our planning: plan_work", "elite/data/prompts.py", "plan_work"),
    ("our planning: _existing (flow thread)", "elite/jobs/generate.py", "_existing"),
    ("our planning: listed (list threads)", "elite/jobs/generate.py", "listed"),
    ("embedding store: _refresh (all threads)", "elite/data/store.py", "_refresh"),
    ("embedding store: _load_part", "elite/data/store.py", "_load_part"),
    ("embedding store: list_parts", "elite/data/store.py", "list_parts"),
    ("embedding store: append", "elite/data/store.py", "append"),
    ("embedding store: read_embeddings", "elite/data/store.py", "read_embeddings"),
    ("embedding store: _index", "elite/data/store.py", "_index"),
    ("reports: put_table", "elite/jobs/common.py", "put_table"),
    ("reports: publish (artifacts)", "flows/_common.py", "publish"),
    ("prefect: API client requests (httpx send, sync)", "httpx/_client.py", "send"),
    ("prefect: log handler emit", "prefect/logging/handlers.py", "emit"),
    ("prefect: events emit", "prefect/events/utilities.py", "emit_event"),
    ("pydantic: model_validate", "pydantic/main.py", "model_validate"),
    ("pydantic: model_dump", "pydantic/main.py", "model_dump"),
]


def profile_summary(profilers: list[Any], dump: Path) -> dict[str, Any]:
    import pstats

    snapshots = []
    for prof in profilers:
        prof.snapshot_stats()  # no disable(): it would act on this thread, not the profiled one
        if prof.stats:
            snapshots.append(_Snapshot(prof.stats))
    stats = pstats.Stats(snapshots[0])
    for snap in snapshots[1:]:
        stats.add(snap)
    stats.dump_stats(str(dump))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]

    def label(func: tuple[str, int, str]) -> str:
        file, line, name = func
        for marker in ("site-packages/", str(REPO) + "/", "/lib/python3"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
        return f"{file}:{line}({name})"

    rows = [{"function": label(func), "calls": nc, "tottime": round(tt, 3), "cumtime": round(ct, 3)}
            for func, (_cc, nc, tt, ct, _callers) in raw.items()]
    parts: dict[str, float] = {}
    for name, suffix, function in PARTS:
        parts[name] = round(sum(ct for (file, _line, fn), (_cc, _nc, _tt, ct, _c) in raw.items()
                                if fn == function and file.endswith(suffix)), 2)
    total = sum(tt for (_cc, _nc, tt, _ct, _c) in raw.values())
    engine = parts["prefect: task runs in worker threads (engine + task body)"] - sum(
        ct for (file, _line, fn), (_cc, _nc, _tt, ct, _c) in raw.items()
        if fn == "call_task_fn" and file.endswith("prefect/task_engine.py"))
    parts = {"all profiled threads, CPU": round(total, 2),
             "prefect: task engine around the task body (run_task_sync - call_task_fn)": round(engine, 2), **parts}
    by_package: dict[str, float] = {}
    for (file, _line, _fn), (_cc, _nc, tt, _ct, _c) in raw.items():
        if "site-packages/" in file:
            key = file.split("site-packages/", 1)[1].split("/", 1)[0]
        elif str(REPO) in file:
            key = file.split(str(REPO) + "/", 1)[1].split("/", 1)[0] + "/"
        elif file == "~":
            key = "builtins (C functions)"
        else:
            key = "stdlib"
        by_package[key] = by_package.get(key, 0.0) + tt
    return {"threads_profiled": len(snapshots), "parts": parts,
            "own_cpu_by_package": {k: round(v, 2) for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])},
            "top_tottime": sorted(rows, key=lambda r: -r["tottime"])[:40],
            "top_cumtime": sorted(rows, key=lambda r: -r["cumtime"])[:60]}


# --------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000], help="catalog sizes to run")
    parser.add_argument("--quick", action="store_true", help="5 and 20 concepts (a smoke run)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per image (default 2)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--encode-concurrency", nargs="+", default=["2", "1"], metavar="K",
                        help="encode_concurrency values side by side (default: 2, the flow's default, and 1); "
                             "'default' leaves the parameter out")
    parser.add_argument("--profile", action="store_true",
                        help="also run the largest count once more per configuration under cProfile (all threads)")
    parser.add_argument("--profile-only", type=int, nargs=1, default=None, metavar="N",
                        help="only the profiled run, of N concepts")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="before each process, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per measuring process")
    parser.add_argument("--work-dir", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--name", default="orchestration", help="results file name under benchmarks/results")
    parser.add_argument("--out", default=None, help="results path (overrides --name)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.counts = [5, 20]
        if args.name == "orchestration":
            args.name = "orchestration_quick"
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
