"""The Prefect flows end to end on tiny models under Prefect's test harness: a local folder and a real S3 endpoint
(moto's HTTP server on 127.0.0.1) hold the catalog, the prompts, the embedding store and the images."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elite.data.storage import ObjectStore, S3Store, embedding_store, open_store
from elite.fileio import sha256_bytes
from elite.model.tiny import TinyModels

if TYPE_CHECKING:
    from s3_server import MotoS3

pytest_plugins = ["s3_server"]

FIRST = ("1", "2", "3", "4", "7", "10", "11", "15", "16")  # 9 of the 11 shared concepts; the other 2 come later
ADDED = ("17", "20")
TOO_LONG = "a photo of a S " + " ".join(["very"] * 80)
PROMPTS = "\n".join(["# catalog prompts", "a photo of a S on the beach", "a painting of a S",
                     "a photo without the placeholder", TOO_LONG]) + "\n"
GOOD_PROMPTS = 2


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh location on each backend; S3 settings reach the flows through the environment, as on a worker."""
    if request.param == "local":
        return str(tmp_path / "bucket")
    server: MotoS3 = request.getfixturevalue("s3_server")
    settings = server.settings()
    for name in ("endpoint_url", "region", "access_key_id", "secret_access_key", "max_attempts", "connect_timeout",
                 "read_timeout"):
        monkeypatch.setenv(f"ELITE_S3_{name.upper()}", str(getattr(settings, name)))
    return f"s3://{server.bucket}/{uuid.uuid4().hex}"


def _models(tiny: TinyModels) -> dict[str, str]:
    return {"pretrained_model": str(tiny.pretrained_model), "vision_model": str(tiny.vision_model),
            "global_mapper": str(tiny.global_mapper), "local_mapper": str(tiny.local_mapper)}


def _upload(store: ObjectStore, concepts_dir: Path, names: tuple[str, ...]) -> None:
    for name in names:
        [image] = [p for p in concepts_dir.glob(f"{name}.*") if p.suffix in (".jpg", ".png")]  # 4.png, the rest .jpg
        store.put(image.name, image)
        store.put(f"{name}_bg.png", concepts_dir / f"{name}_bg.png")


def _run(root: str, tiny: TinyModels, **kwargs: Any) -> Any:
    from flows.personalize import personalize_catalog

    return personalize_catalog(f"{root}/catalog", f"{root}/prompts.txt", f"{root}/out", **_models(tiny), steps=2,
                               height=64, width=64, encode_batch_size=4, generate_batch_size=3, **kwargs)


def _table(store: ObjectStore, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.get(key)))


def _images(out: ObjectStore) -> dict[str, str]:
    """Every PNG under the output's images/ folder -> the sha256 of its bytes."""
    return {info.key: sha256_bytes(out.get(info.key)) for info in out.list("images/") if info.key.endswith(".png")}


def _manifests(out: ObjectStore) -> pa.Table:
    keys = [i.key for i in out.list("images/_runs/") if i.key.endswith(".parquet") and "failures" not in i.key]
    return pa.concat_tables([_table(out, key) for key in keys])


def test_personalize_catalog_runs_incrementally(prefect_harness: None, tiny_models: TinyModels, concepts_dir: Path,
                                                root: str) -> None:
    catalog, out = open_store(f"{root}/catalog"), open_store(f"{root}/out")
    root_uri = open_store(root).uri()  # file:///... for a local folder
    _upload(catalog, concepts_dir, FIRST)
    open_store(root).put("prompts.txt", PROMPTS.encode())

    first = _run(root, tiny_models)
    assert (first["encoded"], first["encode_skipped"], first["concepts"]) == (len(FIRST), 0, len(FIRST))
    assert (first["generated"], first["generate_skipped"]) == (len(FIRST) * GOOD_PROMPTS, 0)
    images = _images(out)
    assert sorted({key.split("/")[1] for key in images}) == sorted(FIRST)
    assert len(images) == len(FIRST) * GOOD_PROMPTS

    # the failures table: the prompt-file line without the placeholder once, the too-long prompt per concept
    failures = _table(out, first["failures_uri"].removeprefix(out.uri() + "/")).to_pylist()
    assert failures == first["failures"]
    [no_placeholder] = [f for f in failures if f["stage"] == "prompts"]
    assert no_placeholder["uri"] == f"{root_uri}/prompts.txt:4" and "placeholder" in no_placeholder["reason"]
    too_long = [f for f in failures if f["stage"] == "generate"]
    assert sorted(f["concept_id"] for f in too_long) == sorted(FIRST)
    assert all("tokens" in f["reason"] and f["uri"].startswith(f"{root_uri}/out/images/") for f in too_long)
    assert len(failures) == 1 + len(FIRST)

    # the results manifest: one row per image, with the settings, model hashes and the bytes' sha256
    manifest = _manifests(out).to_pylist()
    assert {row["output_key"]: row["sha256"] for row in manifest} == {k.removeprefix("images/"): v
                                                                       for k, v in images.items()}
    assert all(row["output_uri"] == f"{root_uri}/out/images/{row['output_key']}" for row in manifest)
    assert all(row["steps"] == 2 and row["height"] == 64 and row["guidance_scale"] == 5.0 and row["seconds"] > 0
               and len(row["unet_sha256"]) == 64 and row["encoder_id"] == first["encoder_id"] for row in manifest)
    assert embedding_store(first["store_uri"]).concept_ids() == sorted(FIRST)

    # a rerun does no new work and rewrites nothing
    again = _run(root, tiny_models)
    assert (again["encoded"], again["encode_skipped"]) == (0, len(FIRST))
    assert (again["generated"], again["generate_skipped"]) == (0, len(FIRST) * GOOD_PROMPTS)
    assert _images(out) == images

    # two new concepts: only they are encoded and generated
    _upload(catalog, concepts_dir, ADDED)
    grown = _run(root, tiny_models)
    assert (grown["encoded"], grown["encode_skipped"]) == (len(ADDED), len(FIRST))
    assert (grown["generated"], grown["generate_skipped"]) == (len(ADDED) * GOOD_PROMPTS, len(FIRST) * GOOD_PROMPTS)
    now = _images(out)
    assert {k: v for k, v in now.items() if k in images} == images
    assert sorted({key.split("/")[1] for key in set(now) - set(images)}) == sorted(ADDED)
    assert len(embedding_store(grown["store_uri"]).stored_keys()) == len(FIRST) + len(ADDED)


