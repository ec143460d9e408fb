"""Training both mapping networks on tiny models (CPU): the losses fall, only the intended tensors learn, checkpoints
load where the release's files load, a resumed run equals an uninterrupted one, and bad samples are skipped."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from elite.data.sources import list_concepts
from elite.data.storage import open_store
from elite.errors import InputError
from elite.jobs.common import Locations
from elite.model.checkpoints import read_state_dict
from elite.model.pipeline import ElitePipeline
from elite.model.tiny import TinyModels
from elite.training.data import ConceptDataset, Stage, collate
from elite.training.models import load_frozen, load_mappers
from elite.training.settings import TrainSettings
from elite.training.trainer import sample_generators, train, training_loss
from elite_cli.main import main

CONCEPTS = ("1", "2", "3", "7")


@pytest.fixture(scope="module")
def catalog(concepts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train-catalog")
    for name in CONCEPTS:
        shutil.copy(concepts_dir / f"{name}.jpg", folder)
        shutil.copy(concepts_dir / f"{name}_bg.png", folder)
    return folder


def _dataset(folder: Path, stage: Stage, augment: bool = False) -> ConceptDataset:
    store = open_store(folder)
    return ConceptDataset(list_concepts(store), Locations(store), stage, resolution=64, augment=augment)


def _settings(tiny: TinyModels, stage: Stage, out: Path, **overrides: object) -> TrainSettings:
    values: dict[str, object] = {"global_mapper": str(tiny.global_mapper) if stage == "local" else None,
                                 "steps": 4, "batch_size": 2, "gradient_accumulation": 1, "learning_rate": 1e-2,
                                 "scale_lr": False, "resolution": 64, "checkpoint_every": 100} | overrides
    return TrainSettings(stage, str(tiny.pretrained_model), str(tiny.vision_model), str(out), **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("stage", ["global", "local"])
def test_the_loss_falls_well_below_its_start(stage: Stage, tiny_models: TinyModels, catalog: Path,
                                             tmp_path: Path) -> None:
    """20 steps on 4 concepts, the same noise for a sample at every step (an overfitting check)."""
    result = train(_settings(tiny_models, stage, tmp_path, steps=20, fixed_noise=True), _dataset(catalog, stage),
                   progress=False)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, result.losses
    assert all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("stage", ["global", "local"])
def test_exactly_the_trained_tensors_get_gradients(stage: Stage, tiny_models: TinyModels, catalog: Path,
                                                   tmp_path: Path) -> None:
    settings = _settings(tiny_models, stage, tmp_path)
    frozen = load_frozen(settings)
    glob, local = load_mappers(settings, frozen)
    batch = collate([_dataset(catalog, stage)[i] for i in range(2)])
    assert batch is not None
    loss = training_loss(stage, frozen, glob, local, batch, sample_generators(0, 0, 0, 2, fixed=False))
    loss.backward()
    trained = glob if stage == "global" else local
    assert trained is not None
    frozen_modules = [frozen.vae, frozen.unet, frozen.text_encoder, frozen.vision] + ([glob] if local else [])
    for module in frozen_modules:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    missing = [name for name, p in trained.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # every tensor of the stage's mapper learns, its k/v copies included


def test_checkpoints_load_where_the_release_files_load(tiny_models: TinyModels, catalog: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Stage 1 from the tiny release-format mapper, then stage 2 on top, both through `elite train`."""
    common = ["--concepts", str(catalog), "--pretrained-model", str(tiny_models.pretrained_model), "--vision-model",
              str(tiny_models.vision_model), "--steps", "3", "--batch-size", "2", "--gradient-accumulation", "1",
              "--learning-rate", "0.01", "--no-scale-lr", "--resolution", "64", "--checkpoint-every", "2"]
    assert main(["train", "global", "--out", str(tmp_path / "g"), "--global-mapper", str(tiny_models.global_mapper),
                 "--validate-every", "3", *common]) == 0
    validation = sorted((tmp_path / "g" / "validation" / "step-0000003").iterdir())
    assert [p.name for p in validation] == ["1.png", "2.png"]  # the first two concepts, through ElitePipeline
    for path in validation:
        with Image.open(path) as picture:
            assert picture.size == (64, 64) and picture.getextrema() != ((0, 0), (0, 0), (0, 0))
    trained_global = tmp_path / "g" / "global_mapper.pt"
    assert "trained the global mapper to step 3" in capsys.readouterr().out
    assert main(["train", "local", "--out", str(tmp_path / "l"), "--global-mapper", str(trained_global),
                 "--local-mapper", str(tiny_models.local_mapper), *common]) == 0
    trained_local = tmp_path / "l" / "local_mapper.pt"
    start, end = read_state_dict(tiny_models.global_mapper), read_state_dict(trained_global)
    assert start.keys() == end.keys() and all(not torch.equal(start[k], end[k]) for k in start)
    for folder, stage in ((tmp_path / "g", "global"), (tmp_path / "l", "local")):
        assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-0000002", "checkpoint-0000003"]
        assert (folder / "checkpoint-0000002" / f"{stage}_mapper.safetensors").is_file()
        assert (folder / f"{stage}_mapper.safetensors").is_file()
    assert main(["convert-checkpoint", str(trained_local), str(tmp_path / "local.safetensors"), "--pretrained-model",
                 str(tiny_models.pretrained_model)]) == 0

    def image(global_mapper: Path, local_mapper: Path) -> torch.Tensor:
        pipe = ElitePipeline.from_pretrained(tiny_models.pretrained_model, tiny_models.vision_model, global_mapper,
                                             local_mapper)
        with Image.open(catalog / "1.jpg") as photo, Image.open(catalog / "1_bg.png") as mask:
            concept = pipe.encode_concepts([photo], [mask])[0]
        return torch.from_numpy(pipe("a photo of a S", concept, seed=0, num_inference_steps=2, height=64, width=64,
                                     output_type="np", show_progress=False).images)  # type: ignore[arg-type]

    assert not torch.equal(image(trained_global, trained_local),
                           image(tiny_models.global_mapper, tiny_models.local_mapper))


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_models: TinyModels, catalog: Path, tmp_path: Path) -> None:
    dataset = _dataset(catalog, "global", augment=True)
    straight = train(_settings(tiny_models, "global", tmp_path / "a", steps=4, checkpoint_every=2,
                               gradient_accumulation=2), dataset, progress=False)
    half = train(_settings(tiny_models, "global", tmp_path / "b", steps=2, checkpoint_every=2,
                           gradient_accumulation=2), dataset, progress=False)
    rest = train(_settings(tiny_models, "global", tmp_path / "b", steps=4, checkpoint_every=2,
                           gradient_accumulation=2, resume="latest"), dataset, progress=False)
    assert rest.losses == pytest.approx(straight.losses[2:], rel=1e-5) and half.losses == pytest.approx(
        straight.losses[:2], rel=1e-6)
    a, b = read_state_dict(straight.mapper_path), read_state_dict(rest.mapper_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # tolerance: float sums, same order
    with pytest.raises(InputError, match="no checkpoint"):
        train(_settings(tiny_models, "global", tmp_path / "c", resume="latest"), dataset, progress=False)


def test_bad_samples_are_skipped_with_their_reason(tiny_models: TinyModels, catalog: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "catalog"
    shutil.copytree(catalog, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    shutil.copy(folder / "1.jpg", folder / "blank.jpg")
    with Image.open(folder / "1.jpg") as photo:
        Image.new("RGB", photo.size).save(folder / "blank_bg.png")  # an empty mask
    caplog.set_level(logging.WARNING, logger="elite")
    result = train(_settings(tiny_models, "local", tmp_path / "out", steps=3), _dataset(folder, "local"),
                   progress=False)
    assert result.steps == 3 and result.skipped >= 1 and len(result.losses) == 3
    reasons = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped training sample" in reasons and ("not an image" in reasons or "mask is empty" in reasons)


def test_the_train_flow_runs_the_same_job(prefect_harness: None, tiny_models: TinyModels, catalog: Path,
                                          tmp_path: Path) -> None:
    from flows.train import train_mapper

    report = train_mapper("global", str(catalog), str(tmp_path / "out"), pretrained_model=str(
        tiny_models.pretrained_model), vision_model=str(tiny_models.vision_model), steps=2, batch_size=2,
        gradient_accumulation=1, learning_rate=0.01, scale_lr=False, resolution=64, checkpoint_every=2)
    assert report["steps"] == 2 and len(report["losses"]) == 2 and report["failures"] == []
    assert read_state_dict(report["mapper_path"]).keys() == read_state_dict(tiny_models.global_mapper).keys()
    again = train_mapper("global", str(catalog), str(tmp_path / "out"), pretrained_model=str(
        tiny_models.pretrained_model), vision_model=str(tiny_models.vision_model), steps=3, batch_size=2,
        gradient_accumulation=1, learning_rate=0.01, scale_lr=False, resolution=64, checkpoint_every=2,
        resume="latest")  # a scheduled run continues where the last one stopped
    assert again["steps"] == 3 and len(again["losses"]) == 1

    from flows.personalize import personalize_catalog

    def images(global_mapper: str, out: Path) -> dict[str, bytes]:
        # the personalize flow (encode + generate) with this global mapper: image name -> PNG bytes
        state = personalize_catalog(str(catalog), None, str(out), pretrained_model=str(tiny_models.pretrained_model),
                                    vision_model=str(tiny_models.vision_model), global_mapper=global_mapper,
                                    local_mapper=str(tiny_models.local_mapper), steps=2, height=64, width=64)
        assert state["failures"] == [] and state["generated"] == 2 * len(CONCEPTS)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}

    trained = images(again["mapper_path"], tmp_path / "trained")
    release = images(str(tiny_models.global_mapper), tmp_path / "release")
    assert trained.keys() == release.keys() and len(trained) == 2 * len(CONCEPTS)  # two default prompts each
    assert all(trained[name] != release[name] for name in trained)


def test_gradient_checkpointing_and_loader_workers_change_nothing(tiny_models: TinyModels, catalog: Path,
                                                                  tmp_path: Path) -> None:
    """The ELITE processors stay installed through backward, so recomputed UNet blocks see them (without that,
    torch's checkpoint raises); samples read in worker processes are the ones read in the training process."""
    dataset = _dataset(catalog, "local", augment=True)
    plain = train(_settings(tiny_models, "local", tmp_path / "a", steps=2), dataset, progress=False)
    other = train(_settings(tiny_models, "local", tmp_path / "b", steps=2, gradient_checkpointing=True,
                            num_workers=2), dataset, progress=False)
    assert other.losses == pytest.approx(plain.losses, rel=1e-6)
    a, b = read_state_dict(plain.mapper_path), read_state_dict(other.mapper_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], read_state_dict(tiny_models.local_mapper)[k]) for k in a)  # it trained


