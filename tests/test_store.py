"""The earlier store format (schema_version 1, `PartStore`): a folder of Parquet parts, still read by every job until
`elite store migrate` converts it (tests/test_table.py covers the Delta table that replaced it)."""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import elite.data.parts_store
from elite.data.part_index import LocalFolder
from elite.data.parts_store import PartStore
from elite.data.store_format import PARTS_SCHEMA_VERSION, EmbeddingRecord
from elite.errors import InputError, StorageError
from elite.fileio import sha256_bytes, sha256_file
from elite.model.concepts import ConceptEmbedding

REPO = Path(__file__).resolve().parents[1]


def make_record(n: int, *, encoder_id: str = "enc-a", text_dim: int = 32, grid: int = 4, masked: bool = True,
                seed: int | None = None, **metadata: Any) -> EmbeddingRecord:
    """A record with random contents; its keys follow `n`, so the same `n` and encoder is a duplicate."""
    rng = np.random.default_rng(n if seed is None else seed)
    mask_grid = (rng.random((grid, grid)) > 0.5).astype(np.float32)  # (grid, grid)
    local_tokens = rng.standard_normal((grid * grid, text_dim), dtype=np.float32)  # (patches, text_dim)
    local_tokens *= mask_grid.reshape(-1, 1)  # zero on background patches, as the encoder writes them
    return EmbeddingRecord(
        concept_id=f"concept-{n:03d}", source_uri=f"file:///images/{n}.jpg",
        image_sha256=sha256_bytes(f"image {n}".encode()),
        mask_sha256=sha256_bytes(f"mask {n}".encode()) if masked else None, encoder_id=encoder_id,
        words=rng.standard_normal((5, text_dim), dtype=np.float32), local_tokens=local_tokens,
        mask_grid=mask_grid, metadata=metadata)


