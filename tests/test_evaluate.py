"""Evaluation (CLIP-T, CLIP-I, DINO-I) of tiny runs, checked against an independent computation, through both front
doors (`elite evaluate`, the evaluate flow and `elite personalize --evaluate`), with broken images on purpose and the
report opened in a real browser."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from browser import check_page, not_blank  # tests/browser.py
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel

from elite.errors import InputError
from elite.evaluation import PAPER_TABLE1
from elite.evaluation.metrics import MetricModels, clip_t_text
from elite.fileio import sha256_file
from elite.jobs.evaluate import EvaluationSettings, evaluate_run
from elite.model.tiny import EVAL_IMAGE_SIZE, TinyEvalModels, TinyModels
from elite_cli.main import main

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
PROMPTS = "a photo of a S on the beach\na S in the snow\n"


def _models(tiny: TinyModels) -> list[str]:
    return ["--pretrained-model", str(tiny.pretrained_model), "--global-mapper", str(tiny.global_mapper),
            "--local-mapper", str(tiny.local_mapper)]


def _eval_models(tiny: TinyEvalModels) -> list[str]:
    return ["--clip-model", str(tiny.clip_model), "--dino-model", str(tiny.dino_model), "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tiny_models: TinyModels, concepts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A personalize-style layout (OUT/embeddings, OUT/images): 3 concepts, two with a class word, 2 prompts."""
    out = tmp_path_factory.mktemp("evaluated")
    catalog = out / "catalog"
    catalog.mkdir()
    for name in ("1", "2", "7"):
        shutil.copy(concepts_dir / f"{name}.jpg", catalog)
        shutil.copy(concepts_dir / f"{name}_bg.png", catalog)
    (catalog / "manifest.csv").write_text("concept_id,image,mask,class_word\n1,1.jpg,1_bg.png,cat\n"
                                          "2,2.jpg,2_bg.png,dog\n7,7.jpg,7_bg.png,\n")
    (out / "prompts.txt").write_text(PROMPTS)
    assert main(["encode", str(catalog), "--manifest", "manifest.csv", "--store", str(out / "embeddings"),
                 "--vision-model", str(tiny_models.vision_model), *_models(tiny_models)]) == 0
    assert main(["generate", "--store", str(out / "embeddings"), "--out", str(out / "images"), "--prompts",
                 str(out / "prompts.txt"), "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu",
                 *_models(tiny_models)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the run's folders (tests evaluate copies: the module's run stays as generated)."""
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run" / "images"


def _manifest(images: Path) -> Path:
    [manifest] = [p for p in (images / "_runs").glob("generate-*.parquet") if p.name.count("-") == 1]
    return manifest


def _table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


# ---- an independent computation: the models called by hand, preprocessing in NumPy ---------------------

def _pixels(image: Image.Image, size: tuple[int, int], resample: int, mean: np.ndarray, std: np.ndarray,
            crop: int | None = None) -> torch.Tensor:
    array = np.asarray(image.convert("RGB").resize(size, resample), dtype=np.float64) / 255.0
    if crop is not None:
        top, left = (array.shape[0] - crop) // 2, (array.shape[1] - crop) // 2
        array = array[top:top + crop, left:left + crop]
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1)[None]).float()


def _clip_size(image: Image.Image) -> tuple[int, int]:
    """CLIP's shortest-edge resize: the short side to the input size, the long one scaled and truncated."""
    width, height = image.size
    short, long = sorted((width, height))
    other = int(EVAL_IMAGE_SIZE * long / short)
    return (EVAL_IMAGE_SIZE, other) if width <= height else (other, EVAL_IMAGE_SIZE)


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


class Independent:
    def __init__(self, tiny: TinyEvalModels) -> None:
        self.clip = CLIPModel.from_pretrained(tiny.clip_model).eval()
        self.dino = ViTModel.from_pretrained(tiny.dino_model, add_pooling_layer=False).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(tiny.clip_model)

    @torch.no_grad()
    def clip_image(self, image: Image.Image) -> torch.Tensor:
        pixels = _pixels(image, _clip_size(image), Image.Resampling.BICUBIC, CLIP_MEAN, CLIP_STD, EVAL_IMAGE_SIZE)
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
        return _unit(self.clip.visual_projection(pooled)[0])

    @torch.no_grad()
    def dino_image(self, image: Image.Image) -> torch.Tensor:
        pixels = _pixels(image, (EVAL_IMAGE_SIZE, EVAL_IMAGE_SIZE), Image.Resampling.BILINEAR, IMAGENET_MEAN,
                         IMAGENET_STD)
        return _unit(self.dino(pixel_values=pixels).last_hidden_state[0, 0])

    @torch.no_grad()
    def text(self, text: str) -> torch.Tensor:
        ids = torch.tensor([self.tokenizer(text)["input_ids"]])
        pooled = self.clip.text_model(input_ids=ids).pooler_output
        return _unit(self.clip.text_projection(pooled)[0])


def test_each_metric_equals_an_independent_computation(run: Path, tiny_eval_models: TinyEvalModels,
                                                       tmp_path: Path) -> None:
    images = _copy(run, tmp_path)
    settings = EvaluationSettings(str(tiny_eval_models.clip_model), str(tiny_eval_models.dino_model), "cpu")
    report = evaluate_run(str(_manifest(images)), settings)  # the store: from the manifest's store_uri column
    assert report.evaluated == report.images == 6 and not report.failures
    rows = _table(images / "_runs" / f"{report.name}-metrics.parquet")
    assert len(rows) == 6
    ref = Independent(tiny_eval_models)
    words = {"1": "cat", "2": "dog", "7": "object"}  # 7 has no class word: the default word
    for row in rows:
        generated = Image.open(images / row["output_key"])
        source = Image.open(row["source_uri"].removeprefix("file://"))
        assert row["class_word"] == words[row["concept_id"]]
        expected_text = row["prompt"].replace(" S ", f" {words[row['concept_id']]} ")
        assert row["text"] == expected_text and " S " not in row["text"]
        clip_t = float(ref.clip_image(generated) @ ref.text(expected_text))
        clip_i = float(ref.clip_image(generated) @ ref.clip_image(source))
        dino_i = float(ref.dino_image(generated) @ ref.dino_image(source))
        assert row["clip_t"] == pytest.approx(clip_t, abs=2e-3)
        assert row["clip_i"] == pytest.approx(clip_i, abs=2e-3)
        assert row["dino_i"] == pytest.approx(dino_i, abs=2e-3)
        # the class word really went into what CLIP read: the placeholder text scores differently
        unreplaced = float(ref.clip_image(generated) @ ref.text(row["prompt"]))
        assert abs(unreplaced - row["clip_t"]) > 1e-3
        for name in ("clip_t", "clip_i", "dino_i"):
            assert math.isfinite(row[name]) and -1.0 <= row[name] <= 1.0
        assert row["clip_model"] == str(tiny_eval_models.clip_model) and row["lambda_local"] == 0.8
    # aggregates are the means of the per-image values
    aggregates = {(a["level"], a["key"]): a for a in _table(images / "_runs" / f"{report.name}-aggregates.parquet")}
    assert set(aggregates) == {("overall", ""), ("concept", "1"), ("concept", "2"), ("concept", "7"),
                               ("prompt", "a photo of a S on the beach"), ("prompt", "a S in the snow")}
    for (level, key), entry in aggregates.items():
        members = [r for r in rows if level == "overall" or r["concept_id" if level == "concept" else "prompt"] == key]
        assert entry["images"] == len(members)
        for name in ("clip_t", "clip_i", "dino_i"):
            assert entry[name] == pytest.approx(float(np.mean([r[name] for r in members])), abs=1e-9)
            assert entry[f"{name}_std"] == pytest.approx(float(np.std([r[name] for r in members])), abs=1e-9)
    assert report.overall["clip_t"] == pytest.approx(aggregates[("overall", "")]["clip_t"])


def test_an_image_identical_to_its_source_scores_one(run: Path, tiny_eval_models: TinyEvalModels,
                                                      tmp_path: Path) -> None:
    """Every generated image replaced by its concept's source image (as a PNG, manifest hashes updated)."""
    images = _copy(run, tmp_path)
    manifest = _manifest(images)
    table = pq.read_table(manifest)
    rows = table.to_pylist()
    for row in rows:
        source = Image.open(run / "catalog" / f"{row['concept_id']}.jpg").convert("RGB")
        source.save(images / row["output_key"], format="PNG")
        row["sha256"] = sha256_file(images / row["output_key"])
    pq.write_table(table.from_pylist(rows, schema=table.schema), manifest)
    settings = EvaluationSettings(str(tiny_eval_models.clip_model), str(tiny_eval_models.dino_model), "cpu")
    report = evaluate_run(str(images), settings, store_uri=str(run / "embeddings"))
    metrics = _table(Path(report.metrics_uri.removeprefix("file://")))  # type: ignore[union-attr]
    assert len(metrics) == 6
    for row in metrics:
        assert row["clip_i"] == pytest.approx(1.0, abs=1e-5) and row["dino_i"] == pytest.approx(1.0, abs=1e-5)
        assert -1.0 <= row["clip_t"] <= 1.0


def test_missing_corrupt_and_changed_images_are_failures_and_the_rest_is_evaluated(
        run: Path, tiny_eval_models: TinyEvalModels, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = _copy(run, tmp_path)
    rows = _table(_manifest(images))
    missing, corrupt, changed = (images / rows[n]["output_key"] for n in (0, 2, 4))
    missing.unlink()
    corrupt.write_bytes(corrupt.read_bytes()[:-300])  # truncated, and recorded so: only decoding can tell
    table = pq.read_table(_manifest(images))
    recorded = [{**row, "sha256": sha256_file(corrupt)} if images / row["output_key"] == corrupt else row
                for row in table.to_pylist()]
    pq.write_table(table.from_pylist(recorded, schema=table.schema), _manifest(images))
    Image.new("RGB", (64, 64), "red").save(changed, format="PNG")  # a valid PNG, not the one the run wrote
    assert main(["evaluate", str(_manifest(images)), *_eval_models(tiny_eval_models)]) == 1
    printed = capsys.readouterr()
    assert printed.err.count("FAILED") == 3 and "evaluated 3 of 6 images" in printed.out
    [failures] = (images / "_runs").glob("*-evaluate-failures.parquet")
    reasons = {Path(f["uri"].removeprefix("file://")).name: f["reason"] for f in _table(failures)}
    assert set(reasons) == {missing.name, corrupt.name, changed.name}
    assert "no such" in reasons[missing.name].lower() or "not found" in reasons[missing.name].lower()
    assert "corrupt or truncated" in reasons[corrupt.name] and "changed since the run" in reasons[changed.name]
    [metrics] = (images / "_runs").glob("*-metrics.parquet")
    assert {r["output_key"] for r in _table(metrics)} == {r["output_key"] for r in rows} - {
        str(p.relative_to(images)) for p in (missing, corrupt, changed)}
    # the report shows the failed images as such, and every image on the page loads
    [html] = (images / "_runs").glob("*-report.html")
    page = check_page(html, tmp_path / "page.png")
    assert page.broken == [] and page.external_requests == [] and "changed since the run" in html.read_text()


def test_the_report_of_two_runs_opens_in_a_browser(run: Path, tiny_models: TinyModels,
                                                   tiny_eval_models: TinyEvalModels, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """lambda 0.8 (the run) vs lambda 0.6 (a second run of the same concepts and prompts), side by side."""
    images = _copy(run, tmp_path)
    other = tmp_path / "lambda06"
    assert main(["generate", "--store", str(run / "embeddings"), "--out", str(other), "--prompts",
                 str(run / "prompts.txt"), "--steps", "1", "--height", "64", "--width", "64", "--lambda-local",
                 "0.6", "--device", "cpu", *_models(tiny_models)]) == 0
    assert main(["evaluate", str(images), "--compare", str(other), "--store", str(run / "embeddings"),
                 *_eval_models(tiny_eval_models)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("evaluated 6 of 6 images") == 2 and f"paper: {PAPER_TABLE1['clip_t']}" in printed
    [html] = (images / "_runs").glob("evaluate-*-report.html")
    text = html.read_text()
    assert "lambda_local" in text and "0.6" in text and "0.8" in text and "0.255" in text
    page = check_page(html, tmp_path / "page.png")
    assert page.images >= 3 * (1 + 1 + 2 * 2) and page.broken == [] and page.external_requests == []
    assert not_blank(page.element_png) and (tmp_path / "page.png").stat().st_size > 0
    [summary] = (images / "_runs").glob("evaluate-*-report.png")
    with Image.open(summary) as picture:
        picture.load()
        assert picture.width >= 1000
        assert not_blank(summary.read_bytes())
    assert list(other.glob("_runs/evaluate-*-metrics.parquet"))  # the compared run's own tables, beside it


def test_pngs_carry_their_prompt_seed_and_settings(run: Path) -> None:
    rows = _table(_manifest(run / "images"))
    for row in rows:
        with Image.open(run / "images" / row["output_key"]) as image:
            text = dict(image.text)  # type: ignore[attr-defined]
        assert text["prompt"] == row["prompt"] and int(text["seed"]) == row["seed"]
        assert text["concept_id"] == row["concept_id"] and int(text["index"]) == row["index"]
        settings = json.loads(text["elite"])
        assert settings["lambda_local"] == row["lambda_local"] and settings["steps"] == row["steps"]
        assert settings["unet_sha256"] == row["unet_sha256"] and settings["scheduler"] == row["scheduler"]
        assert "created_at" not in settings and "device" not in settings  # a rerun writes the same bytes


def test_clip_t_text_replaces_whole_words_only() -> None:
    assert clip_t_text("a S on a Sunny day, S!", "dog") == "a dog on a Sunny day, dog!"
    assert clip_t_text("a photo of a <x>", "cat", "<x>") == "a photo of a cat"
    with pytest.raises(InputError, match="placeholder"):
        clip_t_text("a photo of a dog", "cat")


def test_bad_runs_are_one_clear_error(run: Path, tiny_eval_models: TinyEvalModels, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    stray = tmp_path / "stray.parquet"
    shutil.copy(_manifest(run / "images"), stray)
    (tmp_path / "_runs").mkdir()
    (tmp_path / "_runs" / "generate-1.parquet").write_bytes(b"PAR1 not parquet")
    cases = {str(tmp_path / "empty"): "no results manifest", str(stray): "not a results manifest path",
             str(tmp_path / "_runs" / "generate-1.parquet"): "not a Parquet results manifest",
             str(tmp_path / "nowhere"): "no such folder"}
    for target, message in cases.items():
        assert main(["evaluate", target, *_eval_models(tiny_eval_models)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("elite: error:") and message in err, (target, err)
    assert main(["evaluate", str(run / "images"), "--clip-model", str(tmp_path / "no-clip")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "not-clip").mkdir()  # a folder that holds no model: one error before any image is read
    assert main(["evaluate", str(run / "images"), "--clip-model", str(tmp_path / "not-clip"), "--dino-model",
                 str(tiny_eval_models.dino_model)]) == 1
    err = capsys.readouterr().err
    assert err.count("elite: error:") == 1 and "cannot load the CLIP model" in err and "FAILED" not in err


def test_metric_models_batch_as_they_score_one_by_one(tiny_eval_models: TinyEvalModels) -> None:
    models = MetricModels.from_pretrained(str(tiny_eval_models.clip_model), str(tiny_eval_models.dino_model), "cpu")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (40 + 8 * n, 48, 3), dtype=np.uint8)) for n in range(4)]
    clip, dino = models.image_features(pictures)
    for n, picture in enumerate(pictures):
        one_clip, one_dino = models.image_features([picture])
        assert torch.allclose(clip[n], one_clip[0], atol=1e-5) and torch.allclose(dino[n], one_dino[0], atol=1e-5)
    texts = ["a photo of a dog", "a cat in the snow on a very long day at the beach with friends"]
    batched = models.text_features(texts)
    assert torch.allclose(batched[1], models.text_features(texts[1:])[0], atol=1e-5)  # padding does not leak
    assert torch.allclose(clip.norm(dim=-1), torch.ones(4)) and torch.allclose(dino.norm(dim=-1), torch.ones(4))


def test_png_text_round_trips_through_bytes() -> None:
    from elite.jobs.generate import png_bytes

    data = png_bytes(Image.new("RGB", (8, 8)), {"prompt": "a S in Zürich 東京", "seed": "7"})
    with Image.open(io.BytesIO(data)) as image:
        assert image.text == {"prompt": "a S in Zürich 東京", "seed": "7"}  # type: ignore[attr-defined]


def test_the_flows_publish_the_report_and_the_aggregates(prefect_harness: None, run: Path, concepts_dir: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`elite personalize --tiny --evaluate`: the evaluate flow runs as a subflow of the catalog job and publishes
    a link to its report and a table of its aggregates."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for name in ("1", "7"):
        shutil.copy(concepts_dir / f"{name}.jpg", catalog)
        shutil.copy(concepts_dir / f"{name}_bg.png", catalog)
    out = tmp_path / "out"
    assert main(["personalize", "--concepts", str(catalog), "--out", str(out), "--tiny", "--tiny-dir",
                 str(tmp_path / "tiny"), "--steps", "1", "--evaluate", "--encode-device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "4 images generated" in printed and "evaluated 4 of 4 images" in printed
    [html] = (out / "images" / "_runs").glob("generate-*-report.html")
    assert f"report: {html.as_uri()}" in printed
    [metrics] = (out / "images" / "_runs").glob("generate-*-metrics.parquet")
    assert len(_table(metrics)) == 4
    with get_client(sync_client=True) as client:
        [link] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["evaluation-report"])), limit=1, sort="CREATED_DESC")
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["evaluation-aggregates"])), limit=1, sort="CREATED_DESC")
    assert html.as_uri() in str(link.data)  # create_link_artifact: stored as a markdown link
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[0]["clip_t"] == PAPER_TABLE1["clip_t"] and {r["level"] for r in rows[1:]} == {
        "overall", "concept", "prompt"}
    overall = next(r for r in rows if r["level"] == "overall")
    assert overall["images"] == 4 and -1 <= overall["clip_i"] <= 1


def test_a_custom_placeholder_reaches_the_pipeline_and_clip_t(run: Path, tiny_models: TinyModels,
                                                             tiny_eval_models: TinyEvalModels, tmp_path: Path) -> None:
    """`--placeholder sks`: the pipeline binds that word (it used to look for S and fail every image), the manifest
    records it, and CLIP-T replaces it by the class word."""
    out = tmp_path / "sks"
    assert main(["generate", "--store", str(run / "embeddings"), "--out", str(out), "--prompt", "a sks in the snow",
                 "--placeholder", "sks", "--images-per-prompt", "2", "--concept", "2", "--steps", "1", "--height",
                 "64", "--width", "64", "--device", "cpu", *_models(tiny_models)]) == 0
    rows = _table(_manifest(out))
    assert len(rows) == 2 and {r["placeholder"] for r in rows} == {"sks"}
    assert main(["evaluate", str(out), "--store", str(run / "embeddings"), *_eval_models(tiny_eval_models)]) == 0
    [metrics] = out.glob("_runs/evaluate-*-metrics.parquet")
    assert {r["text"] for r in _table(metrics)} == {"a dog in the snow"}
