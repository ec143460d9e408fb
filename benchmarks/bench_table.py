"""The embedding store's two formats side by side: the folder of Parquet parts (`PartStore`, one part per append)
and the Delta Lake table (`EmbeddingStore`, one MERGE per append), at real ELITE sizes: 5 x 768 float32 words,
256 x 768 float16 local tokens (zero on the background patches, about half of them), a 16 x 16 mask.

For each backend (a local folder; moto's S3 server, run in a subprocess of its own) and each N, the same N concepts
are appended to both stores in batches of 8 (the encode flow's batch size), one format after the other for each
batch (the order alternating), and also written as ONE Parquet file (pyarrow, row groups of 16, untimed: the
reference for selective reads). Then, per format:

- append throughput (concepts/s over all appends, and ms per batch early and late in the run: growth with N),
- read of 8 chosen ids (`read_arrays`), median over several id sets (the same sets for every format): from a
  fresh store object (the index of every data file loaded first) and from a warm one (index loaded),
- read of all concepts in chunks of --read-chunk ids (memory bounded), with the peak RSS of this process
  during the read (the kernel's high-water mark, reset before it; /proc/self/clear_refs),
- data files: the parts (the part format has no compaction) and the table's before and after
  `optimize(z_order=True)` (timed), then the table's read-8 after compaction,
- the reference: the 8 ids read from the single file by row-group selection (pyarrow, footer statistics of
  concept_id), decoded with the store's own `ArraysBuilder`: what any reader of a Parquet file pays,
- where a read-8 goes (opening the table's log, loading the index, the read; a warm object's refresh), and
  delta-rs's own MERGE metrics (execution time early and late, files scanned and skipped) from the history,
- a bulk export (`elite.jobs.export.export_embeddings(store, dest, "parquet")`) of each store in a fresh process:
  its peak RSS (VmHWM of that process: its ru_maxrss would report this process's RSS, inherited through the fork
  and kept across the exec) and seconds, to show memory is flat in N,
- how many cores other processes kept busy during each phase (/proc/stat): the machine may be shared;
  --wait-idle waits for it to go quiet before each case.

On S3, the store's ranged GETs and HEADs (S3Store.read_range / open) are counted: they, not moto's speed, are what
a read costs on real S3. moto answers every ranged GET by reading the whole object, so reads of large
(compacted, ~200 MB) files are much slower on moto than on S3 (one 64 KiB GET of a part and of the largest
compacted file is timed to show it); moto keeps objects under 5 MiB in memory. S3 runs at N <= --s3-max-concepts
(1000 by default): at 10^4 moto's memory, the z-order's (~9.5 GB) and the run time go beyond this 2-core,
23 GiB machine's budget (docs/benchmarks.md, section 6).

Targets (PASS/FAIL printed): at the largest N >= 10^4, the table's read-8 after compaction within 1.5x of the
single-file read (warm objects); at N = 10^3, the table's read-8 no slower than the part store's (warm and fresh,
within a 5% noise allowance).

    python benchmarks/bench_table.py --quick                         # N = 160, local and S3 (~45 s)
    python benchmarks/bench_table.py --wait-idle 60                  # 1000, 10000 local; 1000 on S3 (~13 min)
    python benchmarks/bench_table.py --sizes 1000,10000 --backends local,s3 --s3-max-concepts 10000

Results: benchmarks/results/table.json (--quick: table_quick.json). Everything written (stores, reference files,
exports, moto's objects) is deleted at the end (--keep keeps the local folders).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deltalake
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import announce, exact_command, gemm_probe, save_results

from elite.data.part_index import PartIndex
from elite.data.parts_store import PartStore
from elite.data.s3 import S3Store, StorageSettings
from elite.data.storage import ObjectStorePartStorage
from elite.data.store import EmbeddingStore
from elite.data.store_format import (
    CORE_SCHEMA,
    DEFAULT_ROW_GROUP_ROWS,
    TENSOR_COLUMNS,
    WRITE_OPTIONS,
    ArraysBuilder,
    EmbeddingRecord,
    StoredArrays,
    plain_table,
    record_batch,
)
from elite.fileio import sha256_bytes

REPO = Path(__file__).resolve().parent.parent
GRID, TEXT_DIM, WORDS = 16, 768, 5
PATCHES = GRID * GRID
ENCODER = "encoder-0"
BUCKET = "elite-bench"
FORMATS = ("parts", "table")
MIB = 2**20
READ_8_TARGET = 1.5  # table read-8 after compaction / single-file read-8, at N >= 10^4
NOISE = 1.05  # "no slower": within 5%, this VM's run-to-run noise (docs/benchmarks.md)
METADATA_SCHEMA = [pa.field("class_word", pa.string()), pa.field("price", pa.float64()), pa.field("sku", pa.string())]


# ---- data ----------------------------------------------------------------------------------------

def concept_id(i: int) -> str:
    return f"sku-{i:06d}"


def make_batch(start: int, count: int, seed: int = 0) -> list[EmbeddingRecord]:
    """Concepts start .. start + count - 1, deterministic per (seed, start): blob masks covering ~20-80% of the
    grid (about half on average), local tokens zero outside them, as a masked concept's are."""
    rng = np.random.default_rng([seed, start])
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    centres = rng.uniform(4, 12, size=(count, 2))
    radii = rng.uniform(4, 8, size=count)
    masks = ((ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2
             <= radii[:, None, None] ** 2).astype(np.uint8)  # (count, grid, grid)
    tokens = rng.standard_normal((count, PATCHES, TEXT_DIM), dtype=np.float32) * 0.5
    tokens *= masks.reshape(count, PATCHES, 1)
    words = rng.standard_normal((count, WORDS, TEXT_DIM), dtype=np.float32)
    half = tokens.astype(np.float16)
    return [EmbeddingRecord(concept_id(i), f"s3://catalog/images/{i}.jpg", sha256_bytes(b"image %d" % i),
                            sha256_bytes(b"mask %d" % i), ENCODER, words[k], half[k], masks[k],
                            {"class_word": "shoe", "sku": f"SKU-{i}", "price": 10.0 + i})
            for k, i in enumerate(range(start, start + count))]


def check_rows(arrays: StoredArrays, batch: int, seed: int) -> None:
    """The rows read equal, bit for bit, the records they were made from."""
    for n, cid in enumerate(arrays.concept_ids):
        i = int(cid.split("-")[1])
        start = i - i % batch
        record = make_batch(start, batch, seed)[i - start]
        assert arrays.local_tokens[n].tobytes() == record.local_tokens.tobytes(), cid
        assert arrays.words[n].tobytes() == record.words.tobytes(), cid
        assert arrays.mask_grid[n].tobytes() == record.mask_grid.tobytes(), cid


# ---- measuring -----------------------------------------------------------------------------------

def seconds(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def _status_mib(field_name: str, pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> float:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; returns that RSS in MiB."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_mib("VmRSS")


def peak_rss() -> float:
    return _status_mib("VmHWM")


@dataclass
class S3Counter:
    """Counts the store's S3 requests made from this process (deltalake's own, in Rust, are not seen)."""

    heads: int = 0
    gets: int = 0
    bytes: int = 0
    installed: bool = field(default=False, repr=False)

    def install(self) -> None:
        if self.installed:
            return
        read_range, open_ = S3Store.read_range, S3Store.open
        counter = self

        def counted_read_range(store: S3Store, key: str, start: int, end: int, etag: str) -> bytes:
            data = read_range(store, key, start, end, etag)
            counter.gets += 1
            counter.bytes += len(data)
            return data

        def counted_open(store: S3Store, key: str) -> Any:
            counter.heads += 1
            return open_(store, key)

        S3Store.read_range = counted_read_range  # type: ignore[method-assign,assignment]
        S3Store.open = counted_open  # type: ignore[method-assign,assignment]
        self.installed = True

    def snapshot(self) -> tuple[int, int, int]:
        return self.heads, self.gets, self.bytes


COUNTER = S3Counter()


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (from /proc/stat; USER_HZ = 100)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class LoadMeter:
    """How many cores other processes (not this one, its waited-for children, or moto) kept busy meanwhile:
    this 2-core machine is shared, and a competing process slows every figure."""

    def __init__(self, moto: MotoProcess | None) -> None:
        self.moto_pid = moto.process.pid if moto is not None else None
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        if self.moto_pid is not None:
            ours += _process_cpu_s(self.moto_pid)
        return time.perf_counter(), _machine_busy_s(), ours

    def other_cores(self) -> float:
        wall, busy, ours = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        return round(max(0.0, busy - ours) / max(wall, 1e-9), 2)


def idle_cores(seconds: float = 1.0) -> float:
    """Cores busy on the machine while this process sleeps (anything well above 0: another process competes)."""
    wall, busy = time.perf_counter(), _machine_busy_s()
    time.sleep(seconds)
    return round((_machine_busy_s() - busy) / (time.perf_counter() - wall), 2)


def wait_for_idle(limit_s: float, threshold: float = 0.3) -> float:
    """Wait (up to `limit_s`) until other processes use under `threshold` cores; returns the last reading."""
    deadline = time.perf_counter() + limit_s
    busy = idle_cores()
    while busy > threshold and time.perf_counter() < deadline:
        print(f"  {busy} cores busy by other processes; waiting", flush=True)
        time.sleep(5)
        busy = idle_cores()
    if busy > threshold:
        print(f"  WARNING: {busy} cores busy by other processes: the figures below are slowed", flush=True)
    return busy


# ---- backends ------------------------------------------------------------------------------------

class MotoProcess:
    """tests/s3_server.py's MotoS3 (moto's real HTTP server) in a subprocess of its own: its objects and its CPU
    stay out of the measuring process (moto is Python: in a thread it would share this process's GIL)."""

    SCRIPT = ("import logging, sys\n"
              "sys.path.insert(0, 'tests')\n"
              "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
              "from s3_server import MotoS3\n"
              f"server = MotoS3({BUCKET!r})\n"
              "server.start()\n"
              "server.create_bucket()\n"
              "print(server.port, flush=True)\n"
              "sys.stdin.read()\n"
              "server.stop()\n")

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT], cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not start (said {line!r})")
        self.port = int(line)

    def settings(self) -> StorageSettings:
        return StorageSettings(endpoint_url=f"http://127.0.0.1:{self.port}", region="us-east-1",
                               access_key_id="testing", secret_access_key="testing", max_attempts=2,
                               connect_timeout=5.0, read_timeout=120.0)

    def env(self) -> dict[str, str]:
        s = self.settings()
        return {"ELITE_S3_ENDPOINT_URL": str(s.endpoint_url), "ELITE_S3_REGION": "us-east-1",
                "ELITE_S3_ACCESS_KEY_ID": "testing", "ELITE_S3_SECRET_ACCESS_KEY": "testing",
                "ELITE_S3_READ_TIMEOUT": "120"}

    def rss_mib(self) -> dict[str, float]:
        return {"rss_mib": round(_status_mib("VmRSS", self.process.pid), 1),
                "peak_rss_mib": round(_status_mib("VmHWM", self.process.pid), 1)}

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Location:
    """Where one (backend, N) case keeps its two stores and the reference file."""

    backend: str
    root: str  # a local folder, or s3://bucket/prefix
    moto: MotoProcess | None = None
    s3_stores: dict[str, S3Store] = field(default_factory=dict)

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def object_store(self, name: str) -> S3Store:
        if name not in self.s3_stores:  # one boto3 client per location, shared by fresh store objects
            assert self.moto is not None
            self.s3_stores[name] = S3Store(BUCKET, self.root.split("/", 3)[3] + "/" + name, self.moto.settings())
        return self.s3_stores[name]

    def open(self, fmt: str) -> PartIndex:
        """A new store object of the format (the S3 client is reused: a fresh object, not a fresh process)."""
        if self.backend == "local":
            path = self.uri(fmt)
            return PartStore(path) if fmt == "parts" else EmbeddingStore(path)
        storage = ObjectStorePartStorage(self.object_store(fmt))
        if fmt == "parts":
            return PartStore(storage)
        store = self.object_store(fmt)
        return EmbeddingStore(self.uri(fmt), storage=storage, storage_options=store.delta_storage_options())

    def data_bytes(self, fmt: str, store: PartIndex) -> int:
        names = set(store._listing())
        if self.backend == "local":
            root = Path(self.uri(fmt))
            return sum((root / name).stat().st_size for name in names)
        return sum(info.size for info in self.object_store(fmt).list() if info.key in names)


# ---- the single-file reference -------------------------------------------------------------------

class SingleFile:
    """The same rows as one Parquet file, row groups of 16, written as the batches come (untimed)."""

    def __init__(self, path: Path, row_group_rows: int) -> None:
        self.path = path
        self.row_group_rows = row_group_rows
        self.schema = pa.schema([*CORE_SCHEMA, *METADATA_SCHEMA])
        plain = [name for name in self.schema.names if name not in TENSOR_COLUMNS]
        self.writer = pq.ParquetWriter(str(path), self.schema, **WRITE_OPTIONS, compression_level=1,
                                       use_dictionary=plain, write_statistics=plain)
        self.pending: list[EmbeddingRecord] = []
        self.now = time.time()

    def add(self, records: Sequence[EmbeddingRecord]) -> None:
        self.pending += records
        while len(self.pending) >= self.row_group_rows:
            self._flush(self.pending[:self.row_group_rows])
            self.pending = self.pending[self.row_group_rows:]

    def _flush(self, records: list[EmbeddingRecord]) -> None:
        now = datetime.datetime.fromtimestamp(self.now, datetime.UTC)
        self.writer.write_batch(record_batch(records, self.schema, now), row_group_size=self.row_group_rows)

    def close(self) -> None:
        if self.pending:
            self._flush(self.pending)
        self.writer.close()


class SingleFileReader:
    """Read chosen ids from the single file: row groups found from the footer's concept_id min/max statistics,
    read with pyarrow, decoded into the store's arrays (`ArraysBuilder`)."""

    def __init__(self, open_file: Callable[[], Any]) -> None:
        self.open_file = open_file
        self.footer: Any = None
        self.ranges: tuple[list[str], list[str]] | None = None

    def _groups(self, footer: Any) -> tuple[list[str], list[str]]:
        column = footer.schema.to_arrow_schema().get_field_index("concept_id")
        stats = [footer.row_group(g).column(column).statistics for g in range(footer.num_row_groups)]
        return [s.min for s in stats], [s.max for s in stats]

    def read(self, ids: Sequence[str], warm: bool) -> StoredArrays:
        with self.open_file() as source:
            if warm and self.footer is not None:
                parquet = pq.ParquetFile(source, metadata=self.footer)
                lows, highs = self.ranges  # type: ignore[misc]
            else:
                parquet = pq.ParquetFile(source)
                lows, highs = self._groups(parquet.metadata)
                self.footer, self.ranges = parquet.metadata, (lows, highs)
            position = {cid: n for n, cid in enumerate(ids)}
            wanted: dict[int, list[str]] = {}
            for cid in ids:
                group = int(np.searchsorted(lows, cid, side="right")) - 1  # row groups sorted by concept_id
                if group < 0 or highs[group] < cid:
                    raise KeyError(cid)
                wanted.setdefault(group, []).append(cid)
            out = ArraysBuilder(len(ids))
            for group, cids in sorted(wanted.items()):
                table = plain_table(parquet.read_row_group(group, use_threads=False))
                in_group = table.column("concept_id").to_pylist()
                table = table.take(pa.array([in_group.index(cid) for cid in cids]))
                out.put(np.array([position[cid] for cid in cids]), table, str(self.path_hint))
            return out.build()

    path_hint = "single file"


# ---- one case ------------------------------------------------------------------------------------

def id_sets(n: int, repeats: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[concept_id(int(i)) for i in rng.choice(n, 8, replace=False)] for _ in range(repeats)]


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 2)


def read8(location: Location, sets: list[list[str]], warm_readers: dict[str, Any],
          fresh_repeats: int, reference: SingleFileReader | None, formats: Sequence[str]) -> dict[str, Any]:
    """Median ms of read_arrays(8 ids) per format (and the reference), fresh and warm; S3 request counts."""
    samples: dict[str, dict[str, list[float]]] = {name: {"fresh": [], "warm": []} for name in [*formats, "single"]}
    requests: dict[str, dict[str, list[tuple[int, int, int]]]] = {name: {"fresh": [], "warm": []}
                                                                  for name in samples}
    names = [*formats, *(["single"] if reference is not None else [])]
    for repeat, ids in enumerate(sets):
        order = names if repeat % 2 else list(reversed(names))
        for name in order:
            for mode in ("warm", "fresh"):
                if mode == "fresh" and repeat >= fresh_repeats:
                    continue
                before = COUNTER.snapshot()
                if name == "single":
                    assert reference is not None
                    elapsed, arrays = seconds(reference.read, ids, mode == "warm")
                elif mode == "fresh":
                    elapsed, arrays = seconds(lambda name, ids: location.open(name).read_arrays(ids), name, ids)
                else:
                    elapsed, arrays = seconds(warm_readers[name].read_arrays, ids)
                after = COUNTER.snapshot()
                assert arrays.concept_ids == ids, (name, mode)
                samples[name][mode].append(elapsed)
                requests[name][mode].append(tuple(a - b for a, b in zip(after, before, strict=True)))  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {f"{mode}_ms": median_ms(values) for mode, values in samples[name].items() if values}
        out[name].update({f"{mode}_ms_all": [round(1000 * v, 2) for v in values]
                          for mode, values in samples[name].items() if values})
        if location.backend == "s3":
            for mode, counts in requests[name].items():
                if counts:
                    heads, gets, fetched = (statistics.median(c[k] for c in counts) for k in range(3))
                    out[name][f"{mode}_s3"] = {"heads": heads, "ranged_gets": gets, "MB": round(fetched / 1e6, 2)}
    return out


def read_all(reader: PartIndex, ids: list[str], chunk: int, batch: int, seed: int) -> dict[str, Any]:
    """All ids in chunks of `chunk`, a few rows of each chunk checked; seconds and peak RSS (MiB) during it."""
    before = COUNTER.snapshot()
    baseline = reset_peak_rss()
    start = time.perf_counter()
    checked = 0
    for first in range(0, len(ids), chunk):
        arrays = reader.read_arrays(ids[first:first + chunk])
        elapsed_check = time.perf_counter()
        sample = [0, len(arrays) - 1]
        check_rows(StoredArrays([arrays.concept_ids[i] for i in sample], arrays.words[sample],
                                arrays.local_tokens[sample], arrays.mask_grid[sample], [], [], [], [],
                                arrays.created_at[sample], {}), batch, seed)
        checked += 2
        start += time.perf_counter() - elapsed_check  # checking is not reading
        del arrays
    elapsed = time.perf_counter() - start
    peak = peak_rss()
    after = COUNTER.snapshot()
    out: dict[str, Any] = {"s": round(elapsed, 2), "concepts_per_s": round(len(ids) / elapsed, 1),
           "peak_rss_mib": round(peak, 1), "peak_rss_over_start_mib": round(peak - baseline, 1),
           "rows_checked": checked}
    if after != before:
        out["s3"] = {"heads": after[0] - before[0], "ranged_gets": after[1] - before[1],
                     "MB": round((after[2] - before[2]) / 1e6, 1)}
    return out


def breakdown(location: Location, fmt: str, ids: list[str], warm_reader: PartIndex) -> dict[str, float]:
    """Where a read-8 goes (one fresh object, ms): opening the table's log, loading the index of every data file
    (footers and key columns), the read itself; and a warm object's refresh before each read (the listing)."""
    store = location.open(fmt)
    out: dict[str, float] = {}
    if isinstance(store, EmbeddingStore):
        out["open_log_ms"] = round(1000 * seconds(store.table)[0], 1)
    out["load_index_ms"] = round(1000 * seconds(store._refresh)[0], 1)
    out["read_ms"] = round(1000 * seconds(store.read_arrays, ids)[0], 1)
    refresh = [seconds(warm_reader._refresh)[0] for _ in range(5)]
    out["warm_refresh_ms"] = median_ms(refresh)
    return out


def merge_metrics(store: EmbeddingStore) -> dict[str, Any]:
    """delta-rs's own MERGE metrics from the table's history: execution time early and late in the run, and how
    many target files each MERGE scanned (file skipping by the IN list of ids)."""
    merges = sorted((h for h in store.history() if h.get("operation") == "MERGE"), key=lambda h: h["version"])
    if not merges:
        return {}
    tenth = max(1, len(merges) // 10)

    def figures(part: list[dict[str, Any]]) -> dict[str, Any]:
        metrics = [h.get("operationMetrics", {}) for h in part]
        return {name: statistics.median(float(m.get(name, 0)) for m in metrics) for name in (
            "execution_time_ms", "scan_time_ms", "rewrite_time_ms", "num_target_files_scanned",
            "num_target_files_skipped_during_scan")}

    return {"first_tenth_median": figures(merges[:tenth]), "last_tenth_median": figures(merges[-tenth:])}


def ranged_get_ms(store: S3Store, key: str, reps: int = 5) -> float:
    """Median ms of a 64 KiB ranged GET of `key` (moto copies the whole object for each: it grows with the size)."""
    head = store.client.head_object(Bucket=BUCKET, Key=store._key(key))
    return median_ms([seconds(store.read_range, key, 0, 65536, head["ETag"])[0] for _ in range(reps)])


def run_case(location: Location, n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    seed, batch = args.seed, args.batch
    print(f"\n== {location.backend}, N = {n}: appending in batches of {batch} ==", flush=True)
    busy_before = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else idle_cores()
    load: dict[str, float] = {}
    meter = LoadMeter(location.moto)
    writers: dict[str, Any] = {fmt: location.open(fmt) for fmt in FORMATS}
    single_path = work / f"single-{location.backend}-{n}.parquet"
    single = SingleFile(single_path, DEFAULT_ROW_GROUP_ROWS)
    times: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    zero_patches: list[float] = []
    probe_start = gemm_probe()
    wall = time.perf_counter()
    for number, start in enumerate(range(0, n, batch)):
        records = make_batch(start, min(batch, n - start), seed)
        zero_patches += [1.0 - float(r.mask_grid.mean()) for r in records]
        for fmt in FORMATS if number % 2 else reversed(FORMATS):
            elapsed, appended = seconds(writers[fmt].append, records)
            assert appended.written == len(records), (fmt, appended)
            times[fmt].append(elapsed)
        single.add(records)
        if (number + 1) % max(1, (n // batch) // 10) == 0:
            done = min(n, start + batch)
            print(f"  {done:6d} concepts  parts {done / sum(times['parts']):6.1f}/s  "
                  f"table {done / sum(times['table']):6.1f}/s  ({time.perf_counter() - wall:.0f} s)", flush=True)
    single.close()
    load["append"] = meter.other_cores()
    if location.backend == "s3":
        location.object_store("single").put("single.parquet", single_path)
        single_bytes = single_path.stat().st_size
        single_path.unlink()
        store = location.object_store("single")
        reference = SingleFileReader(lambda: pa.PythonFile(store.open("single.parquet"), mode="r"))
    else:
        single_bytes = single_path.stat().st_size
        reference = SingleFileReader(lambda: pa.memory_map(str(single_path)))
    tenth = max(1, len(times["parts"]) // 10)
    result: dict[str, Any] = {
        "concepts": n, "batch": batch, "batches": len(times["parts"]),
        "zero_patch_fraction": round(float(np.mean(zero_patches)), 3),
        "gemm_probe_gflops": round(probe_start, 1),
        "append": {fmt: {"concepts_per_s": round(n / sum(times[fmt]), 1), "s": round(sum(times[fmt]), 2),
                         "first_tenth_ms_per_batch": median_ms(times[fmt][:tenth]),
                         "last_tenth_ms_per_batch": median_ms(times[fmt][-tenth:]),
                         "ms_per_batch_by_tenth": [median_ms(times[fmt][k * tenth:(k + 1) * tenth])
                                                   for k in range(len(times[fmt]) // tenth)][:10]}
                   for fmt in FORMATS},
        "single_file": {"MB": round(single_bytes / 1e6, 1)},
        "busy_cores_before": busy_before, "other_busy_cores": load,
    }
    print(f"  append: {result['append']}", flush=True)

    files = {"parts": len(writers["parts"].part_names()), "table_before": len(writers["table"]._listing())}
    sizes = {"parts_MB": round(location.data_bytes("parts", writers["parts"]) / 1e6, 1),
             "table_before_MB": round(location.data_bytes("table", writers["table"]) / 1e6, 1)}
    table_version_before = writers["table"].version()

    # warm readers: their index loaded by one untimed read
    meter = LoadMeter(location.moto)
    sets = id_sets(n, args.repeats, seed + n)
    warm = {fmt: location.open(fmt) for fmt in FORMATS}
    open_index: dict[str, float] = {}
    for fmt in FORMATS:
        open_index[fmt] = round(1000 * seconds(warm[fmt].read_arrays, sets[0][:1])[0], 1)
    result["open_index_ms"] = open_index
    reference.read(sets[0], warm=False)
    print(f"  files {files}, sizes {sizes}; opening the index of every file (first read): "
          f"{result['open_index_ms']} ms", flush=True)
    result["read8_before"] = read8(location, sets, warm, args.fresh_repeats, reference, FORMATS)
    result["read8_breakdown_before"] = {fmt: breakdown(location, fmt, sets[-1], warm[fmt]) for fmt in FORMATS}
    result["merge_metrics"] = merge_metrics(writers["table"])
    print(f"  read 8 breakdown: {result['read8_breakdown_before']}; MERGE metrics: {result['merge_metrics']}",
          flush=True)
    print(f"  read 8 (as appended): {_brief(result['read8_before'])}", flush=True)

    ids = [concept_id(i) for i in range(n)]
    result["read_all"] = {}
    for fmt in FORMATS:
        result["read_all"][fmt] = read_all(warm[fmt], ids, args.read_chunk, batch, seed)
        print(f"  read all ({fmt}, chunks of {args.read_chunk}): {result['read_all'][fmt]}", flush=True)

    load["reads"] = meter.other_cores()
    table_writer: EmbeddingStore = writers["table"]
    meter = LoadMeter(location.moto)
    baseline = reset_peak_rss()
    elapsed, metrics = seconds(functools.partial(table_writer.optimize, z_order=True))
    compaction_peak = peak_rss()
    load["compaction"] = meter.other_cores()
    meter = LoadMeter(location.moto)
    files["table_after"] = len(writers["table"]._listing())
    sizes["table_after_MB"] = round(location.data_bytes("table", writers["table"]) / 1e6, 1)
    result["compaction"] = {"s": round(elapsed, 2), "files_added": metrics.get("numFilesAdded"),
                            "files_removed": metrics.get("numFilesRemoved"),
                            "version_before": table_version_before, "version_after": writers["table"].version(),
                            "peak_rss_mib": round(compaction_peak, 1),
                            "peak_rss_over_start_mib": round(compaction_peak - baseline, 1)}
    result["files"], result["sizes"] = files, sizes
    print(f"  optimize(z_order=True): {result['compaction']}; files {files}", flush=True)
    warm["table"].read_arrays(sets[0][:1])  # the warm reader loads the compacted files' index, untimed
    result["read8_after"] = read8(location, sets, {"table": warm["table"]}, args.fresh_repeats, reference,
                                  ["table"])
    result["read8_breakdown_after"] = {"table": breakdown(location, "table", sets[-1], warm["table"])}
    print(f"  read 8 breakdown (table compacted): {result['read8_breakdown_after']}", flush=True)
    if location.backend == "s3":
        parts_store, table_store = location.object_store("parts"), location.object_store("table")
        small = writers["parts"].part_names()[0]
        largest = max(table_store.list(), key=lambda info: info.size)
        result["moto_ranged_get_64KiB_ms"] = {
            f"part ({location.data_bytes('parts', writers['parts']) / 1e6 / files['parts']:.1f} MB)":
                ranged_get_ms(parts_store, small),
            f"compacted file ({largest.size / 1e6:.0f} MB)": ranged_get_ms(table_store, largest.key)}
        print(f"  moto: one 64 KiB ranged GET: {result['moto_ranged_get_64KiB_ms']} ms", flush=True)
    print(f"  read 8 (table compacted): {_brief(result['read8_after'])}", flush=True)
    if not args.skip_read_all_after:
        result["read_all_after"] = {"table": read_all(warm["table"], ids, args.read_chunk, batch, seed)}
        print(f"  read all (table compacted): {result['read_all_after']['table']}", flush=True)
    load["reads_after"] = meter.other_cores()
    print(f"  other processes kept busy (cores): {load}; before the case: {busy_before}", flush=True)
    if location.moto is not None:
        result["moto"] = location.moto.rss_mib()
    return result


def _brief(figures: dict[str, Any]) -> str:
    return ", ".join(f"{name} fresh {f.get('fresh_ms')} / warm {f.get('warm_ms')} ms" for name, f in figures.items())


# ---- export in a fresh process -------------------------------------------------------------------

EXPORT_SCRIPT = """
import json, resource, sys, time
from elite.jobs.export import export_embeddings

def status(name):  # ru_maxrss would report the parent's RSS: it survives the fork and the exec
    for line in open('/proc/self/status'):
        if line.startswith(name + ':'):
            return int(line.split()[1]) / 1024.0

store, dest = sys.argv[1], sys.argv[2]
start_rss = status('VmRSS')
start = time.perf_counter()
manifest = export_embeddings(store, dest, 'parquet')
elapsed = time.perf_counter() - start
print(json.dumps({'s': round(elapsed, 2), 'exported': manifest['exported'], 'shards': manifest['shard_count'],
                  'rss_after_imports_mib': round(start_rss, 1),
                  'peak_rss_mib': round(status('VmHWM'), 1),
                  'ru_maxrss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}))
"""


def export_in_subprocess(store_uri: str, dest: Path, env: dict[str, str]) -> dict[str, Any]:
    """export_embeddings(store_uri, dest, "parquet") in a fresh interpreter (subprocess: forking after deltalake
    was used hangs); its own ru_maxrss, and the exported bytes."""
    done = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, store_uri, str(dest)], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"export of {store_uri} failed (rc {done.returncode}): {done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["MB_written"] = round(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1e6, 1)
    shutil.rmtree(dest, ignore_errors=True)
    return dict(figures)


# ---- targets -------------------------------------------------------------------------------------

def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for backend, cases in results.items():
        big = [n for n in cases if int(n) >= 10_000]
        for n in big:
            case = cases[n]
            single, table = case["read8_after"]["single"], case["read8_after"]["table"]
            for mode in ("warm", "fresh"):
                ratio = table[f"{mode}_ms"] / single[f"{mode}_ms"]
                out.append({"target": f"{backend} N={n}: table read-8 after compaction <= {READ_8_TARGET}x the "
                                      f"single-file read ({mode})", "ratio": round(ratio, 2),
                            "table_ms": table[f"{mode}_ms"], "reference_ms": single[f"{mode}_ms"],
                            "pass": ratio <= READ_8_TARGET, "primary": mode == "warm"})
        if "1000" in cases:
            case = cases["1000"]["read8_before"]
            for mode in ("warm", "fresh"):
                ratio = case["table"][f"{mode}_ms"] / case["parts"][f"{mode}_ms"]
                out.append({"target": f"{backend} N=1000: table read-8 no slower than the part store ({mode}, "
                                      f"5% allowance)", "ratio": round(ratio, 2),
                            "table_ms": case["table"][f"{mode}_ms"], "reference_ms": case["parts"][f"{mode}_ms"],
                            "pass": ratio <= NOISE, "primary": True})
    return out


# ---- main ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def moto_server(needed: bool) -> Iterator[MotoProcess | None]:
    if not needed:
        yield None
        return
    server = MotoProcess()
    try:
        yield server
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="concept counts, comma-separated")
    parser.add_argument("--backends", default="local,s3", help="local, s3 or both, comma-separated")
    parser.add_argument("--s3-max-concepts", type=int, default=1000,
                        help="largest N run on S3 (moto holds small objects in memory and copies whole objects "
                             "per ranged GET); default 1000")
    parser.add_argument("--quick", action="store_true", help="N = 160 on each backend, 3 repeats (~1 min)")
    parser.add_argument("--batch", type=int, default=8, help="concepts per append (the encode flow's batch)")
    parser.add_argument("--repeats", type=int, default=9, help="id sets for read-8 (warm: all of them)")
    parser.add_argument("--fresh-repeats", type=int, default=3, help="of those, how many also from a fresh object")
    parser.add_argument("--read-chunk", type=int, default=500, help="ids per read_arrays call in the read of all")
    parser.add_argument("--no-export", action="store_true", help="skip the bulk export runs")
    parser.add_argument("--skip-read-all-after", action="store_true", help="skip the read of all after compaction")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before each case, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="parent of the temporary work folder (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the local work folder")
    parser.add_argument("--out", default=None, help="results path (default benchmarks/results/table.json; "
                                                     "--quick: table_quick.json)")
    args = parser.parse_args()
    sizes = [160] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    if args.quick:
        args.repeats, args.fresh_repeats = min(args.repeats, 3), min(args.fresh_repeats, 1)
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - {"local", "s3"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    info = announce()
    run_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-table-", dir=args.work_dir))
    results: dict[str, dict[str, Any]] = {}
    exports: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    moto_peak: dict[str, float] = {}
    try:
        with moto_server("s3" in backends) as moto:
            if moto is not None:
                COUNTER.install()
            for backend in backends:
                for n in sizes:
                    if backend == "s3" and n > args.s3_max_concepts:
                        skipped.append(f"s3 N={n} (over --s3-max-concepts {args.s3_max_concepts})")
                        print(f"\n== s3, N = {n}: skipped (--s3-max-concepts {args.s3_max_concepts}) ==")
                        continue
                    if backend == "local":
                        location = Location("local", str(work / f"local-{n}"))
                    else:
                        assert moto is not None
                        location = Location("s3", f"s3://{BUCKET}/run-{n}", moto)
                    results.setdefault(backend, {})[str(n)] = run_case(location, n, args, work)
                    if not args.no_export:
                        env = moto.env() if moto is not None and backend == "s3" else {}
                        for fmt in FORMATS:
                            figures = export_in_subprocess(location.uri(fmt), work / f"export-{backend}-{n}-{fmt}",
                                                           env)
                            exports.setdefault(backend, {}).setdefault(str(n), {})[fmt] = figures
                            print(f"  export ({fmt}, table compacted): {figures}", flush=True)
                    if backend == "s3":
                        _delete_prefix(location)
                    elif not args.keep:
                        shutil.rmtree(location.root, ignore_errors=True)
            if moto is not None:
                moto_peak = moto.rss_mib()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    verdicts = targets(results)
    print("\n== targets ==")
    for verdict in verdicts:
        print(f"  {'PASS' if verdict['pass'] else 'FAIL'}  {verdict['target']}: {verdict['table_ms']} ms vs "
              f"{verdict['reference_ms']} ms ({verdict['ratio']}x)")
    print_table(results, exports)
    payload = {
        "benchmark": "table", "command": exact_command(),
        "machine": {**info, "pyarrow": pa.__version__, "deltalake": deltalake.__version__,
                    "numpy": np.__version__, "tmp": str(work.parent),
                    "wall_s": round(time.perf_counter() - run_start, 1)},
        "settings": {"sizes": sizes, "backends": backends, "batch": args.batch, "repeats": args.repeats,
                     "fresh_repeats": args.fresh_repeats, "read_chunk": args.read_chunk,
                     "s3_max_concepts": args.s3_max_concepts, "row_group_rows": DEFAULT_ROW_GROUP_ROWS,
                     "grid": GRID, "text_dim": TEXT_DIM, "words": WORDS, "seed": args.seed, "skipped": skipped},
        "results": results, "export": exports, "targets": verdicts, "moto": moto_peak,
    }
    name = "table_quick" if args.quick else "table"
    print(f"saved {save_results(name, payload, args.out)} ({time.perf_counter() - run_start:.0f} s)")


def _delete_prefix(location: Location) -> None:
    """Delete every object the case wrote on S3 (moto frees them; the server is stopped at the end anyway)."""
    assert location.moto is not None
    store = S3Store(BUCKET, location.root.split("/", 3)[3], location.moto.settings())
    keys = [info.key for info in store.list()]
    for first in range(0, len(keys), 1000):
        store.client.delete_objects(Bucket=BUCKET, Delete={"Objects": [
            {"Key": f"{store.prefix}/{key}"} for key in keys[first:first + 1000]]})


def print_table(results: dict[str, Any], exports: dict[str, Any]) -> None:
    print("\n| backend | N | format | append concepts/s | ms/batch first -> last tenth | data files | read-8 fresh ms "
          "| read-8 warm ms | read all s | read-all peak RSS +MiB | export peak RSS MiB |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for backend, cases in results.items():
        for n, case in cases.items():
            for fmt in FORMATS:
                append, before, every = case["append"][fmt], case["read8_before"][fmt], case["read_all"][fmt]
                files = case["files"]["parts"] if fmt == "parts" else (
                    f"{case['files']['table_before']} -> {case['files']['table_after']}")
                export = exports.get(backend, {}).get(n, {}).get(fmt, {}).get("peak_rss_mib", "-")
                print(f"| {backend} | {n} | {fmt} | {append['concepts_per_s']} | {append['first_tenth_ms_per_batch']}"
                      f" -> {append['last_tenth_ms_per_batch']} | {files} | {before['fresh_ms']} | {before['warm_ms']}"
                      f" | {every['s']} | {every['peak_rss_over_start_mib']} | {export} |")
            after = case["read8_after"]
            print(f"| {backend} | {n} | table compacted | | | {case['files']['table_after']} | "
                  f"{after['table']['fresh_ms']} | {after['table']['warm_ms']} | "
                  f"{case.get('read_all_after', {}).get('table', {}).get('s', '-')} | | |")
            print(f"| {backend} | {n} | single file | | | 1 | {after['single']['fresh_ms']} | "
                  f"{after['single']['warm_ms']} | | | |")


if __name__ == "__main__":
    main()
