"""What the jobs share: batch runners, the one-by-one fallback, object locations, run tables and timings."""

from __future__ import annotations

import datetime
import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from elite.data.objects import LocalStore, ObjectStore, is_uri
from elite.data.storage import open_object
from elite.errors import EliteError, Failure, InputError

IO_THREADS = 16  # concurrent storage requests while hashing or listing a catalog (S3 HEADs and LISTs)

Batch = TypeVar("Batch")
Result = TypeVar("Result")
Item = TypeVar("Item")
Output = TypeVar("Output")
Key = TypeVar("Key")
Value = TypeVar("Value")

# How a job runs its batches: given the batches, yield each batch's result, or the exception it ended with, in
# batch order. The library runs them one after the other (`run_sequentially`); the Prefect flows submit each batch
# as a task, with retries, on a bounded runner.
BatchRunner = Callable[[Sequence[Batch]], Iterable[Result | Exception]]

# One row per item that could not be done: the failures table of every job (`_runs/<job>-<stamp>-failures.parquet`)
FAILURE_SCHEMA = pa.schema([
    pa.field("concept_id", pa.string()),  # the concept (or "" for a prompt-file or manifest line, named by `uri`)
    pa.field("uri", pa.string()),  # the object at fault: image, mask, "<file>:<line>", or the output not written
    pa.field("stage", pa.string()),  # manifest, prompts, read, preprocess, encode, generate, write
    pa.field("reason", pa.string()),
])


def run_sequentially(work: Callable[[Batch], Result]) -> Callable[[Sequence[Batch]], Iterator[Result | Exception]]:
    """A BatchRunner that calls `work` on each batch in turn, in this thread. Errors raised on purpose
    (EliteError) become the batch's result, as a failed Prefect task's would; anything else is a bug and raises."""
    def run(batches: Sequence[Batch]) -> Iterator[Result | Exception]:
        for batch in batches:
            try:
                yield work(batch)
            except EliteError as err:
                yield err

    return run


def run_isolated(items: Sequence[Item], run: Callable[[Sequence[Item]], list[Output]],
                 ) -> tuple[list[tuple[Item, Output]], list[tuple[Item, InputError]]]:
    """`run(items)` as one batch; if an InputError spoils the batch (one bad image, one prompt too long), run the
    items one by one so only the bad ones fail. Returns (item, output) pairs and (item, error) pairs."""
    if not items:
        return [], []
    try:
        return list(zip(items, run(items), strict=True)), []
    except InputError:
        done: list[tuple[Item, Output]] = []
        failed: list[tuple[Item, InputError]] = []
        for item in items:
            try:
                done.append((item, run([item])[0]))
            except InputError as err:
                failed.append((item, err))
        return done, failed


class Locations:
    """Where a concept's files are: keys of one store, or absolute URIs (a manifest may name objects anywhere).
    Stores for other folders are opened once and kept; safe to share between threads."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._stores: dict[str, ObjectStore] = {}
        self._lock = threading.Lock()

    def locate(self, ref: str) -> tuple[ObjectStore, str]:
        """(store, key) of a key in the store or of an absolute URI."""
        if not is_uri(ref):
            return self.store, ref
        folder, _, name = ref.rstrip("/").rpartition("/")
        with self._lock:
            if folder not in self._stores:
                self._stores[folder] = open_object(ref)[0]  # refuses a bucket alone, a bad scheme
            return self._stores[folder], name

    def uri(self, ref: str) -> str:
        store, key = self.locate(ref)
        return store.uri(key)

    def get(self, ref: str) -> bytes:
        store, key = self.locate(ref)
        return store.get(key)

    def sha256(self, ref: str) -> str:
        store, key = self.locate(ref)
        return store.sha256(key)


def check_readable(store: ObjectStore, what: str) -> None:
    """Fail fast, before any work or output, when a location to read from does not exist or cannot be listed: a
    local folder must exist; an S3 location must answer one listing request (a missing bucket, bad credentials
    or an unreachable endpoint surface here as one StorageError)."""
    if isinstance(store, LocalStore):
        if not store.root.is_dir():
            raise InputError(f"{what} {store.root}: no such folder")
        return
    next(iter(store.list()), None)


def check_output(store: ObjectStore) -> None:
    """Fail fast when an S3 location to write to does not answer (bucket, credentials, endpoint); a local folder is
    made by the first write."""
    if not isinstance(store, LocalStore):
        check_readable(store, "output")


class PerProcess(Generic[Key, Value]):
    """Values built once per process and shared by its threads (loaded models: an encoder, a pipeline per slot)."""

    def __init__(self) -> None:
        self._values: dict[Key, Value] = {}
        self._lock = threading.Lock()

    def get(self, key: Key, build: Callable[[], Value]) -> Value:
        with self._lock:  # held while building: two threads asking for one model load it once
            if key not in self._values:
                self._values[key] = build()
            return self._values[key]


def run_stamp() -> str:
    """A sortable UTC timestamp that names one run's report files."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def put_table(store: ObjectStore, key: str, rows: Sequence[dict[str, Any]], schema: pa.Schema) -> str | None:
    """Write rows as one Parquet object at `key` (a store put is all-or-nothing) and return its URI; no rows
    write nothing and return None (a no-op rerun leaves no empty report files behind)."""
    if not rows:
        return None
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), buffer, compression="zstd")
    store.put(key, buffer.getvalue())
    return store.uri(key)


def put_failures(store: ObjectStore, key: str, failures: Sequence[Failure]) -> str | None:
    return put_table(store, key, [f.row() for f in failures], FAILURE_SCHEMA)


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
