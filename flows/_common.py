"""What the flows share: transient-only retries, per-thread stores, timings, run tables and the Prefect artifact."""

from __future__ import annotations

import datetime
import io
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from elite.errors import InputError, StorageError
from elite.storage import (
    ObjectStore,
    StorageSettings,
    embedding_store,
    open_store,
    storage_settings_from_env,
)
from elite.store import EmbeddingStore

RETRIES = 2  # storage only: a bad image or checkpoint fails the same way every time

# One row per item that could not be done: the failures table of every flow (`_runs/<flow>-<stamp>-failures.parquet`)
FAILURE_SCHEMA = pa.schema([
    pa.field("concept_id", pa.string()),  # the concept (or "" for a prompt-file line, which is named by `uri`)
    pa.field("uri", pa.string()),  # the object at fault: image, mask, prompt file line, or the output not written
    pa.field("stage", pa.string()),  # read, preprocess, encode, prompts, generate, write
    pa.field("reason", pa.string()),
])


def failure_row(concept_id: str, uri: str, stage: str, reason: str) -> dict[str, str]:
    return {"concept_id": concept_id, "uri": uri, "stage": stage, "reason": reason}


def retry_storage_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a task only when it failed with a StorageError (elite wraps S3/OS errors)."""
    try:
        state.result()
    except StorageError:
        return True
    except Exception:  # anything else is not transient: fail now
        return False
    return False


def run_stamp() -> str:
    """A sortable UTC timestamp that names one run's report files."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")


# ---- stores, one per thread ----------------------------------------------------------------------
# A boto3 client costs tens of milliseconds to build and an EmbeddingStore keeps the part index it has read;
# the task threads of a worker are reused, so each keeps its own (EmbeddingStore is one-instance-per-thread).

_local = threading.local()


def _per_thread(kind: str, uri: str, build: Callable[[str, StorageSettings], Any]) -> Any:
    """`build(uri, settings)`, once per thread, per kind, location and S3 settings. The settings are read from
    the environment on each call (cheap), as a test or a worker may change it."""
    cache: dict[tuple[str, StorageSettings], Any] = _local.__dict__.setdefault(kind, {})
    key = (uri, storage_settings_from_env())
    if key not in cache:
        cache[key] = build(uri, key[1])
    return cache[key]


def store_at(uri: str) -> ObjectStore:
    """The ObjectStore at `uri` (S3 settings from the environment), cached per thread."""
    store: ObjectStore = _per_thread("stores", uri, open_store)
    return store


def object_at(uri: str) -> tuple[ObjectStore, str]:
    """(store of the containing folder, key) for the URI or path of one object, the store cached per thread."""
    folder, name = posixpath.split(uri.rstrip("/"))
    if not name or folder.endswith(":"):  # "s3://bucket" alone names a bucket, not an object
        raise InputError(f"{uri!r} does not name an object inside a folder or bucket")
    return store_at(folder or "."), name


def embeddings_at(uri: str) -> EmbeddingStore:
    """The EmbeddingStore at `uri`, cached per thread, so a worker reads each part's index once."""
    store: EmbeddingStore = _per_thread("embedding_stores", uri, embedding_store)
    return store


# ---- bounded fan-out -----------------------------------------------------------------------------

def run_bounded(task: Any, parameters: Sequence[dict[str, Any]], max_workers: int) -> Iterator[Any]:
    """Run `task` once per parameter dict, at most `max_workers` at a time (the rest queue: Prefect's default
    runner starts a thread per submitted task), yielding each result, or the exception its run ended with, in
    submission order."""
    runner: Any  # ThreadPoolTaskRunner; its submit overloads confuse mypy about sync tasks
    with ThreadPoolTaskRunner(max_workers=max_workers) as runner:
        futures = [runner.submit(task, p) for p in parameters]
        for future in futures:
            try:
                yield future.result()
            except Exception as err:  # failed even after its retries: the caller records what it held
                yield err


# ---- timings -------------------------------------------------------------------------------------

class Stopwatch:
    """Seconds spent per kind of work ("model": decoding and model calls, "io": storage), so a run can tell its
    own orchestration overhead apart (wall time minus both)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"model": 0.0, "io": 0.0}
        self._lock = threading.Lock()

    @contextmanager
    def time(self, kind: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add({kind: time.perf_counter() - started})

    def add(self, seconds: dict[str, float]) -> None:
        with self._lock:
            for kind, value in seconds.items():
                self.seconds[kind] = self.seconds.get(kind, 0.0) + value


# ---- run reports ---------------------------------------------------------------------------------

def put_table(store: ObjectStore, key: str, rows: Sequence[dict[str, Any]], schema: pa.Schema | None = None) -> str:
    """Write rows as one Parquet object at `key` (a store put is all-or-nothing); returns the object's URI.
    With `schema`, an empty table still has its columns; without, the columns come from the rows."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    store.put(key, buffer.getvalue())
    return store.uri(key)


def publish_summary(key: str, title: str, counts: dict[str, Any], outputs: dict[str, str]) -> None:
    """A markdown artifact with the run's counts and where its outputs are."""
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in counts.items()]
    lines += ["", *(f"- {name}: `{uri}`" for name, uri in outputs.items())]
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=title)
