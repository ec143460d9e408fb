"""The embedding table (elite.data.store, schema_version 2): identity by MERGE, versions, compaction, vacuum,
migration from the earlier part format, and the `elite store` commands. Faults: tests/test_table_faults.py;
other tools reading the table: tests/test_store_queries.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from test_store import make_record

from elite.data.migrate import migrate_store
from elite.data.parts_store import PartStore
from elite.data.storage import embedding_store, embedding_table
from elite.data.store import EmbeddingStore
from elite.data.store_format import SCHEMA_VERSION, EmbeddingRecord
from elite.errors import InputError, StorageError
from elite.fileio import sha256_bytes
from elite_cli.main import main

if TYPE_CHECKING:
    from s3_server import MotoS3

pytest_plugins = ["s3_server"]


def changed(record: EmbeddingRecord, image: bytes, **metadata: Any) -> EmbeddingRecord:
    """The same concept re-encoded from other image bytes (other tensors too)."""
    words = record.words + 1.0
    return EmbeddingRecord(record.concept_id, record.source_uri, sha256_bytes(image), record.mask_sha256,
                           record.encoder_id, words, record.local_tokens, record.mask_grid,
                           {**record.metadata, **metadata})


def rows_per_key(root: Path) -> dict[tuple[str, str], int]:
    """(concept_id, encoder_id) -> rows in the current version, read by deltalake itself (not our reader)."""
    table = DeltaTable(str(root)).to_pyarrow_dataset().to_table(columns=["concept_id", "encoder_id"],
                                                                 use_threads=False)
    counts: dict[tuple[str, str], int] = {}
    for cid, enc in zip(table.column("concept_id").to_pylist(), table.column("encoder_id").to_pylist(), strict=True):
        counts[(cid, enc)] = counts.get((cid, enc), 0) + 1
    return counts


def test_one_current_row_per_concept_and_encoder(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "t", row_group_rows=2)
    records = [make_record(n, class_word="cat") for n in range(5)]
    assert store.append(records).written == 5
    again = store.append(records)  # unchanged bytes: nothing written, no new version
    assert (again.written, again.skipped, again.version) == (0, 5, None)
    assert store.version() == 1  # created (0), appended (1); a MERGE that changes nothing commits nothing
    new_image = changed(records[2], b"a new photo")
    twin = EmbeddingRecord("concept-twin", "file:///images/2.jpg", records[2].image_sha256, records[2].mask_sha256,
                           "enc-a", records[2].words, records[2].local_tokens, records[2].mask_grid)
    other_encoder = make_record(3, encoder_id="enc-b")
    result = store.append([new_image, twin, other_encoder])
    assert (result.written, result.skipped) == (3, 0)
    # the changed image replaced its row; byte-identical images are two concepts; another encoder is another row
    assert rows_per_key(tmp_path / "t") == {**{(f"concept-{n:03d}", "enc-a"): 1 for n in range(5)},
                                             ("concept-twin", "enc-a"): 1, ("concept-003", "enc-b"): 1}
    arrays = EmbeddingStore(tmp_path / "t").read_arrays(["concept-002", "concept-twin"], "enc-a")
    assert arrays.image_sha256 == [sha256_bytes(b"a new photo"), records[2].image_sha256]
    np.testing.assert_array_equal(arrays.words[0], records[2].words + 1.0)
    assert arrays.local_tokens.dtype == np.float16 and arrays.mask_grid.dtype == np.uint8
    assert arrays.local_tokens[1].tobytes() == records[2].local_tokens.tobytes()  # bit for bit
    np.testing.assert_array_equal(arrays.mask_grid[1], records[2].mask_grid)
    assert arrays.metadata["class_word"] == ["cat", None]
    with pytest.raises(InputError, match="stored under 2 encoders"):
        store.read_arrays(["concept-003"])
    assert store.current("enc-a")["concept-002"][0] == sha256_bytes(b"a new photo")
    assert store.has("concept-002", sha256_bytes(b"a new photo"), records[2].mask_sha256, "enc-a")
    assert not store.has("concept-002", records[2].image_sha256, records[2].mask_sha256, "enc-a")


def test_a_new_source_replaces_the_row_and_the_last_of_a_repeated_id_wins(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "t")
    first = make_record(1)
    moved = EmbeddingRecord(first.concept_id, "s3://elsewhere/1.jpg", first.image_sha256, first.mask_sha256,
                            first.encoder_id, first.words, first.local_tokens, first.mask_grid)
    store.append([first])
    assert store.append([moved]).written == 1
    assert store.read_info(["concept-001"]).column("source_uri").to_pylist() == ["s3://elsewhere/1.jpg"]
    result = store.append([changed(first, b"v2"), changed(first, b"v3")])
    assert (result.written, result.skipped) == (1, 1)
    assert store.current("enc-a")["concept-001"][0] == sha256_bytes(b"v3")


def test_the_table_is_a_delta_table_with_our_schema(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "t")
    store.append([make_record(1, sku="SKU-1"), make_record(2, text_dim=768, grid=16)])
    table = DeltaTable(str(tmp_path / "t"))
    assert table.metadata().configuration["elite.schema_version"] == str(SCHEMA_VERSION)
    schema = {field.name: str(field.type) for field in table.schema().fields}
    assert schema["local_tokens"].endswith('"binary")') and schema["mask_grid"].endswith('"binary")')
    assert list(schema)[:10] == ["concept_id", "source_uri", "image_sha256", "mask_sha256", "encoder_id", "words",
                                 "local_tokens", "mask_grid", "created_at", "schema_version"]
    assert "sku" in schema
    (name,) = store._listing()
    footer = pq.ParquetFile(tmp_path / "t" / name).metadata
    assert footer.num_row_groups == 1 and footer.row_group(0).column(6).statistics is None  # no tensor stats
    assert footer.row_group(0).column(0).statistics.has_min_max  # concept_id statistics for pruning


def test_metadata_types_are_kept_and_conflicts_refused(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "t")
    store.append([make_record(1, sku=17, price=2)])
    store.append([make_record(2, price=2.5, shop="A")])  # an int column takes a float? no: price stays int64
    with pytest.raises(InputError, match="metadata 'sku'"):
        store.append([make_record(3, sku="SKU-3")])
    info = store.read_info()
    assert info.column("sku").to_pylist() == [17, None] and info.column("shop").to_pylist() == [None, "A"]


def test_versions_history_and_time_travel(tmp_path: Path) -> None:
    root = tmp_path / "t"
    store = EmbeddingStore(root)
    first = make_record(1)
    store.append([first, make_record(2)])
    store.append([changed(first, b"second image")])
    history = store.history()
    assert [commit["version"] for commit in history] == [2, 1, 0]
    assert [commit["operation"] for commit in history] == ["MERGE", "MERGE", "CREATE TABLE"]
    past = embedding_store(root, version=1)
    assert isinstance(past, EmbeddingStore) and past.version() == 1
    assert past.read_arrays(["concept-001"]).image_sha256 == [first.image_sha256]
    assert store.read_arrays(["concept-001"]).image_sha256 == [sha256_bytes(b"second image")]
    with pytest.raises(InputError, match="read-only"):
        past.append([make_record(3)])
    with pytest.raises((InputError, StorageError), match="version 9"):
        EmbeddingStore(root, version=9).read_info()


def test_optimize_compacts_and_reads_stay_the_same(tmp_path: Path) -> None:
    root = tmp_path / "t"
    store = EmbeddingStore(root, row_group_rows=4)
    records = [make_record(n) for n in range(24)]
    for start in range(0, 24, 3):  # eight small files, as eight encode batches leave them
        store.append(records[start:start + 3])
    before = store.read_arrays()
    assert len(store._listing()) == 8 and store.small_files() == 8
    assert store.compact_small_files(min_files=9) is None  # under the trigger: nothing done
    metrics = store.compact_small_files(min_files=8)
    assert metrics is not None and (metrics["numFilesRemoved"], metrics["numFilesAdded"]) == (8, 1)
    fresh = EmbeddingStore(root)
    assert len(fresh._listing()) == 1
    after = fresh.read_arrays()
    assert after.concept_ids == before.concept_ids
    assert after.local_tokens.tobytes() == before.local_tokens.tobytes()
    assert pq.ParquetFile(root / fresh._listing()[0]).metadata.num_row_groups == 6  # row groups of 4 kept
    zordered = fresh.optimize(z_order=True)
    assert zordered["numFilesAdded"] == 1 and fresh.read_arrays(["concept-017"]).concept_ids == ["concept-017"]
    # the old files stay until vacuum, so the versions before compaction are still readable
    assert EmbeddingStore(root, version=8).read_arrays(["concept-005"]).concept_ids == ["concept-005"]
    deleted = fresh.vacuum(0)
    assert len(deleted) == 9 and len(list(root.glob("*.parquet"))) == 1
    assert fresh.read_arrays().local_tokens.tobytes() == before.local_tokens.tobytes()
    with pytest.raises(StorageError):
        EmbeddingStore(root, version=8).read_arrays(["concept-005"])  # its files are gone now


def test_a_store_of_the_earlier_format_is_read_and_never_written(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    PartStore(old).append([make_record(1), make_record(2)])
    store = embedding_store(old)
    assert isinstance(store, PartStore) and store.read_arrays(["concept-002"]).concept_ids == ["concept-002"]
    with pytest.raises(StorageError, match="elite store migrate"):
        embedding_table(old)
    assert isinstance(embedding_store(tmp_path / "nothing-yet"), EmbeddingStore)
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    (concepts / "a.png").write_bytes(b"not read: the store is refused first")
    before = sorted(p.name for p in old.iterdir())
    for command in (["encode", str(concepts), "--store", str(old)],
                    ["personalize", "--concepts", str(concepts), "--out", str(tmp_path / "out"), "--store", str(old),
                     "--tiny"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "earlier part format" in err and f"elite store migrate {old} NEW" in err, err
    assert sorted(p.name for p in old.iterdir()) == before  # nothing written to it


@pytest.mark.parametrize("where", ["local", "s3"])
def test_migration_keeps_every_current_row(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    settings = None
    old_uri, new_uri = str(tmp_path / "old"), str(tmp_path / "new")
    if where == "s3":
        server: MotoS3 = request.getfixturevalue("s3_server")
        settings = server.settings()
        old_uri, new_uri = (f"s3://{server.bucket}/{tmp_path.name}/{name}" for name in ("old", "new"))
    old = embedding_store(old_uri, settings)
    assert isinstance(old, PartStore) or old.is_empty()
    old = PartStore(old.storage)  # an empty location opens as a table: write the earlier format on purpose
    records = [make_record(n, class_word="cat") for n in range(6)]
    old.append(records[:4])
    old.append([changed(records[1], b"newer"), *records[4:], make_record(2, encoder_id="enc-b", masked=False)])
    expected = old.read_info(None, "enc-a")
    report = migrate_store(old_uri, new_uri, settings, chunk_rows=4)
    assert (report.source_rows, report.written, report.encoders) == (7, 7, ["enc-a", "enc-b"])
    table = embedding_store(new_uri, settings)
    assert isinstance(table, EmbeddingStore)
    got = table.read_info(None, "enc-a")
    for column in ("concept_id", "source_uri", "image_sha256", "mask_sha256", "created_at", "class_word"):
        assert got.column(column).to_pylist() == expected.column(column).to_pylist(), column
    new_arrays, old_arrays = table.read_arrays(None, "enc-a"), old.read_arrays(None, "enc-a")
    assert new_arrays.words.tobytes() == old_arrays.words.tobytes()
    assert new_arrays.local_tokens.tobytes() == old_arrays.local_tokens.tobytes()
    np.testing.assert_array_equal(new_arrays.mask_grid, old_arrays.mask_grid)
    assert table.read_info(None, "enc-b").column("mask_sha256").to_pylist() == [None]
    again = migrate_store(old_uri, new_uri, settings)  # a rerun (or an interrupted run finished) adds nothing
    assert (again.written, again.skipped) == (0, 7)
    with pytest.raises(InputError, match="nothing to migrate"):
        migrate_store(new_uri, str(tmp_path / "other"), settings)


def test_store_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    PartStore(old).append([make_record(n) for n in range(3)])
    assert main(["store", "migrate", str(old), str(new)]) == 0
    assert "migrated 3 concepts (3 written" in capsys.readouterr().out
    table = EmbeddingStore(new)
    for n in range(3, 6):
        table.append([make_record(n)])
    assert main(["store", "history", str(new), "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "4" and "MERGE" in lines[0]
    assert json.loads(lines[0].split("MERGE", 1)[1])["num_target_rows_inserted"] == 1
    assert main(["store", "optimize", str(new)]) == 0
    assert "4 files rewritten into 1" in capsys.readouterr().out
    assert main(["store", "vacuum", str(new), "--retention-hours", "0", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would delete 4 files")
    assert len(EmbeddingStore(new).vacuum(0, dry_run=True)) == 4  # a dry run deletes nothing
    assert main(["store", "history", str(old)]) == 1
    assert "earlier part format has no history" in capsys.readouterr().err
    assert main(["store", "optimize", str(tmp_path / "empty")]) == 1
    assert "no embedding table here" in capsys.readouterr().err
    assert main(["export", str(new), str(tmp_path / "export"), "--version", "2"]) == 0
    assert "exported 4 concepts (table version 2)" in capsys.readouterr().out


def test_the_encode_job_compacts_as_small_files_pile_up(tiny_models: Any, concepts_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    models = ["--pretrained-model", str(tiny_models.pretrained_model), "--global-mapper",
              str(tiny_models.global_mapper), "--local-mapper", str(tiny_models.local_mapper), "--vision-model",
              str(tiny_models.vision_model), "--device", "cpu"]
    assert main(["encode", str(concepts_dir), "--store", str(store), "--batch-size", "1",
                 "--compact-min-files", "4", *models]) == 0
    assert "compacted" in capsys.readouterr().out
    table = EmbeddingStore(store)
    operations = [commit["operation"] for commit in reversed(table.history())]
    assert operations.count("MERGE") == 11 and operations.count("OPTIMIZE") >= 2  # during the run, not only after
    assert operations.index("OPTIMIZE") < operations.index("MERGE") + 5  # the first after 4 batches
    assert len(table._listing()) < 4 and len(table.read_arrays()) == 11
    again = tmp_path / "store-never"
    assert main(["encode", str(concepts_dir), "--store", str(again), "--batch-size", "4", "--compact-min-files", "0",
                 *models]) == 0
    assert "OPTIMIZE" not in [commit["operation"] for commit in EmbeddingStore(again).history()]
