"""Faults of the embedding table (elite.data.store): writers killed mid-commit, writers at once, corrupt, missing
and foreign files, tables this release must not read, locations it cannot write, and past versions.

Writers run as subprocesses (tests/table_writer.py), never forked: a process forked after deltalake was used can
hang. Every stored row is a function of its concept id and image hash, so each check decodes every row and
compares it with what a writer would have written."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from table_writer import ENCODER, apply, concurrent_plan, image_sha256, kill_plan, record

from elite.data.s3 import S3Store
from elite.data.storage import embedding_store
from elite.data.store import EmbeddingStore
from elite.data.store_format import CORE_SCHEMA
from elite.errors import InputError, StorageError, TransientStorageError

if TYPE_CHECKING:
    from s3_server import MotoS3

pytest_plugins = ["s3_server"]

WRITER = Path(__file__).with_name("table_writer.py")
READY_TIMEOUT = 180.0  # s: importing torch and deltalake in a subprocess, on a loaded 2-core machine
FINISH_TIMEOUT = 600.0  # s: a writer's whole plan, conflicts and backoff included


# ---- writer subprocesses -------------------------------------------------------------------------------------------

class Writer:
    """One tests/table_writer.py process; its stdout goes to a file, so what it said survives a SIGKILL."""

    def __init__(self, folder: Path, spec: dict[str, Any]) -> None:
        self.out = folder / f"writer-{uuid.uuid4().hex[:8]}.out"
        self.err = self.out.with_suffix(".err")
        with self.out.open("wb") as stdout, self.err.open("wb") as stderr:
            self.proc = subprocess.Popen([sys.executable, str(WRITER), json.dumps(spec)],
                                         stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=WRITER.parent)

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def stderr(self) -> str:
        return self.err.read_text()[-3000:]

    def wait_ready(self) -> None:
        self.wait_for("ready")

    def wait_for(self, start: str) -> None:
        """Until the writer says a line starting with `start`."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not any(line.startswith(start) for line in self.lines()):
            if self.proc.poll() is not None:
                pytest.fail(f"writer exited {self.proc.returncode} before saying {start!r}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"writer did not say {start!r} in {READY_TIMEOUT} s:\n{self.stderr()}")
            time.sleep(0.002)

    def go(self, start: int = 0, end: int | None = None, **more: Any) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(f"go {json.dumps({'start': start, 'end': end, **more})}\n".encode())
        stdin.close()

    def finish(self) -> list[str]:
        try:
            rc = self.proc.wait(timeout=FINISH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"writer still running after {FINISH_TIMEOUT} s:\n{self.stderr()}")
        assert rc == 0 and self.lines()[-1:] == ["finished"], f"writer exited {rc}:\n{self.stderr()}"
        return self.lines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no cleanup of any kind in the writer
        self.proc.wait(timeout=60)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    """Collects the test's writers, and kills any still running when it ends (a failed test included)."""
    started: list[Writer] = []
    yield started
    for writer in started:
        writer.kill()


def spawn(started: list[Writer], folder: Path, spec: dict[str, Any]) -> Writer:
    writer = Writer(folder, spec)
    started.append(writer)
    return writer


def progress(lines: list[str]) -> tuple[dict[int, str], int | None, list[float]]:
    """From a writer's output: batch -> version it reported done ("-": nothing to commit), the batch started but
    not done (if any), and the seconds each append took."""
    done: dict[int, str] = {}
    started: int | None = None
    seconds = []
    for line in lines:
        words = line.split()
        if words[0] == "start":
            started = int(words[1])
        elif words[0] == "done":
            done[int(words[1])] = words[2]
            seconds.append(float(words[4]))
            started = None
    return done, started, seconds


def merges(lines: list[str]) -> int:
    """The merge attempts a writer reported last: more than its appends means commits redone after a conflict."""
    return max((int(line.split()[3]) for line in lines if line.startswith("done ")), default=0)


# ---- checking a table as a fresh reader sees it --------------------------------------------------------------------

def check_table(store: EmbeddingStore) -> dict[str, str]:
    """concept id -> image hash of every current row, after checking that each (concept_id, encoder_id) has
    exactly one row in the files of the version read (listed by deltalake, read by pyarrow: not through the
    reader's own dedupe) and that every row's tensors are those a writer stores for its id and image."""
    table = store.table()
    assert table is not None
    assert store.version() == table.version()
    counts: Counter[tuple[str, str]] = Counter()
    for uri in table.file_uris():
        name = uri.removeprefix("file://").removeprefix(store.table_uri + "/")
        with store.storage.open_part(name) as source:
            keys = pq.read_table(source, columns=["concept_id", "encoder_id"], use_threads=False)
        counts.update(zip(keys.column("concept_id").to_pylist(), keys.column("encoder_id").to_pylist(), strict=True))
    doubled = {key: n for key, n in counts.items() if n != 1}
    assert not doubled, f"keys with more than one row at version {table.version()}: {doubled}"
    arrays = store.read_arrays(None, ENCODER)
    assert sorted(arrays.concept_ids) == sorted(cid for cid, _ in counts)
    for i, (cid, image_hash) in enumerate(zip(arrays.concept_ids, arrays.image_sha256, strict=True)):
        expected = record(cid, image_hash)
        assert arrays.words[i].tobytes() == expected.words.tobytes(), cid
        assert arrays.local_tokens[i].tobytes() == expected.local_tokens.tobytes(), cid
        assert arrays.mask_grid[i].tobytes() == expected.mask_grid.tobytes(), cid
        assert arrays.source_uris[i] == expected.source_uri and arrays.mask_sha256[i] is None
    current = store.current(ENCODER)
    hashes = dict(zip(arrays.concept_ids, arrays.image_sha256, strict=True))
    assert {cid: value[0] for cid, value in current.items()} == hashes
    return hashes


def data_files(root: Path) -> set[str]:
    return {path.name for path in root.glob("*.parquet")}


def referenced(root: Path) -> set[str]:
    return {Path(uri).name for uri in DeltaTable(str(root)).file_uris()}


def plant_forged_rows(root: Path) -> str:
    """Put a data file the log does not name in the table folder, named as deltalake names its files: the rows
    of a live file with another image hash, zero words and a later created_at, so that a read of it would show
    (its rows would be the newest, and their tensors not those of their hash). Returns its name."""
    rows = pq.read_table(root / sorted(referenced(root))[0])
    column = rows.schema.get_field_index
    forged = rows.set_column(column("image_sha256"), "image_sha256", pa.array(["f" * 64] * rows.num_rows))
    zeros = [[[0.0] * len(words[0])] * len(words) for words in rows.column("words").to_pylist()]
    forged = forged.set_column(column("words"), "words", pa.array(zeros, rows.schema.field("words").type))
    later = pc.add(rows.column("created_at"), pa.scalar(datetime.timedelta(days=1)))
    forged = forged.set_column(column("created_at"), rows.schema.field("created_at"), later)
    name = f"part-00000-{uuid.uuid4()}-c000.zstd.parquet"
    pq.write_table(forged, root / name)
    return name


# ---- 1. a writer killed at any moment --------------------------------------------------------------------------------

KILLS = 20
KILL_PLAN_BATCHES = 150  # more than 20 kills use (the rerun stops soon after the last)


def test_a_writer_killed_mid_commit_leaves_a_consistent_table(tmp_path: Path, writers: list[Writer]) -> None:
    """SIGKILL a writer 20 times at random moments of its appends; after each kill a fresh reader sees exactly
    the table after some prefix of the plan, at the version that prefix committed (batch N is version N + 1), each
    concept once, every tensor intact. A rerun then completes the plan. Files of the killed appends are in no
    read, and vacuum(0) deletes them."""
    root = tmp_path / "t"
    seed = 1729
    plan = kill_plan(seed, KILL_PLAN_BATCHES)
    rng = random.Random(seed)
    EmbeddingStore(root).append([record(cid, image_sha256(cid, g)) for cid, g in plan[0]])  # versions 0 and 1
    committed = 1  # batches committed: the table is apply(plan[:committed]) at version `committed`
    spec = {"mode": "kill", "location": str(root), "seed": seed, "batches": KILL_PLAN_BATCHES, "wait": True}
    append_seconds = [0.03]  # as the writers report them, but for each one's first
    mid_append = 0  # kills that landed while an append was running (not between two)
    # two writers start (import torch and deltalake) while one writes: the imports are most of this test's time
    pending = deque(spawn(writers, tmp_path, spec) for _ in range(2))
    for kill in range(KILLS):
        writer = pending.popleft()
        pending.append(spawn(writers, tmp_path, spec))
        writer.wait_ready()
        writer.go(committed)
        # after its first append (which also sets up deltalake, ~10 appends' time), a random moment within the
        # next few appends, as long as they take on this machine
        writer.wait_for("done ")
        time.sleep(rng.uniform(0.2, 4.0) * statistics.median(append_seconds[-20:]))
        writer.kill()
        assert writer.proc.returncode == -9, f"the writer was not killed, it exited:\n{writer.stderr()}"
        done, in_flight, seconds = progress(writer.lines())
        append_seconds += seconds[1:]
        assert done == {batch: str(batch + 1) for batch in range(committed, committed + len(done))}
        reported = committed + len(done)
        mid_append += in_flight is not None
        store = EmbeddingStore(root)  # a fresh reader, as another process would be
        found = check_table(store)
        version = store.version()
        if found == apply(plan[:reported]):
            assert version == reported, f"kill {kill}: the content of version {reported} at version {version}"
        else:  # the batch in flight did commit before the kill
            assert in_flight == reported and found == apply(plan[:reported + 1]), (
                f"kill {kill}: the table is no prefix of the plan ({reported} batches reported done)")
            assert version == reported + 1
        history = store.history()
        assert history[0]["operation"] == "MERGE"
        assert [commit["version"] for commit in history] == list(range(version, -1, -1))  # no gap, no stray
        committed = version
        assert committed < KILL_PLAN_BATCHES - 5, "the plan ran out before the kills: lengthen it"
    assert mid_append >= KILLS // 2, f"only {mid_append} of {KILLS} kills landed during an append"

    # files the killed appends wrote but never committed (and those of replaced rows): on disk, in no read
    orphans = data_files(root) - referenced(root)
    # and one planted for certain, with rows that would win over the live ones if it were read
    orphans.add(plant_forged_rows(root))
    assert check_table(EmbeddingStore(root)) == apply(plan[:committed])

    # a rerun completes the plan (cut short: a plan's first batches are the same at any length), starting again
    # at the last batch committed, which it finds stored unchanged and so commits nothing
    end = committed + 5
    rerun = pending.popleft()
    rerun.wait_ready()
    rerun.go(committed - 1, end)
    pending.popleft().kill()
    done, _, _ = progress(rerun.finish())
    assert done == {committed - 1: "-", **{batch: str(batch + 1) for batch in range(committed, end)}}
    final = check_table(EmbeddingStore(root))
    assert final == apply(plan[:end]) and len(final) == len({cid for batch in plan[:end] for cid, _ in batch})
    assert EmbeddingStore(root).version() == end

    store = EmbeddingStore(root)
    deleted = {Path(path).name for path in store.vacuum(0)}
    assert orphans <= deleted, f"vacuum(0) left unreferenced files: {orphans - deleted}"
    assert data_files(root) == referenced(root)  # only the current version's files are left
    assert check_table(EmbeddingStore(root)) == final
    assert check_table(store) == final  # the reader that vacuumed too


# ---- 2. writers at once ---------------------------------------------------------------------------------------------

def run_concurrently(writers: list[Writer], folder: Path, location: str, count: int, batches: int,
                     endpoint: str | None = None, create_races: int = 0) -> int:
    """`count` writers appending their concurrent plans to `location` at once (after racing to create
    `create_races` new tables); returns the merges redone after a conflict, all writers together."""
    group = [spawn(writers, folder, {"mode": "concurrent", "location": location, "writer": w,
                                     "batches": batches, "wait": True, "endpoint": endpoint})
             for w in range(count)]
    for writer in group:
        writer.wait_ready()
    now = time.time()
    race_at = [now + 0.5 + 0.1 * n for n in range(create_races)]  # a writer late for one just does not race
    for writer in group:
        writer.go(create_race=race_at)
    redone = 0
    for writer in group:
        lines = writer.finish()
        assert sorted(progress(lines)[0]) == list(range(batches))
        redone += merges(lines) - batches
    return redone


def check_concurrent_result(store: EmbeddingStore, count: int, batches: int) -> None:
    found = check_table(store)
    plans = [concurrent_plan(w, batches) for w in range(count)]
    expected = {cid: value for plan in plans for cid, value in apply(plan).items() if not cid.startswith("race-")}
    races = {cid for plan in plans for batch in plan for cid, _ in batch if cid.startswith("race-")}
    assert set(found) == set(expected) | races  # no concept lost
    assert {cid: found[cid] for cid in expected} == expected  # own concepts at their newest image
    for cid in races:  # written by every writer with its own image: one of them is current, whole
        assert found[cid] in {image_sha256(cid, w + 1) for w in range(count)}, cid


def test_three_local_writers_at_once_lose_nothing(tmp_path: Path, writers: list[Writer]) -> None:
    """Three writers append overlapping and distinct concepts to one table at once: each exits 0 (its
    conflicting commits redone), no concept is lost, none has two rows. Before that they race to create 24 new
    tables: each is created once (a create that lost the race must not commit its metadata again as a later
    version) and holds every writer's row."""
    root = tmp_path / "t"
    races = 24
    redone = run_concurrently(writers, tmp_path, str(root), count=3, batches=6, create_races=races)
    assert redone >= 1, "the writers never conflicted: this tested no retry"
    check_concurrent_result(EmbeddingStore(root), 3, 6)
    for table in [root, *(tmp_path / f"t-race-{n}" for n in range(races))]:
        history = EmbeddingStore(table).history()
        operations = [commit["operation"] for commit in reversed(history)]
        assert operations[0] == "CREATE TABLE" and "CREATE TABLE" not in operations[1:], (table, operations)
    for n in range(races):
        assert check_table(EmbeddingStore(tmp_path / f"t-race-{n}")) == {
            f"w{w}": image_sha256(f"w{w}", 0) for w in range(3)}


def test_two_s3_writers_at_once_lose_nothing(tmp_path: Path, writers: list[Writer], s3_server: MotoS3) -> None:
    location = f"s3://{s3_server.bucket}/{tmp_path.name}/concurrent"
    redone = run_concurrently(writers, tmp_path, location, count=2, batches=4, endpoint=s3_server.endpoint)
    assert redone >= 1, "the writers never conflicted: this tested no retry"
    store = embedding_store(location, s3_server.settings())
    assert isinstance(store, EmbeddingStore)
    check_concurrent_result(store, 2, 4)


# ---- 3. corrupt and missing data files ----------------------------------------------------------------------------

def small_table(root: Path, batches: int = 3) -> EmbeddingStore:
    """A table of a few batches without re-encoding, so each batch leaves one data file."""
    store = EmbeddingStore(root, row_group_rows=4)
    for b in range(batches):
        store.append([record(f"c{b}-{n}", image_sha256(f"c{b}-{n}", 0)) for n in range(8)])
    return store


def garbage_same_length(data: bytes) -> bytes:
    return np.random.default_rng(7).integers(0, 256, len(data), dtype=np.uint8).tobytes()


def garbage_in_tensors(path: Path) -> bytes:
    """The file with every local_tokens column chunk overwritten (page headers and data): the footer and the key
    columns intact, so the file opens and its keys read."""
    data = bytearray(path.read_bytes())
    footer = pq.ParquetFile(path).metadata
    column = footer.schema.to_arrow_schema().get_field_index("local_tokens")
    noise = garbage_same_length(bytes(data))
    for group in range(footer.num_row_groups):
        chunk = footer.row_group(group).column(column)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        data[start:start + chunk.total_compressed_size] = noise[start:start + chunk.total_compressed_size]
    return bytes(data)


DAMAGES = ["garbage", "truncated", "missing", "garbage in tensors"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_data_file_is_a_storage_error_naming_it(damage: str, tmp_path: Path) -> None:
    """A referenced data file overwritten with garbage (same length), cut short, deleted, or with garbage in its
    tensor pages only: every read that touches it is a StorageError (not transient: retrying will not help)
    naming the table's folder and the file and saying what is wrong; once the file is put back, the same
    reader reads every row."""
    root = tmp_path / "t"
    small_table(root)
    path = root / sorted(referenced(root))[1]
    data = path.read_bytes()
    calls = {"read_arrays": lambda s: s.read_arrays(None, ENCODER), "read_info": lambda s: s.read_info(),
             "current": lambda s: s.current(ENCODER), "concept_ids": lambda s: s.concept_ids(),
             "has": lambda s: s.has("c0-0", image_sha256("c0-0", 0), None, ENCODER)}
    why = {"garbage": "Parquet magic bytes not found", "truncated": "Parquet magic bytes not found",
           "missing": "No such file or directory", "garbage in tensors": ""}[damage]
    if damage == "garbage":
        path.write_bytes(garbage_same_length(data))
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(garbage_in_tensors(path))
        reader = EmbeddingStore(root)
        assert len(reader.current(ENCODER)) == 24 and reader.read_info().num_rows == 24  # keys still read
        calls = {"read_arrays": calls["read_arrays"]}
    reader = EmbeddingStore(root)
    for call, read in calls.items():
        with pytest.raises(StorageError) as caught:
            read(reader)
        message = str(caught.value)
        assert not isinstance(caught.value, TransientStorageError), message
        assert message.startswith(f"{path}: unreadable embedding store part: "), (call, message)
        assert path.parent == root and why in message, (call, message)
    # the file put back whole, the same reader reads every row: no failure was cached
    path.write_bytes(data)
    assert len(check_table(reader)) == 24


# ---- 4. foreign files ------------------------------------------------------------------------------------------------

def test_foreign_files_in_the_table_folder_are_not_read(tmp_path: Path) -> None:
    root = tmp_path / "t"
    store = small_table(root, batches=2)
    before = check_table(EmbeddingStore(root))
    (root / "notes.txt").write_text("not a data file")
    pq.write_table(pa.table({"x": [1, 2, 3]}), root / "stray.parquet")  # another schema
    plant_forged_rows(root)  # and one of our schema, whose rows would replace stored ones if it were read
    (root / "scratch").mkdir()
    shutil.copy(root / "stray.parquet", root / "scratch" / "old.parquet")
    (root / "_delta_log" / "README.txt").write_text("a note beside the log")
    assert check_table(EmbeddingStore(root)) == before
    assert check_table(store) == before  # a reader open before they appeared
    store.append([record("c-late", image_sha256("c-late", 0))])  # writing is unaffected too
    assert check_table(EmbeddingStore(root)) == {**before, "c-late": image_sha256("c-late", 0)}


# ---- 5. tables this release must not read --------------------------------------------------------------------------

def test_a_table_of_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "new"
    DeltaTable.create(str(root), CORE_SCHEMA, configuration={"elite.schema_version": "3"},
                      raise_if_key_not_exists=False)
    for call in (lambda s: s.read_info(), lambda s: s.current(ENCODER), lambda s: s.is_empty(),
                 lambda s: s.append([record("c", image_sha256("c", 0))])):
        with pytest.raises(StorageError, match="written by a newer release") as caught:
            call(EmbeddingStore(root))
        assert str(root) in str(caught.value) and "schema_version 3" in str(caught.value)
    with pytest.raises(StorageError, match="newer release"):
        embedding_store(root).read_info()
    assert DeltaTable(str(root)).version() == 0  # the append wrote nothing

    # a table upgraded in place by a newer release while an older one has it open
    root = tmp_path / "upgraded"
    store = small_table(root, batches=1)
    assert len(store.read_info()) == 8
    DeltaTable(str(root)).alter.set_table_properties({"elite.schema_version": "3"}, raise_if_not_exists=False)
    with pytest.raises(StorageError, match="written by a newer release"):
        store.read_info()
    with pytest.raises(StorageError, match="written by a newer release"):
        store.append([record("c", image_sha256("c", 0))])
    assert DeltaTable(str(root)).version() == 2  # created, appended, upgraded: nothing since


def test_a_plain_delta_table_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    DeltaTable.create(str(root), CORE_SCHEMA)
    for call in (lambda s: s.read_info(), lambda s: s.current(ENCODER),
                 lambda s: s.append([record("c", image_sha256("c", 0))])):
        with pytest.raises(StorageError, match="not an ELITE embedding table") as caught:
            call(EmbeddingStore(root))
        assert str(root) in str(caught.value) and "elite.schema_version" in str(caught.value)
    assert DeltaTable(str(root)).version() == 0


# ---- 6. locations this process may not write -------------------------------------------------------------------------

@contextlib.contextmanager
def read_only(folders: list[Path]) -> Iterator[None]:
    """Make `folders` refuse new entries for this process. Root ignores permission bits, so as root the folders
    are made immutable (`chattr +i`, which binds root too); otherwise their write bits are cleared."""
    root = os.geteuid() == 0
    chattr = shutil.which("chattr")
    if root and chattr is None:
        pytest.skip("running as root without chattr: a read-only folder cannot be made here")
    done: list[Path] = []
    try:
        for folder in folders:
            if root:
                result = subprocess.run([str(chattr), "+i", str(folder)], capture_output=True, text=True, timeout=60)
                if result.returncode != 0:
                    pytest.skip(f"chattr +i is refused here ({result.stderr.strip()}): cannot make a read-only folder")
            else:
                folder.chmod(0o555)
            done.append(folder)
        yield
    finally:
        for folder in done:
            if root:
                subprocess.run([str(chattr), "-i", str(folder)], capture_output=True, timeout=60)
            else:
                folder.chmod(0o755)


def test_a_read_only_local_table_refuses_appends_whole(tmp_path: Path) -> None:
    """An append to a table this process may not write fails with a StorageError naming the table and the cause,
    and leaves the table as it was: the whole folder read-only (no data file can be written), or only its log
    (the data file is written, the commit is not: an unreferenced file, in no read)."""
    whole, log_only = tmp_path / "whole", tmp_path / "log-only"
    before = {}
    for root in (whole, log_only):
        small_table(root, batches=2)
        before[root] = (check_table(EmbeddingStore(root)), data_files(root))
    paths_before = sorted(p.name for p in whole.rglob("*"))
    with read_only([whole, whole / "_delta_log", log_only / "_delta_log"]):
        for root in (whole, log_only):
            with pytest.raises(StorageError) as caught:
                EmbeddingStore(root).append([record("c-new", image_sha256("c-new", 0))])
            message = str(caught.value)
            assert message.startswith(f"{root}: merging into the embedding table failed"), message
            assert "Permission denied" in message or "Operation not permitted" in message, message
            store = EmbeddingStore(root)
            assert check_table(store) == before[root][0] and store.version() == 2  # nothing partial visible
    assert sorted(p.name for p in whole.rglob("*")) == paths_before  # not a byte written
    assert len(data_files(log_only) - before[log_only][1]) == 1  # the uncommitted data file, not read
    assert referenced(log_only) == before[log_only][1]


def test_a_read_only_s3_table_refuses_appends_whole(s3_server: MotoS3) -> None:
    """The same on S3: a bucket policy denying writes to the table's prefix, or only to its log."""
    bucket = "elite-read-only"  # a bucket of its own: a policy is per bucket
    client = S3Store(bucket, "", s3_server.settings()).client
    client.create_bucket(Bucket=bucket)

    def objects(prefix: str) -> set[str]:
        return {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])}

    denied = {"whole": "whole/*", "log-only": "log-only/_delta_log/*"}
    before = {}
    for prefix in denied:
        store = embedding_store(f"s3://{bucket}/{prefix}", s3_server.settings(), writable=True)
        assert isinstance(store, EmbeddingStore)
        store.append([record(f"c{n}", image_sha256(f"c{n}", 0)) for n in range(8)])
        before[prefix] = (check_table(store), objects(prefix))
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": f"ReadOnly{n}", "Effect": "Deny", "Principal": "*",
         "Action": ["s3:PutObject", "s3:PostObject", "s3:DeleteObject"], "Resource": f"arn:aws:s3:::{bucket}/{keys}"}
        for n, keys in enumerate(denied.values())]}))
    try:
        for prefix in denied:
            location = f"s3://{bucket}/{prefix}"
            store = embedding_store(location, s3_server.settings(), writable=True)
            assert isinstance(store, EmbeddingStore)
            with pytest.raises(StorageError) as caught:
                store.append([record("c-new", image_sha256("c-new", 0))])
            message = str(caught.value)
            assert message.startswith(f"{location}: merging into the embedding table failed"), message
            assert "lacked the necessary privileges" in message or "403" in message, message
            fresh = embedding_store(location, s3_server.settings())
            assert isinstance(fresh, EmbeddingStore)
            assert check_table(fresh) == before[prefix][0] and fresh.version() == 1  # nothing partial visible
            new = objects(prefix) - before[prefix][1]
            assert not {key for key in new if "/_delta_log/" in key}  # no commit
            assert len(new) == (prefix == "log-only")  # the uncommitted data file where data could be written
    finally:
        client.delete_bucket_policy(Bucket=bucket)