def test_s3_outage_mid_run_then_rerun_completes(prefect_harness: None, tiny_models: TinyModels, concepts_dir: Path,
                                                s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = s3_server.settings()
    for name in ("endpoint_url", "region", "access_key_id", "secret_access_key", "max_attempts", "connect_timeout"):
        monkeypatch.setenv(f"ELITE_S3_{name.upper()}", str(getattr(settings, name)))
    root = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    _upload(open_store(f"{root}/catalog"), concepts_dir, FIRST + ADDED)
    open_store(root).put("prompts.txt", b"a photo of a S on the beach\na painting of a S\n")

    put = S3Store.put
    pngs_put = 0

    def put_then_fail(self: S3Store, key: str, data: Any) -> None:
        nonlocal pngs_put
        if key.endswith(".png"):
            pngs_put += 1
            if pngs_put == 4:  # the endpoint goes away in the middle of generation
                s3_server.stop()
        put(self, key, data)

    monkeypatch.setattr(S3Store, "put", put_then_fail)
    from flows.encode import encode_batch_task
    from flows.generate import generate_batch_task
    from flows.personalize import personalize_catalog

    for task in (encode_batch_task, generate_batch_task):  # the outage's retries without the production delays
        assert task.retries == 2 and task.retry_delay_seconds == [2.0, 10.0]
        monkeypatch.setattr(task, "retry_delay_seconds", [0.1, 0.1])

    state = personalize_catalog(f"{root}/catalog", f"{root}/prompts.txt", f"{root}/out", **_models(tiny_models),
                                steps=2, height=64, width=64, generate_batch_size=3, return_state=True)
    assert state.is_failed()  # its reports cannot be written either: the run fails, naming the storage error
    monkeypatch.setattr(S3Store, "put", put)
    s3_server.start()

    out = open_store(f"{root}/out")
    written = _images(out)
    assert 0 < len(written) < len(FIRST + ADDED) * 2  # some images landed before the outage, not all
    rerun = _run(root, tiny_models)
    assert rerun["failed"] == 0 and rerun["encoded"] == 0
    images = _images(out)
    assert len(images) == len(FIRST + ADDED) * 2 == rerun["generated"] + rerun["generate_skipped"]
    assert {k: v for k, v in images.items() if k in written} == written  # nothing written twice
    # every image has exactly one manifest row with its bytes' hash, those the stopped run wrote included (its
    # batches' rows were written with their images; the images of the batch cut off were made again)
    manifest = _manifests(out).to_pylist()
    assert sorted(row["output_key"] for row in manifest) == sorted(k.removeprefix("images/") for k in images)
    assert all(images["images/" + row["output_key"]] == row["sha256"] for row in manifest)
    assert len(embedding_store(rerun["store_uri"]).stored_keys()) == len(FIRST + ADDED)


def test_generation_fans_out_over_slots_without_changing_images(prefect_harness: None, tiny_models: TinyModels,
                                                                concepts_dir: Path, tmp_path: Path) -> None:
    from flows.encode import encode_concepts
    from flows.generate import generate_images

    catalog = open_store(tmp_path / "catalog")
    _upload(catalog, concepts_dir, ("1", "7", "10"))
    models = _models(tiny_models)
    store = str(tmp_path / "embeddings")
    encoded = encode_concepts(str(tmp_path / "catalog"), store, **models)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a photo of a S", "images": 2}\n'
                                            '{"prompt": "a S in the snow", "concept_id": "7"}\n'
                                            '{"prompt": "a S on the moon", "class_word": "rocket"}\n')
    outputs = {}
    for slots in (["cpu"], ["cpu", "cpu"]):  # a device named twice: two pipelines, two batches at once
        out = tmp_path / f"images-{len(slots)}"
        run = generate_images(store, str(tmp_path / "prompts.jsonl"), str(out), models["pretrained_model"],
                              models["global_mapper"], models["local_mapper"], encoder_id=encoded["encoder_id"],
                              steps=2, height=64, width=64, batch_size=1, devices=slots)
        assert (run["generated"], run["failed"], run["devices"]) == (7, 0, slots)
        assert run["unmatched_prompts"] == ["a S on the moon (class:rocket)"]  # no concept of that class
        manifest = pq.read_table(run["manifest_uri"].removeprefix("file://")).to_pylist()
        assert {row["slot"] for row in manifest} == set(range(len(slots)))
        outputs[len(slots)] = {row["output_key"]: row["sha256"] for row in manifest}
    assert outputs[1] == outputs[2]  # every image is the same whichever slot made it, and in whatever order


def test_batches_carry_the_gpu_tag_only_while_its_limit_exists(prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client

    from flows.generate import GPU_TAG, gpu_tags

    assert gpu_tags() == []  # no limit: untagged, so no slot request to the API per batch
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(GPU_TAG, 2)
        try:
            assert gpu_tags() == [GPU_TAG]
        finally:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
    assert gpu_tags() == []
