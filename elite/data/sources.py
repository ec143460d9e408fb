"""Concept sources on any ObjectStore (a local folder or S3 alike): a folder listing or a manifest file.

    list_concepts(store, prefix)         <name>.<jpg|jpeg|png|webp> with an optional <name>_bg.png mask
    read_manifest(store, key)            a CSV or JSONL manifest; extra columns pass through as metadata

Both return `ConceptRef`s that hold keys (or URIs), never image bytes, so a flow can pass them between tasks
and read each image only where it is encoded. Guide: docs/inputs.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from elite.data.objects import LocalStore, ObjectStore, check_key, is_uri
from elite.data.store_format import CORE_COLUMNS
from elite.errors import Failure, InputError, printable

__all__ = ["ConceptRef", "ConceptSource", "MetadataValue", "find_concepts", "list_concepts", "read_manifest"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = "_bg.png"  # the release's mask naming
MANIFEST_COLUMNS = ("concept_id", "image", "mask", "class_word")

MetadataValue = str | int | float | bool | None
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptSource:
    """A concept of a local folder, as file paths (for scripts and benchmarks; jobs use `ConceptRef`)."""

    concept_id: str
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class ConceptRef:
    """One concept to encode: where its image (and mask) live, and what a manifest said about it."""

    concept_id: str  # one key segment: it names the concept's output folder
    image: str  # a key within the store, or an absolute URI (s3://..., file:///...) from a manifest
    mask: str | None = None  # same form as `image`; None: the whole image is the object
    class_word: str | None = None  # e.g. "dog"; lets prompt files target a class (elite.data.prompts)
    metadata: dict[str, MetadataValue] = field(default_factory=dict)  # a manifest's other columns, unchanged


MAX_ID_BYTES = 200  # an id names a folder and files (<id>.safetensors): under the usual 255-byte name limit


def check_concept_id(concept_id: str) -> str:
    """`concept_id` if it can name an output folder (one clean key segment of valid UTF-8, at most MAX_ID_BYTES
    bytes), else InputError."""
    if not concept_id or "/" in concept_id:
        raise InputError(f"concept id {printable(concept_id)!r} is empty or holds '/'; it must be a single key "
                         "segment")
    try:
        size = len(concept_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InputError(f"concept id {printable(concept_id)!r} is not valid UTF-8 (a file name with bytes of "
                         "another encoding?); rename the file") from None
    if size > MAX_ID_BYTES:
        raise InputError(f"concept id {concept_id[:40]!r}... is {size} bytes long; at most {MAX_ID_BYTES} (it names "
                         "the concept's output folder)")
    check_key(concept_id)  # refuses '.', '..', backslashes and control characters, as every store key
    return concept_id


# ---- folder convention ---------------------------------------------------------------------------

@overload
def list_concepts(store: ObjectStore, prefix: str = "", strict: Literal[True] = True) -> list[ConceptRef]: ...
@overload
def list_concepts(store: ObjectStore, prefix: str,
                  strict: Literal[False]) -> tuple[list[ConceptRef], list[Failure]]: ...


def list_concepts(store: ObjectStore, prefix: str = "",
                  strict: bool = True) -> list[ConceptRef] | tuple[list[ConceptRef], list[Failure]]:
    """Concepts directly under `prefix` (a folder: '' or 'a/b'), sorted by id.

    Every `<name>.<jpg|jpeg|png|webp>` (suffix in any case) not ending in `_bg.png` is a concept with id
    `<name>`; `<name>_bg.png` next to it is its mask. Deeper keys and other files (README, SOURCE.md) are
    ignored, as is a mask without an image. Two images of one name (`a.jpg`, `a.png`) are an error naming
    both: which one was meant cannot be guessed, and picking one would silently encode the other never. A name
    that cannot be a concept id (`check_concept_id`: backslashes, control characters, bytes that are not UTF-8,
    too long) is an error too. strict=True: the first such error raises InputError; strict=False: each is a
    `Failure` of the `list` stage, returned with the good concepts.
    """
    folder = prefix.strip("/")
    start = f"{folder}/" if folder else ""
    images: dict[str, list[str]] = {}
    masks: dict[str, list[str]] = {}
    for info in store.list(start):  # paginated by the store; every key at any depth under `start`
        name = info.key[len(start):]
        if "/" in name:
            continue  # a sub-folder's files belong to another listing
        lower = name.lower()
        if lower.endswith(MASK_SUFFIX):
            masks.setdefault(name[: -len(MASK_SUFFIX)], []).append(info.key)
        elif lower.endswith(IMAGE_SUFFIXES) and not name.startswith("."):
            images.setdefault(posixpath.splitext(name)[0], []).append(info.key)
    refs: list[ConceptRef] = []
    failures: list[Failure] = []
    for concept_id, keys in sorted(images.items()):
        try:
            for what, found in (("images", keys), ("masks", masks.get(concept_id, []))):
                if len(found) > 1:
                    raise InputError(f"concept {printable(concept_id)!r} has two {what}: "
                                     f"{' and '.join(uri_of(store, k) for k in found)}; keep one")
            mask = masks.get(concept_id)
            refs.append(ConceptRef(check_concept_id(concept_id), keys[0], mask[0] if mask else None))
        except InputError as err:
            if strict:
                raise
            failures.append(Failure(concept_id, uri_of(store, keys[0]), "list", str(err)))
    return refs if strict else (refs, failures)


def uri_of(store: ObjectStore, key: str) -> str:
    """The URI of a key for messages, even a key the store would refuse (a backslash, a control character)."""
    try:
        return store.uri(key)
    except InputError:
        return f"{store.uri()}/{printable(key)}"


def find_concepts(folder: str | os.PathLike[str]) -> list[ConceptSource]:
    """Concepts of a local folder as paths, by the convention of `list_concepts`."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    return [ConceptSource(ref.concept_id, root / ref.image, None if ref.mask is None else root / ref.mask)
            for ref in list_concepts(LocalStore(root))]


