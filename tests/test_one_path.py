"""One job behind both front doors, tried as a new user would: concept identity (shared images, renames, changed
images, ids colliding across folders), s3:// through every CLI command, and mistyped inputs that must fail fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest

from elite.data.s3 import S3Store
from elite.data.storage import embedding_store, open_store
from elite.data.store import EmbeddingStore
from elite.errors import Failure, InputError, StorageError, TransientStorageError
from elite.fileio import sha256_file
from elite.jobs.encode import EncoderSettings, cached_encoder, encode_catalog
from elite.model.tiny import TinyEvalModels, TinyModels
from elite_cli.main import main

if TYPE_CHECKING:
    from s3_server import MotoS3

pytest_plugins = ["s3_server"]
REPO = Path(__file__).resolve().parents[1]


def _models(tiny: TinyModels, vision: bool = True) -> list[str]:
    args = ["--pretrained-model", str(tiny.pretrained_model), "--global-mapper", str(tiny.global_mapper),
            "--local-mapper", str(tiny.local_mapper), "--device", "cpu"]
    return args + (["--vision-model", str(tiny.vision_model)] if vision else [])


def _generate(tiny: TinyModels, store: str, out: str, *extra: str) -> int:
    return main(["generate", "--store", store, "--out", out, "--prompt", "a photo of S", "--steps", "1",
                 "--height", "64", "--width", "64", *extra, *_models(tiny, vision=False)])


def _concept(concepts_dir: Path, folder: Path, source: str, name: str, mask: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(concepts_dir / f"{source}.jpg", folder / f"{name}.jpg")
    if mask:
        shutil.copy(concepts_dir / f"{source}_bg.png", folder / f"{name}_bg.png")


def _info(store: Path) -> dict[str, dict[str, Any]]:
    table = EmbeddingStore(store).read_info()
    return {row["concept_id"]: row for row in table.to_pylist()}


def test_two_ids_sharing_one_image_each_get_their_embedding_and_images(
        tiny_models: TinyModels, concepts_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Product variants sharing a photo: encoded once, stored under each id, and each id gets its images."""
    folder, store = tmp_path / "catalog", tmp_path / "store"
    _concept(concepts_dir, folder, "1", "sku-1")
    _concept(concepts_dir, folder, "1", "sku-2")
    _concept(concepts_dir, folder, "2", "other")
    assert main(["encode", str(folder), "--store", str(store), *_models(tiny_models)]) == 0
    assert "encoded 3 concepts (0 already stored, 0 failed)" in capsys.readouterr().out
    info = _info(store)
    assert sorted(info) == ["other", "sku-1", "sku-2"]
    assert info["sku-1"]["image_sha256"] == info["sku-2"]["image_sha256"]
    assert info["sku-1"]["source_uri"].endswith("sku-1.jpg") and info["sku-2"]["source_uri"].endswith("sku-2.jpg")
    arrays = EmbeddingStore(store).read_arrays(["sku-1", "sku-2"])
    assert (arrays.words[0] == arrays.words[1]).all()
    assert main(["encode", str(folder), "--store", str(store), *_models(tiny_models)]) == 0  # rerun: nothing to do
    assert "encoded 0 concepts (3 already stored, 0 failed)" in capsys.readouterr().out
    out = tmp_path / "images"
    assert _generate(tiny_models, str(store), str(out)) == 0
    assert sorted(p.parent.name for p in out.rglob("*.png")) == ["other", "sku-1", "sku-2"]


