"""elite.data.export and the export flow: every format read back against the store, filters, sharding,
the textual-inversion file in diffusers, and the flow on a folder and on a (moto) S3 server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.numpy

from elite.data.export import plan_export
from elite.data.storage import open_store
from elite.data.store import EmbeddingStore
from elite.data.store_format import EmbeddingRecord, StoredArrays
from elite.errors import InputError
from elite.fileio import sha256_bytes
from elite.jobs.export import export_embeddings
from elite.model.concepts import load_embeddings
from elite.model.tiny import TEXT_DIM, TinyModels

if TYPE_CHECKING:
    from s3_server import MotoS3  # only for types: see s3_server's docstring

pytest_plugins = ["s3_server"]

GRID = 4
IDS = [f"concept-{n:03d}" for n in range(5)]


def record(n: int, version: int = 0, encoder_id: str = "enc-a", **metadata: Any) -> EmbeddingRecord:
    """Random arrays in the tiny models' text width; `version` changes the image (a re-encode) and the values."""
    rng = np.random.default_rng(100 * n + version + (1000 if encoder_id != "enc-a" else 0))
    mask_grid = (rng.random((GRID, GRID)) > 0.4).astype(np.uint8)  # (grid, grid)
    local_tokens = rng.standard_normal((GRID * GRID, TEXT_DIM), dtype=np.float32) * mask_grid.reshape(-1, 1)
    return EmbeddingRecord(
        concept_id=f"concept-{n:03d}", source_uri=f"s3://catalog/{n}.jpg",
        image_sha256=sha256_bytes(f"image {n} v{version}".encode()),
        mask_sha256=sha256_bytes(f"mask {n}".encode()) if n % 2 == 0 else None, encoder_id=encoder_id,
        words=rng.standard_normal((5, TEXT_DIM), dtype=np.float32), local_tokens=local_tokens,
        mask_grid=mask_grid, metadata=metadata)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five concepts in two parts; concept-002 re-encoded in the second (its newest row counts), and concept-004
    only in the second, which has no `shop` column."""
    root = tmp_path_factory.mktemp("store")
    store = EmbeddingStore(root, row_group_rows=2)
    store.append([record(0, class_word="dog", shop="a"), record(1, class_word="dog", shop="b"),
                  record(2, class_word="dog", shop="a"), record(3, class_word="shoe", shop="c")])
    store.append([record(2, version=1, class_word="cat"), record(4, class_word="dog")])
    return root


@pytest.fixture(scope="module")
def stored(store_dir: Path) -> StoredArrays:
    return EmbeddingStore(store_dir).read_arrays()


def rows_of(stored: StoredArrays, ids: list[str]) -> list[int]:
    return [stored.concept_ids.index(cid) for cid in ids]


def read_json(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


# ---- formats -------------------------------------------------------------------------------------

def test_parquet_shards_round_trip(store_dir: Path, stored: StoredArrays, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = export_embeddings(store_dir, out, "parquet", shard_size=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "embeddings-00000.parquet", "embeddings-00001.parquet", "embeddings-00002.parquet", "manifest.json"]
    table = pq.read_table([out / f["key"] for f in result["files"]])  # in shard order
    assert table.column("concept_id").to_pylist() == IDS == stored.concept_ids  # sorted, none lost or twice
    assert [f["concepts"] for f in result["files"]] == [2, 2, 1]
    assert table.schema.field("words").type.list_size == 5  # fixed-size lists carry the shapes
    words = np.array(table.column("words").to_pylist(), dtype=np.float32)  # (5, 5, text_dim)
    tokens = np.array(table.column("local_tokens").to_pylist(), dtype=np.float32)  # (5, patches, text_dim)
    mask = np.array(table.column("mask_grid").to_pylist(), dtype=np.uint8)
    assert words.tobytes() == stored.words.tobytes()
    assert np.array_equal(tokens, stored.local_tokens.astype(np.float32))
    assert np.array_equal(mask, stored.mask_grid)
    assert words[2, 0].tobytes() == record(2, version=1).words[0].tobytes()  # the re-encoded concept's newest row
    assert table.column("class_word").to_pylist() == ["dog", "dog", "cat", "shoe", "dog"]
    assert table.column("shop").to_pylist() == ["a", "b", None, "c", None]  # 002's newest part has no shop
    assert table.column("image_sha256").to_pylist() == stored.image_sha256
    assert table.column("mask_sha256").to_pylist() == stored.mask_sha256
    assert table.column("source_uri").to_pylist() == stored.source_uris
    assert set(table.column("encoder_id").to_pylist()) == {"enc-a"}
    layout = json.loads(pq.read_schema(out / "embeddings-00000.parquet").metadata[b"elite.model.onnx_export"])
    assert layout["words"] == [5, TEXT_DIM] and layout["local_tokens"] == [GRID * GRID, TEXT_DIM]

    # readable without elite: DuckDB over the shard glob, SQL lists 1-based
    w0 = duckdb.sql(f"SELECT concept_id, words[1] FROM read_parquet('{out}/*.parquet') "
                    "WHERE class_word = 'dog' ORDER BY concept_id").fetchall()
    assert [cid for cid, _ in w0] == ["concept-000", "concept-001", "concept-004"]
    assert np.allclose(w0[0][1], stored.words[0, 0])

    manifest = read_json(out / "manifest.json")
    assert (manifest["format"], manifest["exported"], manifest["shards"]) == ("parquet", 5, 3)
    assert manifest["encoder_ids"] == ["enc-a"] and manifest["where"] == {} and manifest["concept_ids"] is None
    assert [f["sha256"] for f in manifest["files"]] == [sha256_bytes((out / f["key"]).read_bytes())
                                                        for f in manifest["files"]]


def test_safetensors_and_numpy_round_trip(store_dir: Path, stored: StoredArrays, tmp_path: Path) -> None:
    export_embeddings(store_dir, tmp_path / "st", "safetensors", shard_size=3)
    concepts = [c for name in ("embeddings-00000", "embeddings-00001")
                for c in load_embeddings(tmp_path / "st" / f"{name}.safetensors")]
    assert [c.concept_id for c in concepts] == IDS
    for i, concept in enumerate(concepts):
        assert concept.words.numpy().tobytes() == stored.words[i].tobytes()
        assert np.array_equal(concept.local_tokens.numpy(), stored.local_tokens[i].astype(np.float32))
        assert np.array_equal(concept.mask_grid.numpy(), stored.mask_grid[i])

    export_embeddings(store_dir, tmp_path / "np", "numpy", concept_ids=["concept-003", "concept-001"])
    with np.load(tmp_path / "np" / "embeddings-00000.npz", allow_pickle=False) as npz:
        assert npz["concept_ids"].tolist() == ["concept-001", "concept-003"]  # sorted
        assert npz["encoder_ids"].tolist() == ["enc-a", "enc-a"]
        rows = rows_of(stored, ["concept-001", "concept-003"])
        assert npz["words"].tobytes() == stored.words[rows].tobytes()
        assert npz["local_tokens"].dtype == np.float16  # as stored, bit for bit
        assert npz["local_tokens"].tobytes() == stored.local_tokens[rows].tobytes()
        assert np.array_equal(npz["mask_grid"], stored.mask_grid[rows])


# ---- selection -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("concept_ids", "where", "expected"), [
    (None, {"class_word": "dog"}, ["concept-000", "concept-001", "concept-004"]),
    (None, {"class_word": "dog", "shop": ["a", "b"]}, ["concept-000", "concept-001"]),
    (None, {"shop": [None]}, ["concept-002", "concept-004"]),  # None: no value in the newest row
    (["concept-004", "concept-002", "concept-002"], None, ["concept-002", "concept-004"]),
    (["concept-000", "concept-003", "concept-004"], {"class_word": ("dog", "cat")}, ["concept-000", "concept-004"]),
])
def test_selection(store_dir: Path, tmp_path: Path, concept_ids: list[str] | None, where: dict[str, Any] | None,
                   expected: list[str]) -> None:
    plan = plan_export(store_dir, tmp_path, concept_ids=concept_ids, where=where, shard_size=2)
    assert [cid for shard in plan.shards for cid in shard] == expected


@pytest.mark.parametrize(("arguments", "message"), [
    ({"where": {"colour": "red"}}, "unknown metadata column 'colour'; the store's metadata columns are: class_word, "
                                   "shop"),
    ({"where": {"class_word": "horse"}}, "nothing to export"),
    ({"where": {"class_word": []}}, "'class_word' accepts no value"),
    ({"where": {"class_word": {"dog": 1}}}, "value {'dog': 1} is a dict"),
    ({"concept_ids": ["concept-000", "nope"]}, "concept id 'nope' is not in the embedding store"),
    ({"concept_ids": "concept-000"}, "not one string"),
    ({"format": "csv"}, "export format 'csv' is unknown"),
    ({"shard_size": 0}, "shard_size must be an integer of at least 1"),
    ({"format": "textual-inversion", "token_template": "<concept>"}, "must contain {concept_id}"),
    ({"format": "textual-inversion", "token_template": "<{concept_id}{x}>"}, "not a format string"),
    ({"encoder_id": "enc-z"}, "nothing to export"),
])
def test_bad_requests_fail_before_writing(store_dir: Path, tmp_path: Path, arguments: dict[str, Any],
                                          message: str) -> None:
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("(", r"\(")):
        export_embeddings(store_dir, tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_several_encoders(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "store")
    store.append([record(0, class_word="dog"), record(1, class_word="dog"),
                  record(0, encoder_id="enc-b", class_word="dog")])
    with pytest.raises(InputError, match="concept id 'concept-000' is stored under 2 encoders"):
        plan_export(tmp_path / "store", tmp_path / "out")
    result = export_embeddings(tmp_path / "store", tmp_path / "out", "numpy", encoder_id="enc-b")
    assert (result["exported"], result["encoder_id"], result["encoder_ids"]) == (1, "enc-b", ["enc-b"])
    with np.load(tmp_path / "out" / "embeddings-00000.npz") as npz:
        assert npz["words"][0].tobytes() == record(0, encoder_id="enc-b").words.tobytes()


# ---- textual inversion ---------------------------------------------------------------------------

def test_textual_inversion_loads_in_diffusers(store_dir: Path, stored: StoredArrays, tiny_models: TinyModels,
                                              tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ti"
    result = export_embeddings(store_dir, out, "textual-inversion", where={"class_word": "dog"}, shard_size=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "concept-000.safetensors", "concept-001.safetensors", "concept-004.safetensors", "manifest.json"]
    assert [(f["key"], f["token"]) for f in result["files"]] == [
        (f"{cid}.safetensors", f"<{cid}>") for cid in ("concept-000", "concept-001", "concept-004")]
    assert (result["exported"], result["shards"], result["token_template"]) == (3, 2, "<{concept_id}>")
    assert list(safetensors.numpy.load_file(out / "concept-000.safetensors")) == ["<concept-000>"]  # one key

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.pretrained_model, safety_checker=None,
                                                   requires_safety_checker=False)
    vocab = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(out / "concept-000.safetensors"))  # the token comes from the file
    pipe.load_textual_inversion(str(out / "concept-004.safetensors"), token="<my-dog>")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    for token, cid in (("<concept-000>", "concept-000"), ("<my-dog>", "concept-004")):
        ids = pipe.tokenizer(f"a photo of {token}").input_ids
        [new] = [i for i in ids if i >= vocab]  # one new id per concept
        assert pipe.tokenizer.convert_tokens_to_ids(token) == new
        assert np.allclose(table[new], stored.words[stored.concept_ids.index(cid), 0])  # w0
    assert len(pipe.tokenizer) == vocab + 2


def test_textual_inversion_refuses_ids_that_are_no_file_name(tmp_path: Path) -> None:
    bad = record(0)
    store = EmbeddingStore(tmp_path / "store")
    store.append([EmbeddingRecord("shoes/red", bad.source_uri, bad.image_sha256, None, "enc-a", bad.words,
                                  bad.local_tokens, bad.mask_grid)])
    with pytest.raises(InputError, match="concept id 'shoes/red' cannot name a textual-inversion file"):
        plan_export(tmp_path / "store", tmp_path / "out", "textual-inversion")


# ---- the flow (under conftest's session-wide `prefect_harness`) ---------------------------------

def test_flow_to_a_folder(prefect_harness: None, store_dir: Path, stored: StoredArrays, tmp_path: Path) -> None:
    from flows.export import export_embeddings as export_flow

    out = tmp_path / "out"
    run = export_flow(str(store_dir), str(out), "parquet", where={"class_word": ["dog", "shoe"]}, shard_size=2,
                      max_concurrency=2)
    assert (run["exported"], run["shards"], run["files"]) == (4, 2, 2)
    assert run["where"] == {"class_word": ["dog", "shoe"]} and run["encoder_ids"] == ["enc-a"]
    manifest = read_json(Path(run["manifest_uri"].removeprefix("file://")))
    assert manifest["exported"] == 4 and [f["key"] for f in manifest["files"]] == [
        "embeddings-00000.parquet", "embeddings-00001.parquet"]
    table = pq.read_table([out / "embeddings-00000.parquet", out / "embeddings-00001.parquet"])
    ids = ["concept-000", "concept-001", "concept-003", "concept-004"]
    assert table.column("concept_id").to_pylist() == ids
    assert np.array(table.column("words").to_pylist(), np.float32).tobytes() == \
        stored.words[rows_of(stored, ids)].tobytes()

    with pytest.raises(InputError, match="unknown metadata column 'colour'"):
        export_flow(str(store_dir), str(tmp_path / "bad"), where={"colour": "red"})
    with pytest.raises(InputError, match="export format 'csv' is unknown"):
        export_flow(str(store_dir), str(tmp_path / "bad"), "csv")
    assert not (tmp_path / "bad").exists()


def test_flow_to_s3(prefect_harness: None, store_dir: Path, stored: StoredArrays, s3_server: MotoS3,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.export import export_embeddings as export_flow

    settings = s3_server.settings()
    for name in ("endpoint_url", "region", "access_key_id", "secret_access_key", "max_attempts"):
        monkeypatch.setenv(f"ELITE_S3_{name.upper()}", str(getattr(settings, name)))
    dest = f"s3://{s3_server.bucket}/export-{uuid.uuid4().hex[:12]}"
    run = export_flow(str(store_dir), dest, "textual-inversion", concept_ids=["concept-003", "concept-001"],
                      token_template="elite-{concept_id}")
    assert run["exported"] == 2 and run["manifest_uri"] == f"{dest}/manifest.json"
    bucket = open_store(dest, settings)
    assert [info.key for info in bucket.list()] == ["concept-001.safetensors", "concept-003.safetensors",
                                                    "manifest.json"]
    manifest = json.loads(bucket.get("manifest.json"))
    assert manifest["concept_ids"] == ["concept-001", "concept-003"] and manifest["dest_uri"] == dest
    for cid in ("concept-001", "concept-003"):
        tensors = safetensors.numpy.load(bucket.get(f"{cid}.safetensors"))
        assert list(tensors) == [f"elite-{cid}"]
        assert tensors[f"elite-{cid}"].shape == (1, TEXT_DIM)
        assert tensors[f"elite-{cid}"].tobytes() == stored.words[stored.concept_ids.index(cid), :1].tobytes()