# ---- manifests -----------------------------------------------------------------------------------

@overload
def read_manifest(store: ObjectStore, key: str, strict: Literal[True] = True) -> list[ConceptRef]: ...
@overload
def read_manifest(store: ObjectStore, key: str, strict: Literal[False]) -> tuple[list[ConceptRef], list[Failure]]: ...


def read_manifest(store: ObjectStore, key: str,
                  strict: bool = True) -> list[ConceptRef] | tuple[list[ConceptRef], list[Failure]]:
    """Concepts of a `.csv` or `.jsonl` manifest at `key`, in file order.

    Columns: concept_id and image (required), mask and class_word (optional; empty = none); any other
    column is kept in `metadata` (CSV values as strings, JSONL values as their JSON scalars). Relative
    image and mask paths are resolved against the manifest's folder; '/path' is a key from the store's
    root and 'scheme://...' an absolute URI, kept as given.
    strict=True: the first bad row raises InputError naming its line. strict=False: bad rows come back as
    `Failure("", uri="<manifest uri>:<line>", stage="manifest", reason)` and the good rows are returned with them.
    A file that cannot be read as a manifest at all (wrong suffix, no header, missing columns) always raises.
    """
    suffix = posixpath.splitext(key)[1].lower()
    if suffix not in (".csv", ".jsonl"):
        raise InputError(f"{store.uri(key)}: manifest must end in .csv or .jsonl, not {suffix or 'no suffix'!r}")
    try:
        text = store.get(key).decode("utf-8-sig")  # -sig: spreadsheets often write a BOM
    except UnicodeDecodeError as err:
        raise InputError(f"{store.uri(key)}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = csv_rows(text, store.uri(key), "manifest", ("concept_id", "image")) if suffix == ".csv" else jsonl_rows(text)
    folder = posixpath.dirname(key)
    refs: list[ConceptRef] = []
    failures: list[Failure] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        try:
            if isinstance(row, str):
                raise InputError(row)  # the row could not even be parsed
            ref = _concept_ref(row, folder)
            if ref.concept_id in first_line:
                raise InputError(f"concept id {ref.concept_id!r} already given on line {first_line[ref.concept_id]}")
            first_line[ref.concept_id] = line
            refs.append(ref)
        except InputError as err:
            if strict:
                raise InputError(f"{store.uri(key)} line {line}: {err}") from None
            failures.append(Failure("", f"{store.uri(key)}:{line}", "manifest", str(err)))
    refs = _consistent_metadata(refs, store.uri(key))
    return refs if strict else (refs, failures)


def _consistent_metadata(refs: list[ConceptRef], where: str) -> list[ConceptRef]:
    """Metadata columns fit for one Parquet column each, checked once per manifest (a defect of a column would
    otherwise fail every concept of the batch it lands in, with the first one's reason): a column with an empty
    name (a spreadsheet's trailing comma) is dropped, numbers of mixed int/float become floats, values of mixed
    types become text (each with a warning); a column named like a core column of the store is an InputError."""
    columns = sorted({name for ref in refs for name in ref.metadata})
    clashing = [name for name in columns if name in CORE_COLUMNS]
    if clashing:
        raise InputError(f"{where}: column {clashing[0]!r} has the name of a column the embedding store keeps "
                         "itself; rename it")
    dropped = {name for name in columns if not name.strip()}
    if dropped:
        logger.warning("%s: a column without a name is ignored (a trailing comma?)", where)
    convert: dict[str, Callable[[Any], MetadataValue]] = {}
    for name in set(columns) - dropped:
        kinds = {type(ref.metadata[name]) for ref in refs if ref.metadata.get(name) is not None}
        if kinds == {int, float}:
            convert[name] = float
        elif len(kinds) > 1:
            logger.warning("%s: column %r holds %s values; all are kept as text", where, name,
                           " and ".join(sorted(kind.__name__ for kind in kinds)))
            convert[name] = str
    if not convert and not dropped:
        return refs

    def fixed(metadata: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
        return {k: convert[k](v) if k in convert and v is not None else v for k, v in metadata.items()
                if k not in dropped}

    return [dataclasses.replace(ref, metadata=fixed(ref.metadata)) for ref in refs]


def csv_rows(text: str, where: str, what: str,
             required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str] | str]]:
    """(line, row) per CSV record, values as text ("" where a short row lacks a field, as a spreadsheet would), or
    (line, reason) for a row with more fields than the header. Blank lines are skipped by the csv module. A file
    without a header, or whose header lacks a `required` column, is an InputError naming `where` (the `what`)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))  # fields beyond the header go under the key None
    if reader.fieldnames is None:
        raise InputError(f"{where}: empty {what} (no header row)")
    missing = [c for c in required if c not in reader.fieldnames]
    if missing:
        raise InputError(f"{where}: header lacks column(s) {', '.join(missing)}; has {', '.join(reader.fieldnames)}")
    for row in reader:
        extra = row.pop(None, None)  # DictReader's key for surplus fields
        if extra:
            count = len(reader.fieldnames)
            yield reader.line_num, f"{count + len(extra)} fields, the header has {count}"
        else:
            yield reader.line_num, {k: "" if v is None else v for k, v in row.items()}


def jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, object) per non-blank JSONL line; a line that is not a JSON object yields its reason."""
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            yield line, f"not valid JSON: {err.msg} at column {err.colno}"
            continue
        yield line, value if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"


