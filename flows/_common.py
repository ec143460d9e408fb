"""What both flows share: transient-only retries, run-report files and the Prefect artifact."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact

from elite.errors import StorageError
from elite.storage import ObjectStore

RETRIES = 2  # storage only: a bad image or checkpoint fails the same way every time


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


def put_jsonl(store: ObjectStore, key: str, rows: Sequence[dict[str, Any]]) -> str:
    """Write rows as JSON lines under `key` (a store put is all-or-nothing); returns the object's URI."""
    store.put(key, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())
    return store.uri(key)


def publish_summary(key: str, title: str, counts: dict[str, Any], outputs: dict[str, str]) -> None:
    """A markdown artifact with the run's counts and where its outputs are."""
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in counts.items()]
    lines += ["", *(f"- {name}: `{uri}`" for name, uri in outputs.items())]
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=title)