# ---- 7. past versions -----------------------------------------------------------------------------------------------

def test_past_versions_read_as_they_were_and_are_read_only(tmp_path: Path) -> None:
    root = tmp_path / "t"
    store = EmbeddingStore(root)
    first = [record(f"c{n}", image_sha256(f"c{n}", 0)) for n in range(4)]
    store.append(first)  # version 1
    store.append([record("c1", image_sha256("c1", 1))])  # version 2: c1 from a new image
    store.append([record("c9", image_sha256("c9", 0))])  # version 3
    past = EmbeddingStore(root, version=1)
    assert past.version() == 1
    assert check_table(past) == {f"c{n}": image_sha256(f"c{n}", 0) for n in range(4)}
    assert past.current(ENCODER)["c1"][0] == image_sha256("c1", 0)
    assert EmbeddingStore(root, version=2).current(ENCODER)["c1"][0] == image_sha256("c1", 1)
    assert check_table(EmbeddingStore(root))["c1"] == image_sha256("c1", 1)
    opened = embedding_store(root, version=1)
    assert isinstance(opened, EmbeddingStore) and opened.read_info(["c1"]).column("image_sha256").to_pylist() == [
        image_sha256("c1", 0)]
    for call in (lambda s: s.append([record("c5", image_sha256("c5", 0))]), lambda s: s.optimize(),
                 lambda s: s.vacuum(0)):
        with pytest.raises(InputError, match="opened at version 1, read-only"):
            call(past)
    assert EmbeddingStore(root).version() == 3 and referenced(root) <= data_files(root)
    for version in (4, 99):
        with pytest.raises((InputError, StorageError), match=f"version {version}") as caught:
            EmbeddingStore(root, version=version).read_info()
        assert str(root) in str(caught.value)
    with pytest.raises(InputError, match="version must be >= 0"):
        EmbeddingStore(root, version=-1)
    with pytest.raises(InputError, match="no embedding table here"):
        EmbeddingStore(tmp_path / "nothing", version=0).read_info()