def _concept_ref(row: Mapping[str, Any], folder: str) -> ConceptRef:
    concept_id, image, mask, class_word = (_text_field(row, name) for name in MANIFEST_COLUMNS)
    if concept_id is None or image is None:
        raise InputError(f"{'concept_id' if concept_id is None else 'image'} is missing or empty")
    metadata: dict[str, MetadataValue] = {}
    for name, value in row.items():
        if name in MANIFEST_COLUMNS:
            continue
        if not isinstance(value, str | int | float | bool | None):  # JSON arrays and objects
            raise InputError(f"column {name!r} holds a {type(value).__name__}; metadata values must be scalars")
        metadata[name] = value
    return ConceptRef(check_concept_id(concept_id), _resolve(image, folder, "image"),
                      None if mask is None else _resolve(mask, folder, "mask"), class_word, metadata)


def _text_field(row: Mapping[str, Any], name: str) -> str | None:
    """A known column as stripped text; absent, null and empty all mean 'not given'."""
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {json.dumps(value)}")
    return value.strip() or None


def _resolve(path: str, folder: str, name: str) -> str:
    """A manifest path as a store key (relative to the manifest's folder, or '/'-rooted) or an absolute URI."""
    if is_uri(path):
        return path
    key = path.lstrip("/") if path.startswith("/") else posixpath.join(folder, path)
    normal = posixpath.normpath(key)
    if normal == ".." or normal.startswith("../"):
        raise InputError(f"{name} {path!r} points outside the store's root")
    return check_key(normal)
