"""Benchmark of the Parquet embedding store (elite.data.store), at real ELITE sizes: 5 x 768 float32 words,
256 x 768 float16 local tokens (zero on the background patches, about half of them), a 16 x 16 mask.

1. layouts   how to store the local tokens: one Parquet file per layout, the same rows, written and read
             back to one (N, 256, 768) float16 numpy array: list<float16>, list<list<float16>>,
             fixed_size_list<float16>, binary (one value per row: what the store uses),
             fixed_size_binary; zstd unless named. MB/s are of the float16 payload.
2. store     EmbeddingStore.append (one part, fsync and rename included), read_arrays of all concepts,
             of a few chosen ids, read_embeddings, has(), a skipped (all-duplicate) append, a DuckDB scan;
             for several row group sizes.

Files are written to a temporary folder on the local disk and read back while still in the page cache:
the figures are the CPU cost of encoding and decoding, not of the disk.

    python benchmarks/bench_store.py                 # ~1 min
    python benchmarks/bench_store.py --concepts 1024 --reps 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exact_command, gemm_probe, machine_info, save_results

from elite.data.store import DEFAULT_ROW_GROUP_ROWS, EmbeddingRecord, EmbeddingStore, sha256_bytes

GRID, TEXT_DIM, WORDS = 16, 768, 5
PATCHES = GRID * GRID
MB = 1e6


def make_tokens(concepts: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Local tokens (concepts, patches, dim) float16 zeroed outside a random blob-like mask, and the masks."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    centres = rng.uniform(4, 12, size=(concepts, 2))
    radii = rng.uniform(4, 8, size=concepts)  # masks covering roughly 20-80% of the grid
    masks = ((ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2
             <= radii[:, None, None] ** 2).astype(np.uint8)  # (concepts, grid, grid)
    tokens = rng.standard_normal((concepts, PATCHES, TEXT_DIM), dtype=np.float32) * 0.5
    tokens *= masks.reshape(concepts, PATCHES, 1)
    return tokens.astype(np.float16), masks


def seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved(settings: Sequence[Any], measure: Callable[[Any], dict[str, float]],
                rounds: int) -> dict[Any, dict[str, float]]:
    """Median over `rounds` of each figure of `measure(setting)`, the settings taken in turn within each round
    (order reversed every other round) so that this VM's speed drifts hit all of them alike. A first, untimed
    round warms up allocators and the page cache."""
    samples: dict[Any, list[dict[str, float]]] = {setting: [] for setting in settings}
    for round_no in range(rounds + 1):
        probe = gemm_probe()
        for setting in settings if round_no % 2 else list(reversed(settings)):
            figures = measure(setting)
            if round_no:
                samples[setting].append({**figures, "gemm_probe_gflops": probe})
    return {setting: {**{key: statistics.median(s[key] for s in runs) for key in runs[0]},
                      "gemm_probe_min_gflops": min(s["gemm_probe_gflops"] for s in runs)}
            for setting, runs in samples.items()}


# ---- 1. layouts of the local tokens ---------------------------------------------------------------

def layout_array(layout: str, tokens: np.ndarray) -> pa.Array:
    n = len(tokens)
    flat = pa.array(tokens.reshape(-1))
    per_row = PATCHES * TEXT_DIM
    if layout.startswith("list<float16>"):
        return pa.ListArray.from_arrays(pa.array(np.arange(0, n * per_row + 1, per_row, dtype=np.int32)), flat)
    if layout == "list<list<float16>>":  # (patches, dim) per row, the natural nesting
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * per_row + 1, TEXT_DIM, dtype=np.int32)), flat)
        return pa.ListArray.from_arrays(pa.array(np.arange(0, n * PATCHES + 1, PATCHES, dtype=np.int32)), inner)
    if layout == "fixed_size_list<float16>":
        return pa.FixedSizeListArray.from_arrays(flat, per_row)
    data = pa.py_buffer(tokens.tobytes())
    if layout.startswith("binary"):
        offsets = pa.py_buffer(np.arange(0, n * per_row * 2 + 1, per_row * 2, dtype=np.int32))
        return pa.Array.from_buffers(pa.binary(), n, [None, offsets, data])
    if layout == "fixed_size_binary":
        return pa.Array.from_buffers(pa.binary(per_row * 2), n, [None, data])
    raise ValueError(layout)


def layout_to_numpy(layout: str, column: pa.ChunkedArray) -> np.ndarray:
    pieces = []
    for chunk in column.chunks:
        if layout.startswith("binary"):
            offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
            pieces.append(np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].view(np.float16))
        elif layout == "fixed_size_binary":
            pieces.append(np.frombuffer(chunk.buffers()[1], np.float16)[
                chunk.offset * PATCHES * TEXT_DIM:(chunk.offset + len(chunk)) * PATCHES * TEXT_DIM])
        elif layout == "list<list<float16>>":
            pieces.append(chunk.flatten().flatten().to_numpy())
        else:
            pieces.append(chunk.flatten().to_numpy())
    return np.concatenate(pieces).reshape(-1, PATCHES, TEXT_DIM)  # (concepts, patches, dim)


def layout_path(layout: str, folder: Path) -> Path:
    return folder / f"{layout.replace('<', '_').replace('>', '_').replace(' ', '_')}.parquet"


def measure_layout(layout: str, tokens: np.ndarray, folder: Path) -> dict[str, float]:
    """Seconds to write `tokens` in `layout` and to read them back into one numpy array."""
    path = layout_path(layout, folder)
    compression = "none" if layout.endswith("uncompressed") else "zstd"
    options = {"compression": compression, "use_dictionary": ["id"], "write_statistics": ["id"],
               "row_group_size": DEFAULT_ROW_GROUP_ROWS, "column_encoding": None}
    if layout.endswith("BYTE_STREAM_SPLIT"):
        options |= {"use_dictionary": False, "column_encoding": {"t": "BYTE_STREAM_SPLIT", "id": "PLAIN"}}
    ids = pa.array([f"c{i:05d}" for i in range(len(tokens))])
    write_s, _ = seconds(lambda: pq.write_table(pa.table({"id": ids, "t": layout_array(layout, tokens)}),
                                                path, **options))
    read_s, back = seconds(lambda: layout_to_numpy(layout, pq.read_table(path, columns=["t"]).column("t")))
    assert back.tobytes() == tokens.tobytes(), layout
    return {"write_s": write_s, "read_s": read_s}


def layout_figures(layout: str, times: dict[str, float], tokens: np.ndarray, folder: Path) -> dict[str, Any]:
    path = layout_path(layout, folder)
    length = "octet_length" if "binary" in layout else "len"
    try:
        duck_s, _ = seconds(lambda: duckdb.sql(f"SELECT sum({length}(t)) FROM read_parquet('{path}')").fetchall())
        duckdb_reads: bool | str = True
    except duckdb.Error as err:
        duck_s, duckdb_reads = float("nan"), f"{type(err).__name__}: {str(err).splitlines()[0]}"
    payload = tokens.nbytes / MB
    return {"write_MBps": round(payload / times["write_s"], 1), "read_MBps": round(payload / times["read_s"], 1),
            "write_concepts_per_s": round(len(tokens) / times["write_s"], 1),
            "read_concepts_per_s": round(len(tokens) / times["read_s"], 1),
            "file_MB": round(path.stat().st_size / MB, 2), "payload_MB": round(payload, 2),
            "duckdb_reads": duckdb_reads, "duckdb_scan_ms": round(1000 * duck_s, 1),
            "gemm_probe_gflops": round(times["gemm_probe_gflops"], 1),
            "gemm_probe_min_gflops": round(times["gemm_probe_min_gflops"], 1)}


LAYOUTS = ("binary", "fixed_size_binary", "list<float16>", "fixed_size_list<float16>", "list<list<float16>>",
           "list<float16> BYTE_STREAM_SPLIT", "binary uncompressed", "list<float16> uncompressed")


# ---- 2. the store --------------------------------------------------------------------------------

def make_records(concepts: int) -> list[EmbeddingRecord]:
    tokens, masks = make_tokens(concepts, seed=1)
    rng = np.random.default_rng(2)
    words = rng.standard_normal((concepts, WORDS, TEXT_DIM), dtype=np.float32)
    return [EmbeddingRecord(f"sku-{i:06d}", f"s3://catalog/images/{i}.jpg", sha256_bytes(b"image %d" % i),
                            sha256_bytes(b"mask %d" % i), "encoder-0", words[i], tokens[i], masks[i],
                            {"class_word": "shoe", "sku": f"SKU-{i}", "price": 10.0 + i})
            for i in range(concepts)]


def measure_store(records: list[EmbeddingRecord], folder: Path, row_group_rows: int) -> dict[str, float]:
    """Seconds of each store operation, on a new store in a new folder (so every append writes everything)."""
    root = folder / f"store-{row_group_rows}-{time.monotonic_ns()}"
    store = EmbeddingStore(root, row_group_rows=row_group_rows)
    chosen = [records[i].concept_id for i in np.random.default_rng(3).choice(len(records), 8, replace=False)]
    key = (records[7].concept_id, records[7].image_sha256, records[7].mask_sha256, "encoder-0")
    out = {"append_s": seconds(lambda: store.append(records))[0],
           "open_index_s": seconds(lambda: EmbeddingStore(root).concept_ids())[0]}  # footers + key columns
    out["read_all_s"], arrays = seconds(lambda: store.read_arrays())
    assert arrays.local_tokens[5].tobytes() == records[5].local_tokens.tobytes()
    out["read_8_chosen_s"] = seconds(lambda: store.read_arrays(chosen))[0]
    out["read_8_chosen_new_store_s"] = seconds(lambda: EmbeddingStore(root).read_arrays(chosen))[0]
    out["read_embeddings_all_s"] = seconds(lambda: store.read_embeddings())[0]
    out["append_all_duplicates_s"], result = seconds(lambda: store.append(records))
    assert result.written == 0
    out["has_s"] = seconds(lambda: [store.has(*key) for _ in range(100)])[0] / 100
    query = f"SELECT concept_id, len(words), octet_length(local_tokens) FROM read_parquet('{root}/*.parquet')"
    out["duckdb_scan_s"], rows = seconds(lambda: duckdb.sql(query).fetchall())
    assert len(rows) == len(records)
    [part] = store.part_names()
    out["part_MB"] = (root / part).stat().st_size / MB
    out["footer_KB"] = pq.read_metadata(root / part).serialized_size / 1e3
    shutil.rmtree(root)
    return out


def store_figures(times: dict[str, float], records: list[EmbeddingRecord]) -> dict[str, float]:
    n, payload = len(records), sum(r.local_tokens.nbytes + r.words.nbytes for r in records) / MB
    per_s = {f"{name[:-2]}_concepts_per_s": round(n / times[name], 1) for name in (
        "append_s", "read_all_s", "read_embeddings_all_s", "duckdb_scan_s")}
    ms = {f"{name[:-2]}_ms": round(1000 * times[name], 1) for name in (
        "open_index_s", "read_8_chosen_s", "read_8_chosen_new_store_s", "append_all_duplicates_s")}
    return {**per_s, "append_MBps": round(payload / times["append_s"], 1),
            "read_all_MBps": round(payload / times["read_all_s"], 1), **ms, "has_us": round(1e6 * times["has_s"], 1),
            "part_MB": round(times["part_MB"], 2), "footer_KB": round(times["footer_KB"], 1),
            "payload_MB": round(payload, 2), "gemm_probe_gflops": round(times["gemm_probe_gflops"], 1),
            "gemm_probe_min_gflops": round(times["gemm_probe_min_gflops"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=512, help="concepts in the store runs")
    parser.add_argument("--layout-concepts", type=int, default=128, help="concepts in the layout runs")
    parser.add_argument("--row-group-rows", type=int, nargs="+",
                        default=sorted({8, 16, 32, 128, DEFAULT_ROW_GROUP_ROWS}))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"layouts": {}, "store": {}}
    tokens, _ = make_tokens(args.layout_concepts)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        times = interleaved(LAYOUTS, lambda layout: measure_layout(layout, tokens, Path(tmp)), args.reps)
        for layout in LAYOUTS:
            results["layouts"][layout] = layout_figures(layout, times[layout], tokens, Path(tmp))
            print(f"{layout:32s} {results['layouts'][layout]}", flush=True)
    records = make_records(args.concepts)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        times = interleaved(args.row_group_rows, lambda rows: measure_store(records, Path(tmp), rows), args.reps)
    for rows in args.row_group_rows:
        results["store"][f"row_group_rows_{rows}"] = figures = store_figures(times[rows], records)
        print(f"store row_group_rows={rows:<4d} {figures}", flush=True)
    payload = {
        "benchmark": "store", "command": exact_command(),
        "machine": {**machine_info(), "pyarrow": pa.__version__, "duckdb": duckdb.__version__,
                    "numpy": np.__version__, "tmp": tempfile.gettempdir()},
        "settings": {"concepts": args.concepts, "layout_concepts": args.layout_concepts, "reps": args.reps,
                     "row_group_rows": args.row_group_rows, "grid": GRID, "text_dim": TEXT_DIM,
                     "default_row_group_rows": DEFAULT_ROW_GROUP_ROWS},
        "results": results,
    }
    print(f"saved {save_results('store', payload, args.out)}")


if __name__ == "__main__":
    main()