def visible_parts(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.parquet"))


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    store = PartStore(tmp_path, row_group_rows=3)
    real_size = make_record(99, text_dim=768, grid=16, class_word="dog", sku="SKU-99")  # (256, 768) tokens
    records = [make_record(n, masked=n % 2 == 0, class_word="cat", sku=f"SKU-{n}", price=n + 0.5)
               for n in range(7)]
    before = np.datetime64(datetime.datetime.now(datetime.UTC).replace(tzinfo=None), "us")
    assert store.append(records).written == 7
    assert store.append([real_size]).written == 1
    after = np.datetime64(datetime.datetime.now(datetime.UTC).replace(tzinfo=None), "us")
    wanted = ["concept-005", "concept-000", "concept-003"]
    arrays = store.read_arrays(wanted)
    assert arrays.concept_ids == wanted  # the order asked for, across row groups
    assert arrays.words.shape == (3, 5, 32) and arrays.words.dtype == np.float32
    assert arrays.local_tokens.shape == (3, 16, 32) and arrays.local_tokens.dtype == np.float16
    assert arrays.mask_grid.shape == (3, 4, 4) and arrays.mask_grid.dtype == np.uint8
    for i, n in enumerate((5, 0, 3)):
        record = records[n]
        assert arrays.words[i].tobytes() == record.words.tobytes()
        assert arrays.local_tokens[i].tobytes() == record.local_tokens.tobytes()
        assert np.array_equal(arrays.mask_grid[i], record.mask_grid)
        assert (arrays.source_uris[i], arrays.image_sha256[i], arrays.mask_sha256[i], arrays.encoder_ids[i]) == (
            record.source_uri, record.image_sha256, record.mask_sha256, record.encoder_id)
    assert arrays.mask_sha256[0] is None  # odd n: no mask file
    assert arrays.metadata == {"class_word": ["cat"] * 3, "price": [5.5, 0.5, 3.5], "sku": ["SKU-5", "SKU-0", "SKU-3"]}
    assert ((before <= arrays.created_at) & (arrays.created_at <= after)).all()  # UTC
    real = store.read_arrays(["concept-099"])
    assert real.local_tokens.shape == (1, 256, 768)
    assert real.local_tokens[0].tobytes() == real_size.local_tokens.tobytes()
    assert real.words[0].tobytes() == real_size.words.tobytes()
    assert real.metadata == {"class_word": ["dog"], "sku": ["SKU-99"]}


def test_embeddings_round_trip_through_concept_embedding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mask = (torch.rand(16, 16) > 0.5).float()
    embedding = ConceptEmbedding("mug", torch.randn(5, 768), torch.randn(256, 768) * mask.reshape(-1, 1), mask)
    record = EmbeddingRecord.from_embedding(embedding, source_uri="s3://bucket/mug.jpg", image_sha256="a" * 64,
                                            mask_sha256=None, encoder_id="enc", metadata={"class_word": "mug"})
    store = PartStore(tmp_path)
    store.append([record])
    [back] = store.read_embeddings(["mug"])
    assert back.concept_id == "mug"
    assert torch.equal(back.words, embedding.words)
    assert torch.equal(back.local_tokens, embedding.local_tokens.half().float())  # stored as float16
    assert torch.equal(back.mask_grid, mask)
    assert back.local_tokens.dtype == back.mask_grid.dtype == torch.float32


def test_duplicates_are_skipped(tmp_path: Path) -> None:
    store = PartStore(tmp_path)
    first = store.append([make_record(1), make_record(2), make_record(1)])  # repeated within the call
    assert (first.written, first.skipped) == (2, 1) and first.part in visible_parts(tmp_path)
    # another store on the same folder (another process, say) sees the stored keys
    other = PartStore(tmp_path)
    again = other.append([make_record(2), make_record(1)])
    assert (again.written, again.skipped, again.part) == (0, 2, None)
    assert len(visible_parts(tmp_path)) == 1
    # any part of the key differing is a new row: no mask, another encoder
    new = other.append([make_record(1, masked=False), make_record(1, encoder_id="enc-b"), make_record(3)])
    assert (new.written, new.skipped) == (3, 0)
    assert store.has("concept-001", sha256_bytes(b"image 1"), None, "enc-a")
    assert store.has("concept-001", sha256_bytes(b"image 1"), sha256_bytes(b"mask 1"), "enc-b")
    assert not store.has("concept-002", sha256_bytes(b"image 2"), None, "enc-a")
    assert not store.has("concept-009", sha256_bytes(b"image 1"), None, "enc-a")  # the key holds the id
    assert len(store.stored_keys()) == 5
    assert store.concept_ids() == ["concept-001", "concept-002", "concept-003"]
    assert store.concept_ids("enc-b") == ["concept-001"]


KILLED_WRITER = r"""
import sys
import numpy as np
from elite.data.parts_store import PartStore
from elite.data.store_format import EmbeddingRecord
from elite.fileio import sha256_bytes

rows = int(sys.argv[2])
rng = np.random.default_rng(1)
# finite float16 bit patterns drawn at random: incompressible, so the part is really rows x 384 KiB
local_tokens = rng.integers(0, 0x7C00, size=(rows, 256, 768), dtype=np.uint16).view(np.float16)
records = [EmbeddingRecord(f"big-{i}", "file:///big.jpg", sha256_bytes(b"big %d" % i), None, "enc-a",
                           np.zeros((5, 768), np.float32), local_tokens[i], np.ones((16, 16)))
           for i in range(rows)]
PartStore(sys.argv[1], row_group_rows=4).append(records)
"""


def test_writer_killed_mid_write_leaves_a_readable_store(tmp_path: Path) -> None:
    store = PartStore(tmp_path)
    store.append([make_record(1), make_record(2)])
    before = visible_parts(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), "400"], env=env,
                              stderr=subprocess.PIPE)
    deadline, killed_at = time.monotonic() + 60, 0
    try:
        while time.monotonic() < deadline and writer.poll() is None:  # kill once 4 MB of the ~150 MB are out
            sizes = [p.stat().st_size for p in tmp_path.iterdir() if p.name.startswith(".")]
            if sizes and max(sizes) > 4_000_000:
                killed_at = max(sizes)
                os.kill(writer.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if writer.poll() is None and not killed_at:
            writer.kill()
        _, stderr = writer.communicate(timeout=30)
    assert killed_at, f"the writer ended before it could be killed mid-write: {stderr.decode()[-2000:]}"
    assert writer.returncode == -signal.SIGKILL
    temp_files = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(temp_files) == 1 and temp_files[0].name.endswith(".tmp")  # the half-written part, hidden
    assert visible_parts(tmp_path) == before  # no partial part visible
    fresh = PartStore(tmp_path)
    assert fresh.concept_ids() == ["concept-001", "concept-002"]
    assert fresh.read_arrays(["concept-002"]).words[0].tobytes() == make_record(2).words.tobytes()
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/*.parquet')").fetchall()
    assert count == [(2,)]
    assert fresh.append([make_record(3)]).written == 1  # and writing goes on


def test_duckdb_reads_the_parts(tmp_path: Path) -> None:
    store = PartStore(tmp_path, row_group_rows=2)
    cats = [make_record(n, class_word="cat", sku=f"SKU-{n}") for n in range(5)]
    store.append(cats)
    store.append([make_record(10, text_dim=768, grid=16, class_word="dog")])  # no sku column in this part
    (tmp_path / ".part-x.parquet.0123abcd.tmp").write_bytes(b"half a part")  # a killed writer's leftover
    rows = duckdb.sql(f"""
        SELECT concept_id, len(words), len(words[1]), octet_length(local_tokens), len(mask_grid),
               class_word, sku, schema_version, mask_sha256 IS NULL
        FROM read_parquet('{tmp_path}/*.parquet', union_by_name = true) ORDER BY concept_id""").fetchall()
    version = PARTS_SCHEMA_VERSION
    assert rows == [*[(f"concept-{n:03d}", 5, 32, 16 * 32 * 2, 4, "cat", f"SKU-{n}", version, False)
                      for n in range(5)],
                    ("concept-010", 5, 768, 256 * 768 * 2, 16, "dog", None, version, False)]
    primary, blob = duckdb.sql(f"""SELECT words[1], local_tokens FROM read_parquet('{tmp_path}/*.parquet',
        union_by_name = true) WHERE concept_id = 'concept-003'""").fetchall()[0]
    assert np.array(primary, np.float32).tobytes() == cats[3].words[0].tobytes()
    assert bytes(blob) == cats[3].local_tokens.tobytes()  # float16 little-endian, decodable anywhere


def test_schema_version_mismatch_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    PartStore(tmp_path).append([make_record(1)])
    # a part from a future release
    monkeypatch.setattr(elite.data.parts_store, "PARTS_SCHEMA_VERSION", PARTS_SCHEMA_VERSION + 1)
    future = PartStore(tmp_path / "future").append([make_record(2)]).part
    assert future is not None
    monkeypatch.undo()
    os.replace(tmp_path / "future" / future, tmp_path / future)
    for call in (lambda s: s.read_arrays(["concept-001"]), lambda s: s.append([make_record(3)]),
                 lambda s: s.concept_ids()):
        with pytest.raises(StorageError) as err:
            call(PartStore(tmp_path))
        message = str(err.value)
        assert future in message
        assert f"schema_version {PARTS_SCHEMA_VERSION + 1}" in message
        assert f"schema_version {PARTS_SCHEMA_VERSION}" in message


def test_unreadable_part_is_named(tmp_path: Path) -> None:
    store = PartStore(tmp_path)
    part = store.append([make_record(1)]).part
    assert part is not None
    data = (tmp_path / part).read_bytes()
    (tmp_path / "part-truncated.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(StorageError, match=r"part-truncated\.parquet: unreadable embedding store part"):
        PartStore(tmp_path).read_arrays(["concept-001"])
    (tmp_path / "part-truncated.parquet").unlink()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "part-foreign.parquet")
    with pytest.raises(StorageError, match=r"part-foreign\.parquet: not an ELITE embedding store part"):
        store.concept_ids()


def test_missing_concept_id_is_named(tmp_path: Path) -> None:
    store = PartStore(tmp_path)
    store.append([make_record(1)])
    with pytest.raises(InputError, match=r"concept id 'nope' is not in the embedding store at .*\(1 more missing\)"):
        store.read_arrays(["concept-001", "nope", "nada"])
    with pytest.raises(InputError, match=r"concept id 'concept-001' .* under encoder 'enc-z'"):
        store.read_arrays(["concept-001"], encoder_id="enc-z")
    empty = PartStore(tmp_path / "never-written")
    assert empty.concept_ids() == [] and len(empty.read_arrays()) == 0
    with pytest.raises(InputError, match="'concept-001'"):
        empty.read_embeddings(["concept-001"])


def test_metadata_columns_may_differ_between_parts(tmp_path: Path) -> None:
    store = PartStore(tmp_path)
    store.append([make_record(1, class_word="cat", sku=17), make_record(2, class_word=None)])
    store.append([make_record(3, color="red", sku=18, on_sale=True)])
    arrays = store.read_arrays()
    assert arrays.concept_ids == ["concept-001", "concept-002", "concept-003"]
    assert arrays.metadata == {"class_word": ["cat", None, None], "sku": [17, None, 18],
                               "color": [None, None, "red"], "on_sale": [None, None, True]}
    with pytest.raises(InputError, match="'sku': values do not fit the stored type int64"):
        store.append([make_record(4, sku="SKU-4")])
    with pytest.raises(InputError, match="metadata key 'created_at' collides with a core column"):
        make_record(5, created_at="yesterday")
    with pytest.raises(InputError, match="metadata 'when' is a list"):
        make_record(6, when=[1, 2])


def test_selective_read_touches_only_the_needed_row_groups(tmp_path: Path) -> None:
    class CountingFolder(LocalFolder):
        bytes_read = 0

        def open_part(self, name: str) -> Any:
            folder = self

            class Counting(io.FileIO):
                def read(self, size: int = -1) -> bytes:  # pyarrow's PythonFile reads through this
                    data = super().read(size)
                    folder.bytes_read += len(data)
                    return data

            return pa.PythonFile(Counting(str(self.root / name)), mode="r")

    folder = CountingFolder(tmp_path)
    store = PartStore(folder, row_group_rows=4)
    records = [make_record(n, text_dim=768, grid=16, seed=n, masked=False) for n in range(48)]  # 12 row groups
    store.append(records)
    part_size = sum(p.stat().st_size for p in tmp_path.glob("*.parquet"))
    store.concept_ids()  # the index (key columns of every row) is read once and cached
    folder.bytes_read = 0
    arrays = store.read_arrays(["concept-030"])
    assert arrays.local_tokens[0].tobytes() == records[30].local_tokens.tobytes()
    assert 0 < folder.bytes_read < part_size / 8, (folder.bytes_read, part_size)  # one row group of 12


def test_concurrent_writers_do_not_clobber_each_other(tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    results = []

    def writer(first: int) -> None:
        store = PartStore(tmp_path)  # one store per writer, as in two processes
        records = [make_record(n) for n in range(first, first + 20)]
        barrier.wait()
        results.append(store.append(records))

    threads = [threading.Thread(target=writer, args=(first,)) for first in (0, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.written for r in results) == [20, 20]
    assert sorted(r.part for r in results if r.part) == visible_parts(tmp_path)
    assert len(PartStore(tmp_path).read_arrays()) == 40


def test_read_info_gives_the_rows_without_tensors(tmp_path: Path) -> None:
    store = PartStore(tmp_path, row_group_rows=2)
    store.append([make_record(1, class_word="cat", sku=17), make_record(2, class_word=None)])
    store.append([make_record(3, color="red", sku=18)])
    changed = make_record(1, seed=99, class_word="dog")  # concept-001 again, from other image bytes: newest wins
    store.append([EmbeddingRecord(changed.concept_id, changed.source_uri, "c" * 64, None, "enc-a", changed.words,
                                  changed.local_tokens, changed.mask_grid, {"class_word": "dog"})])
    info = store.read_info()
    assert info.column("concept_id").to_pylist() == ["concept-001", "concept-002", "concept-003"]
    assert not set(info.column_names) & {"words", "local_tokens", "mask_grid"}
    assert info.column("class_word").to_pylist() == ["dog", None, None]
    assert info.column("sku").to_pylist() == [None, None, 18]
    assert info.column("image_sha256").to_pylist()[0] == "c" * 64
    asked = store.read_info(["concept-003", "concept-001"])
    assert asked.column("concept_id").to_pylist() == ["concept-003", "concept-001"]  # in the order asked
    assert asked.column("source_uri").to_pylist() == store.read_arrays(["concept-003", "concept-001"]).source_uris
    assert store.read_info([]).num_rows == 0
    with pytest.raises(InputError, match="'concept-404' is not in the embedding store"):
        store.read_info(["concept-404"])
    assert PartStore(tmp_path / "empty").read_info().num_rows == 0


def test_newest_row_wins_and_mixed_encoders_need_an_encoder_id(tmp_path: Path) -> None:
    store = PartStore(tmp_path)
    old = make_record(1)
    store.append([old])
    # the same concept id re-encoded from a changed image: a new key, so a new row
    changed = EmbeddingRecord(old.concept_id, old.source_uri, "b" * 64, None, "enc-a", old.words + 1,
                              old.local_tokens, old.mask_grid)
    store.append([changed])
    assert store.read_arrays([old.concept_id]).image_sha256 == ["b" * 64]
    store.append([make_record(1, encoder_id="enc-b", text_dim=16)])
    with pytest.raises(InputError, match="'concept-001' is stored under 2 encoders \\(enc-a, enc-b\\)"):
        store.read_arrays([old.concept_id])
    assert store.read_arrays([old.concept_id], encoder_id="enc-b").words.shape == (1, 5, 16)


@pytest.mark.parametrize(("change", "message"), [
    ({"image_sha256": "ABC"}, "image_sha256 must be 64 lowercase hex digits"),
    ({"mask_sha256": ""}, "mask_sha256 must be 64 lowercase hex digits"),
    ({"concept_id": ""}, "concept_id must be a non-empty string"),
    ({"words": np.zeros(8, np.float32)}, "words must be \\(words, text_dim\\)"),
    ({"local_tokens": np.zeros((16, 31))}, "local_tokens must be \\(16, 32\\)"),
    ({"mask_grid": np.full((4, 4), 0.5)}, "mask_grid must hold only 0 and 1"),
    ({"local_tokens": np.full((16, 32), 1e6)}, "not finite"),  # beyond float16's range
])
def test_bad_records_are_refused(change: dict[str, Any], message: str) -> None:
    fields = {name: getattr(make_record(1), name) for name in (
        "concept_id", "source_uri", "image_sha256", "mask_sha256", "encoder_id", "words", "local_tokens", "mask_grid")}
    with pytest.raises(InputError, match=message):
        EmbeddingRecord(**{**fields, **change})


def test_sha256_helpers(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "image.jpg").write_bytes(data)
    assert sha256_file(tmp_path / "image.jpg") == sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    with pytest.raises(StorageError, match=r"missing\.jpg"):
        sha256_file(tmp_path / "missing.jpg")
