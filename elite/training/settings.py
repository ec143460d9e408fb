"""What a training run is asked to do (`elite train`'s options, the train-mapper flow's parameters)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from elite.errors import InputError, check_integer
from elite.training.data import Stage

REFERENCE_LR = {"global": 1e-6, "local": 1e-5}  # per sample, before scaling (method doc)


@dataclass(frozen=True)
class TrainSettings:
    stage: Stage
    pretrained_model: str  # SD 1.x repo id or folder (frozen UNet, VAE, text encoder, tokenizer, scheduler)
    vision_model: str  # CLIP vision tower (frozen)
    output_dir: str
    global_mapper: str | None = None  # stage 1: where to start (None: from scratch); stage 2: required, frozen
    local_mapper: str | None = None  # stage 2: where to start (None: from scratch)
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # per process
    gradient_accumulation: int = 4
    learning_rate: float | None = None  # per sample; None: the reference's (1e-6 stage 1, 1e-5 stage 2)
    scale_lr: bool = True  # x batch x accumulation x processes, as the reference
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    seed: int = 0
    resolution: int = 512
    lambda_local: float = 1.0  # stage 2: the local branch's weight while training
    checkpoint_every: int = 500
    resume: str | None = None  # a checkpoint folder, or "latest" (the newest in output_dir)
    fixed_noise: bool = False  # the same noise and timestep for a sample at every step: an overfitting check
    validate_every: int = 0  # steps between validation images (0: none)
    validation_concepts: int = 2  # the first concepts of the data set
    validation_steps: int = 20  # sampler steps of a validation image
    gradient_checkpointing: bool = False  # recompute UNet blocks in backward: less memory, ~30% more time
    num_workers: int = 0  # data-loading processes (0: samples are read in the training process)

    def __post_init__(self) -> None:
        if self.stage not in ("global", "local"):
            raise InputError(f"stage must be 'global' or 'local', got {self.stage!r}")
        if self.stage == "local" and not self.global_mapper:
            raise InputError("stage 2 (local) trains on top of a stage-1 global mapper: give global_mapper")
        for name in ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "resolution",
                     "validation_concepts", "validation_steps"):
            check_integer(name, getattr(self, name), 1)
        for name in ("validate_every", "num_workers", "warmup_steps"):
            check_integer(name, getattr(self, name), 0)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate must be a number above 0, got {self.learning_rate!r}")
