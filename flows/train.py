"""Flow: train a mapping network on a catalog, for scheduled retraining (docs/training.md).

    train_mapper("global", "s3://shop/catalog", "/models/runs/global", steps=70000, resume="latest")

A thin shell over `elite.jobs.train.train_catalog` (the job `elite train` runs): one task, on this worker, that
trains to `steps` optimizer steps and writes checkpoints under `output_dir` (a local folder: accelerate saves its
state to files); `resume="latest"` continues from the newest checkpoint there, so a scheduled run picks up where
the previous one stopped. Models left out come from ELITE_PRETRAINED_MODEL and ELITE_VISION_MODEL; the mappers
only from the parameters (they are start points: `global_mapper` is stage 2's frozen stage-1 mapper).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from elite.jobs.models import resolve_models
from elite.jobs.train import Layout, TrainReport, train_catalog
from elite.training.settings import TrainSettings
from flows._common import capture_library_logs, publish


@task(cache_policy=NO_CACHE, task_run_name="train {settings.stage} mapper")
def train_task(concepts_uri: str, settings: TrainSettings, manifest: str | None, augment: bool, layout: Layout,
               split: str, limit: int | None) -> TrainReport:
    capture_library_logs()
    return train_catalog(concepts_uri, settings, manifest=manifest, augment=augment, layout=layout, split=split,
                         limit=limit, progress=False)


@flow(name="train-mapper", flow_run_name="train {stage} mapper on {concepts_uri}", log_prints=True)
def train_mapper(stage: str, concepts_uri: str, output_dir: str, manifest: str | None = None,
                 pretrained_model: str | None = None, vision_model: str | None = None,
                 global_mapper: str | None = None, local_mapper: str | None = None, steps: int = 1000,
                 batch_size: int = 4, gradient_accumulation: int = 4, learning_rate: float | None = None,
                 scale_lr: bool = True, warmup_steps: int = 0, mixed_precision: str = "no", seed: int = 0,
                 resolution: int = 512, checkpoint_every: int = 500, resume: str | None = None,
                 augment: bool = True, validate_every: int = 0, layout: Layout = "catalog", split: str = "test",
                 limit: int | None = None, gradient_checkpointing: bool = False,
                 num_workers: int = 0) -> dict[str, Any]:
    """Train the `stage` ("global" or "local") mapper on the concepts of `concepts_uri` (or its `manifest`) into
    `output_dir`; the arguments are `elite train`'s options. Returns steps, losses and the mapper's path."""
    capture_library_logs()
    models = resolve_models(("pretrained_model", "vision_model"), pretrained_model=pretrained_model,
                            vision_model=vision_model)
    settings = TrainSettings(stage, str(models["pretrained_model"]), str(models["vision_model"]),  # type: ignore[arg-type]
                             output_dir, global_mapper=global_mapper, local_mapper=local_mapper, steps=steps,
                             batch_size=batch_size, gradient_accumulation=gradient_accumulation,
                             learning_rate=learning_rate, scale_lr=scale_lr, warmup_steps=warmup_steps,
                             mixed_precision=mixed_precision, seed=seed, resolution=resolution,
                             checkpoint_every=checkpoint_every, resume=resume, validate_every=validate_every,
                             gradient_checkpointing=gradient_checkpointing, num_workers=num_workers)
    report = train_task(concepts_uri, settings, manifest, augment, layout, split, limit)
    result = report.result
    losses = result.losses
    publish("train-mapper", f"Train the {stage} mapper", {
        "step": result.steps, "first loss": f"{losses[0]:.4f}" if losses else "-",
        "last loss": f"{losses[-1]:.4f}" if losses else "-", "samples skipped": result.skipped},
        {"mapper": str(result.mapper_path), "checkpoints": output_dir}, report.failures)
    return {"steps": result.steps, "losses": losses, "mapper_path": str(result.mapper_path),
            "checkpoints": [str(p) for p in result.checkpoints], "skipped": result.skipped,
            "validation": [str(p) for p in result.validation],
            "failures": [f.row() for f in report.failures]}