def test_two_processes_train_what_one_process_with_both_batches_trains(tiny_models: TinyModels, catalog: Path,
                                                                        tmp_path: Path) -> None:
    """torchrun, 2 processes x batch 1 (gloo, CPU) vs 1 process x batch 2: each sample's noise comes from its slot
    over all processes and the gradients are averaged once per step, so the mappers agree up to float rounding."""
    common = ["train", "global", "--concepts", str(catalog), "--pretrained-model", str(tiny_models.pretrained_model),
              "--vision-model", str(tiny_models.vision_model), "--global-mapper", str(tiny_models.global_mapper),
              "--steps", "3", "--gradient-accumulation", "2", "--learning-rate", "0.01", "--no-scale-lr",
              "--resolution", "64", "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    launcher = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(launcher), "--standalone", "--nproc_per_node", "2", "-m", "elite_cli", *common,
                           "--out", str(tmp_path / "two"), "--batch-size", "1"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[:3000]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    two, one = (read_state_dict(tmp_path / name / "global_mapper.pt") for name in ("two", "one"))
    start = read_state_dict(tiny_models.global_mapper)
    assert all(not torch.equal(one[k], start[k]) for k in one)
    # Adam turns rounding in near-zero gradients into steps of up to lr, so compare in bulk: seen here 6e-6 of
    # the distance trained (unsynchronised gradients: about 2x that distance)
    apart = sum(float((two[k] - one[k]).abs().sum()) for k in one)
    assert apart < 1e-3 * sum(float((one[k] - start[k]).abs().sum()) for k in one)
    state = sorted(p.name for p in (tmp_path / "two" / "checkpoint-0000002").iterdir())
    assert "random_states_1.pkl" in state and "global_mapper.pt" in state  # each process's RNG, one mapper
