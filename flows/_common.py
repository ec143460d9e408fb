"""What the flows share: transient-only retries, per-thread stores, the bounded fan-out, logs and artifacts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from elite.data.objects import ObjectStore
from elite.data.s3 import StorageSettings, storage_settings_from_env
from elite.data.storage import AnyEmbeddingStore, embedding_store, embedding_table, open_store
from elite.data.store import EmbeddingStore
from elite.errors import Failure, TransientStorageError
from elite.jobs.common import Locations

# Task retries, for transient storage errors only (a bad image or checkpoint fails the same way every time), after
# these delays in seconds: long enough for a throttled or restarting endpoint to come back.
RETRIES = 2
RETRY_DELAYS = [2.0, 10.0]


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a task only when it failed with a TransientStorageError."""
    try:
        state.result()
    except TransientStorageError:
        return True
    except Exception:  # anything else is not transient: fail now
        return False
    return False


# ---- the library's logs in the run's logs -------------------------------------------------------

class _RunLogForwarder(logging.Handler):
    """Sends records of the `elite.*` loggers to the Prefect run logger of the flow or task run they happen in,
    so the library's warnings appear in the run's logs (UI, API) as WARNING. Outside a run: left to other handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            run_logger = get_run_logger()
        except MissingContextError:
            return
        run_logger.log(record.levelno, "%s: %s", record.name, record.getMessage())


def capture_library_logs() -> None:
    """Forward `elite.*` INFO and above to Prefect's run logs (once per process)."""
    library = logging.getLogger("elite")
    # by name, not class: Prefect may execute this file again as another module (load_flow_from_entrypoint)
    if not any(type(h).__name__ == _RunLogForwarder.__name__ for h in library.handlers):
        library.addHandler(_RunLogForwarder(logging.INFO))
        if library.level == logging.NOTSET:
            library.setLevel(logging.INFO)


# ---- stores, one per thread ----------------------------------------------------------------------
# A boto3 client costs tens of milliseconds to build and an embedding store keeps the file index it has read;
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


def locations_at(uri: str) -> Locations:
    """Locations of concept files relative to the store at `uri`, cached per thread."""
    locations: Locations = _per_thread("locations", uri, lambda u, s: Locations(open_store(u, s)))
    return locations


def embeddings_at(uri: str) -> AnyEmbeddingStore:
    """The embedding store at `uri` to read (the table, or a store of the earlier format), cached per thread, so
    a worker reads each data file's index once."""
    store: AnyEmbeddingStore = _per_thread("embedding_stores", uri, embedding_store)
    return store


def table_at(uri: str) -> EmbeddingStore:
    """The embedding table at `uri` to write to, cached per thread (a store of the earlier format is refused)."""
    store: EmbeddingStore = _per_thread("embedding_tables", uri, embedding_table)
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
            except Exception as err:  # failed even after its retries: the job records what it held
                yield err


def batch_label(first: str, last: str, count: int) -> str:
    """A task run name that says what the batch holds."""
    return f"{first} ({count})" if count == 1 or first == last else f"{first}..{last} ({count})"


# ---- artifacts -----------------------------------------------------------------------------------

def publish(key: str, title: str, counts: dict[str, Any], outputs: dict[str, str | None],
            failures: Sequence[Failure]) -> None:
    """A markdown artifact with the run's counts and where its outputs are, and the failures as a table artifact."""
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in counts.items()]
    lines += ["", *(f"- {name}: `{uri}`" for name, uri in outputs.items() if uri)]
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=title)
    if failures:
        create_table_artifact([f.row() for f in failures], key=f"{key}-failures",
                              description=f"{title}: {len(failures)} failed")
