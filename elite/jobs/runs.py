"""Generation runs read back: the newest results-manifest row of every image of one manifest or an images folder
(for the evaluate job)."""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from elite.data.objects import ObjectStore
from elite.data.storage import open_store
from elite.errors import EliteError, Failure, InputError, TransientStorageError
from elite.jobs.common import check_readable, run_stamp
from elite.jobs.generate import MANIFESTS, manifest_keys

_REQUIRED = ("concept_id", "prompt", "index", "seed", "output_key")


@dataclass
class RunRows:
    """A run to evaluate: its images folder, name and newest manifest row per image."""

    root: ObjectStore  # the images folder: manifest keys are relative to it
    name: str  # names the output files
    uri: str
    rows: list[dict[str, Any]]
    failures: list[Failure]


def read_run(uri: str) -> RunRows:
    """The manifest rows of RUN: one results manifest (its file must lie in the `_runs/` folder of its images), or
    every manifest of an images folder. A single manifest that cannot be read is an InputError; in a folder, an
    unreadable manifest is a failure and the others are read."""
    text = uri.rstrip("/")
    if text.endswith(".parquet"):
        folder, name = posixpath.split(text)
        if posixpath.basename(folder) != MANIFESTS.rstrip("/"):
            raise InputError(f"{uri}: not a results manifest path; manifests lie in the _runs/ folder of the "
                             "images they list (<images>/_runs/generate-<time>.parquet)")
        root = open_store(posixpath.dirname(folder) or ".")
        keys, run_name, strict = [f"{MANIFESTS}{name}"], name.removesuffix(".parquet"), True
    else:
        root = open_store(text)
        check_readable(root, "run folder")
        keys, run_name, strict = manifest_keys(root), f"evaluate-{run_stamp()}", False
        if not keys:
            raise InputError(f"{root.uri()}: no results manifest under {MANIFESTS} (nothing generated there yet?)")
    newest: dict[str, dict[str, Any]] = {}
    failures: list[Failure] = []
    for key in keys:
        try:
            rows = _manifest_rows(root, key)
        except InputError as err:
            if strict:
                raise
            failures.append(Failure("", root.uri(key), "manifest", str(err)))
            continue
        for row in rows:  # runs in time order: a later row of the same image wins
            newest[row["output_key"]] = row
    rows = sorted(newest.values(), key=lambda r: (r["concept_id"], r["prompt"], r["index"], r["output_key"]))
    return RunRows(root, run_name, uri, rows, failures)


def _manifest_rows(root: ObjectStore, key: str) -> list[dict[str, Any]]:
    try:
        table = pq.read_table(io.BytesIO(root.get(key)))
    except TransientStorageError:
        raise
    except EliteError as err:
        raise InputError(f"{root.uri(key)}: cannot read the results manifest: {err}") from err
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{root.uri(key)}: not a Parquet results manifest: {err}") from err
    missing = [name for name in _REQUIRED if name not in table.column_names]
    if missing:
        raise InputError(f"{root.uri(key)}: not a results manifest (no column {', '.join(missing)})")
    return [{**row, "manifest_uri": root.uri(key)} for row in table.to_pylist()]