def test_renamed_and_changed_concepts_are_encoded_again(tiny_models: TinyModels, concepts_dir: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, store = tmp_path / "catalog", tmp_path / "store"
    _concept(concepts_dir, folder, "1", "a", mask=False)
    encode = ["encode", str(folder), "--store", str(store), *_models(tiny_models)]
    assert main(encode) == 0
    (folder / "a.jpg").rename(folder / "b.jpg")  # renamed: same bytes, a new id
    assert main(encode) == 0
    assert "encoded 1 concepts (0 already stored, 0 failed)" in capsys.readouterr().out
    out = tmp_path / "images"
    assert _generate(tiny_models, str(store), str(out), "--concept", "b") == 0
    assert [p.parent.name for p in out.rglob("*.png")] == ["b"]
    shutil.copy(concepts_dir / "2.jpg", folder / "b.jpg")  # the image of b changed: encoded again, newest row wins
    assert main(encode) == 0
    assert "encoded 1 concepts (0 already stored, 0 failed)" in capsys.readouterr().out
    assert _info(store)["b"]["image_sha256"] == sha256_file(folder / "b.jpg")


def test_ids_colliding_across_two_folders_are_failures_naming_both(
        tiny_models: TinyModels, concepts_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    _concept(concepts_dir, tmp_path / "shop-a", "1", "00")
    _concept(concepts_dir, tmp_path / "shop-b", "2", "00")
    _concept(concepts_dir, tmp_path / "shop-b", "3", "01")
    assert main(["encode", str(tmp_path / "shop-a"), "--store", str(store), *_models(tiny_models)]) == 0
    capsys.readouterr()
    assert main(["encode", str(tmp_path / "shop-b"), "--store", str(store), *_models(tiny_models)]) == 1
    printed = capsys.readouterr()
    a_uri, b_uri = (tmp_path / "shop-a" / "00.jpg").as_uri(), (tmp_path / "shop-b" / "00.jpg").as_uri()
    assert f"FAILED 00 (encode) {b_uri}: concept id '00' is already stored from {a_uri}" in printed.err
    assert "encoded 1 concepts (0 already stored, 1 failed)" in printed.out  # 01 was done all the same
    assert _info(store)["00"]["source_uri"] == a_uri  # never silently replaced
    [table] = (store / "_runs").glob("encode-*-failures.parquet")
    assert pq.read_table(table).column("concept_id").to_pylist() == ["00"]
    assert main(["encode", str(tmp_path / "shop-b"), "--store", str(store), "--replace-sources",
                 *_models(tiny_models)]) == 0
    assert _info(store)["00"]["source_uri"] == b_uri


def test_a_concept_missing_from_the_store_is_a_failure_row(tiny_models: TinyModels, concepts_dir: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, store, out = tmp_path / "catalog", tmp_path / "store", tmp_path / "images"
    _concept(concepts_dir, folder, "1", "1")
    assert main(["encode", str(folder), "--store", str(store), *_models(tiny_models)]) == 0
    assert _generate(tiny_models, str(store), str(out), "--concept", "1", "--concept", "sku-404") == 1
    assert "FAILED sku-404 (generate)" in capsys.readouterr().err
    assert [p.parent.name for p in out.rglob("*.png")] == ["1"]
    [table] = (out / "_runs").glob("generate-*-failures.parquet")
    assert pq.read_table(table).column("concept_id").to_pylist() == ["sku-404"]


def test_a_batch_failing_after_its_retries_becomes_rows_for_its_concepts(tiny_models: TinyModels,
                                                                         concepts_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "catalog"
    for name in ("1", "2", "3"):
        _concept(concepts_dir, folder, name, name)
    encoder = cached_encoder(EncoderSettings("torch", None, str(tiny_models.vision_model),
                                             str(tiny_models.global_mapper), str(tiny_models.local_mapper),
                                             str(tiny_models.pretrained_model), "cpu"))

    def failing_runner(batches: Any) -> list[Exception]:  # as a Prefect task that failed for good would
        return [TransientStorageError("s3 went away") for _ in batches]

    report = encode_catalog(open_store(folder), EmbeddingStore(tmp_path / "store"), encoder, batch_size=2,
                            run_batches=failing_runner)
    assert report.done == 0 and sorted(f.concept_id for f in report.failures) == ["1", "2", "3"]
    assert {(f.stage, f.reason) for f in report.failures} == {("encode", "s3 went away")}
    assert report.failures_uri is None  # no reports store given: nothing written


@pytest.fixture
def s3_env(s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """S3 settings in the environment, as a user or worker sets them; returns a fresh s3:// root."""
    settings = s3_server.settings()
    for name in ("endpoint_url", "region", "access_key_id", "secret_access_key", "max_attempts", "connect_timeout",
                 "read_timeout"):
        monkeypatch.setenv(f"ELITE_S3_{name.upper()}", str(getattr(settings, name)))
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"


def test_every_cli_command_takes_s3_uris(tiny_models: TinyModels, tiny_eval_models: TinyEvalModels,
                                         concepts_dir: Path, s3_env: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in a local folder named "s3:"
    catalog = open_store(f"{s3_env}/catalog")
    for name in ("1", "2"):
        catalog.put(f"{name}.jpg", concepts_dir / f"{name}.jpg")
        catalog.put(f"{name}_bg.png", concepts_dir / f"{name}_bg.png")
    open_store(s3_env).put("prompts.txt", b"a photo of a S\n# a comment\na painting of a S\n")
    assert main(["encode", f"{s3_env}/catalog", "--store", f"{s3_env}/embeddings", *_models(tiny_models)]) == 0
    assert embedding_store(f"{s3_env}/embeddings").concept_ids() == ["1", "2"]
    assert main(["generate", "--store", f"{s3_env}/embeddings", "--out", f"{s3_env}/images", "--prompts",
                 f"{s3_env}/prompts.txt", "--steps", "1", "--height", "64", "--width", "64",
                 *_models(tiny_models, vision=False)]) == 0
    keys = [info.key for info in open_store(f"{s3_env}/images").list()]
    assert len([k for k in keys if k.endswith(".png")]) == 4 and sum(k.startswith("_runs/generate-") for k in keys) == 1
    assert main(["evaluate", f"{s3_env}/images", "--clip-model", str(tiny_eval_models.clip_model), "--dino-model",
                 str(tiny_eval_models.dino_model), "--device", "cpu"]) == 0  # the store: named by the manifest
    evaluated = [k for k in (info.key for info in open_store(f"{s3_env}/images").list("_runs/")) if "evaluate-" in k]
    assert sorted(k.rsplit("-", 1)[1] for k in evaluated) == ["aggregates.parquet", "metrics.parquet", "report.html",
                                                              "report.png"]
    from flows.evaluate import report_link  # the flow's link artifact: a presigned URL a browser opens as a page

    [page] = [k for k in evaluated if k.endswith("report.html")]
    link = report_link(open_store(f"{s3_env}/images").uri(page))
    assert link.startswith("http://127.0.0.1:") and "Signature=" in link
    with urllib.request.urlopen(link, timeout=30) as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8" and b"<html" in response.read()
    assert main(["export", f"{s3_env}/embeddings", f"{s3_env}/export", "--format", "numpy"]) == 0
    assert open_store(f"{s3_env}/export").exists("manifest.json")
    assert list(tmp_path.iterdir()) == []


FAIL_FAST = r"""
import sys
from elite_cli.main import main

code = main(sys.argv[1:])
heavy = [name for name in ("prefect", "diffusers") if name in sys.modules]
print("LOADED:" + ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("case", ["folder", "bucket", "prompts", "manifest", "encode-folder", "generate-store"])
def test_mistyped_inputs_fail_at_once_with_one_line_and_write_nothing(case: str, s3_server: MotoS3,
                                                                      tmp_path: Path) -> None:
    """Checked before Prefect starts and before a model loads: one line, exit 1, no output folder."""
    out, tiny = tmp_path / "out", tmp_path / "tiny"
    (tmp_path / "catalog").mkdir()
    personalize = ["personalize", "--out", str(out), "--tiny", "--tiny-dir", str(tiny)]
    args, expected = {
        "folder": ([*personalize, "--concepts", str(tmp_path / "no-such-folder")], "no-such-folder: no such folder"),
        "bucket": ([*personalize, "--concepts", "s3://no-such-bucket/catalog"], "bucket 'no-such-bucket' does not"),
        "prompts": ([*personalize, "--concepts", str(tmp_path / "catalog"), "--prompts", str(tmp_path / "p.txt")],
                    "p.txt: not found"),
        "manifest": ([*personalize, "--concepts", str(tmp_path / "catalog"), "--manifest", "m.csv"],
                     "m.csv: no such file"),
        "encode-folder": (["encode", str(tmp_path / "nope"), "--store", str(out)], "nope: no such folder"),
        "generate-store": (["generate", "--store", str(tmp_path / "nope"), "--out", str(out), "--pretrained-model",
                            str(tmp_path), "--global-mapper", __file__, "--local-mapper", __file__],
                           "holds no concepts"),
    }[case]
    settings = s3_server.settings()
    env = {**os.environ, "ELITE_S3_ENDPOINT_URL": settings.endpoint_url or "", "ELITE_S3_REGION": "us-east-1",
           "ELITE_S3_ACCESS_KEY_ID": "testing", "ELITE_S3_SECRET_ACCESS_KEY": "testing"}
    result = subprocess.run([sys.executable, "-c", FAIL_FAST, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elite: error: ") and expected in lines[0], result.stderr
    assert "LOADED:\n" in result.stdout  # neither Prefect nor diffusers was even imported
    assert not out.exists() and not tiny.exists()


def test_storage_errors_tell_transient_from_permanent(s3_server: MotoS3) -> None:
    store = S3Store(s3_server.bucket, uuid.uuid4().hex, s3_server.settings())
    with pytest.raises(StorageError, match="not found") as missing:
        store.get("nothing-here")
    assert not isinstance(missing.value, TransientStorageError)  # retrying a missing object cannot help
    dead = S3Store(s3_server.bucket, "x", s3_server.settings(endpoint_url="http://127.0.0.1:9", max_attempts=1,
                                                             connect_timeout=0.5))
    with pytest.raises(TransientStorageError, match="cannot reach the S3 endpoint"):
        dead.get("anything")


def test_the_flows_retry_only_transient_errors() -> None:
    from flows._common import retry_transient

    class State:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def result(self) -> None:
            raise self.error

    assert retry_transient(None, None, State(TransientStorageError("throttled")))
    assert not retry_transient(None, None, State(StorageError("access denied")))
    assert not retry_transient(None, None, State(ValueError("a bug")))
    assert Failure("a", "file:///a.jpg", "read", "x").row() == {"concept_id": "a", "uri": "file:///a.jpg",
                                                                 "stage": "read", "reason": "x"}


def test_manifest_rows_survive_a_stopped_run(tiny_models: TinyModels, concepts_dir: Path, tmp_path: Path) -> None:
    """Rows are written with each batch; a rerun makes again the images that have none, so every image on the
    store ends with exactly one row, and its hash."""
    from elite.data.prompts import PromptSpec
    from elite.jobs.generate import GenerationSettings, generate_batch, generate_catalog

    folder, store = tmp_path / "catalog", tmp_path / "store"
    for name in ("1", "2"):
        _concept(concepts_dir, folder, name, name)
    assert main(["encode", str(folder), "--store", str(store), *_models(tiny_models)]) == 0
    embeddings, out = EmbeddingStore(store), open_store(tmp_path / "images")
    settings = GenerationSettings(str(tiny_models.pretrained_model), str(tiny_models.global_mapper),
                                  str(tiny_models.local_mapper), steps=1, height=64, width=64)
    prompts = [PromptSpec("a photo of S", images=2)]

    def stopped(batches: Any) -> Any:  # two batches done, then the process dies
        for batch in batches[:2]:
            yield generate_batch(embeddings, out, settings, ["cpu"], batch)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_catalog(embeddings, prompts, out, settings, batch_size=1, devices=["cpu"], run_batches=stopped)
    batch_files = sorted(p.name for p in (tmp_path / "images" / "_runs").rglob("batch-*.parquet"))
    assert batch_files == ["batch-000000.parquet", "batch-000001.parquet"]
    [second] = (tmp_path / "images" / "_runs").rglob("batch-000001.parquet")
    second.unlink()  # as if killed between the batch's PNG and its rows
    report = generate_catalog(embeddings, prompts, out, settings, batch_size=1, devices=["cpu"])
    assert (report.generated, report.skipped) == (3, 1)  # 2 never made, 1 made without its row
    files = sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.png"))
    rows = pq.read_table([p for p in (tmp_path / "images" / "_runs").rglob("*.parquet")]).to_pylist()
    assert sorted(row["output_key"] for row in rows) == files and len(files) == 4
    assert all(row["sha256"] == sha256_file(tmp_path / "images" / row["output_key"]) for row in rows)
    assert sum(1 for _ in (tmp_path / "images" / "_runs").rglob("batch-*.parquet")) == 1  # the rerun's are merged


def test_a_bare_file_name_is_an_object_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--prompts prompts.txt` (no folder) was read as an empty location."""
    from elite.data.prompts import load_prompts
    from elite.data.storage import open_object

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a photo of a S\n")
    store, key = open_object("prompts.txt")
    assert key == "prompts.txt" and store.uri(key) == (tmp_path / "prompts.txt").as_uri()
    assert [spec.template for spec in load_prompts("prompts.txt")[0]] == ["a photo of a S"]
    with pytest.raises(InputError, match="names a folder or bucket"):
        open_object("s3://bucket")
