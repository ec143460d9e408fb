"""Training the two mapping networks (method doc, "Global mapping network", "Local mapping network", "Reference
training settings"), on accelerate, with frozen CLIP, text encoder, UNet and VAE.

    settings = TrainSettings("global", pretrained_model="CompVis/stable-diffusion-v1-4",
                             vision_model="openai/clip-vit-large-patch14", output_dir="runs/global")
    train(settings, ConceptDataset(refs, locations, "global"))

- Stage 1 ("global"): the global mapper and its k/v copies. Loss: noise-prediction MSE + 0.01 x mean |words|,
  all five words injected (a slot of five token positions at the placeholder).
- Stage 2 ("local"): the local mapper and its k/v, the stage-1 mapper frozen, w0 only. Loss: noise-prediction
  MSE weighted by the object mask at latent resolution (normalised by its sum) + 1e-4 x mean over layers of
  mean |v_l| (the local values of each cross-attention layer).
- AdamW (weight decay 1e-2), learning rate x batch x accumulation x processes (`scale_lr`, as the reference),
  constant schedule after `warmup_steps`, gradient clipping, accumulation, mixed precision and several
  processes through accelerate.
- Reproducible and resumable: the batch order is a seeded permutation per epoch and each micro-batch's noise,
  timesteps and VAE sample come from a generator seeded by (seed, micro-batch), so a resumed run continues with
  exactly what the uninterrupted one would have drawn. `output_dir/checkpoint-<step>/` holds accelerate's state
  (weights, optimizer, schedule, RNG) and the mapper in the release's `.pt` layout and as safetensors; the
  finished mapper is `output_dir/<stage>_mapper.pt` (+ `.safetensors`), ready for ElitePipeline and the flows.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel, get_constant_schedule_with_warmup

from elite.errors import EliteError, InputError, check_integer
from elite.fileio import atomic_path
from elite.model.attention import LocalInjection, elite_attention
from elite.model.checkpoints import load_mapper, load_pretrained, save_safetensors
from elite.model.encoder import vision_features
from elite.model.mappers import (
    GlobalMapper,
    LocalMapper,
    MapperConfig,
    copy_unet_key_values,
    cross_attention_layers,
)
from elite.model.pipeline import REFERENCE, ElitePipeline
from elite.model.preprocessing import open_image
from elite.model.text import encode_prompts
from elite.training.data import PLACEHOLDER, ConceptDataset, Stage, collate

logger = logging.getLogger(__name__)

REFERENCE_LR = {"global": 1e-6, "local": 1e-5}  # per sample, before scaling (method doc)
WORDS_WEIGHT = 0.01  # stage 1: x mean |words|
VALUES_WEIGHT = 1e-4  # stage 2: x mean over layers of mean |v_l|


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

    def __post_init__(self) -> None:
        if self.stage not in ("global", "local"):
            raise InputError(f"stage must be 'global' or 'local', got {self.stage!r}")
        if self.stage == "local" and not self.global_mapper:
            raise InputError("stage 2 (local) trains on top of a stage-1 global mapper: give global_mapper")
        for name in ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "resolution",
                     "validation_concepts", "validation_steps"):
            check_integer(name, getattr(self, name), 1)
        check_integer("validate_every", self.validate_every, 0)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate must be a number above 0, got {self.learning_rate!r}")


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimizer step, mean over its micro-batches
    mapper_path: Path  # <stage>_mapper.pt
    checkpoints: list[Path]
    skipped: int  # samples skipped (unreadable, no object)
    validation: list[Path] = field(default_factory=list)  # folders of validation images, one per validation step


@dataclass
class FrozenModels:
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    vision: Any
    noise_scheduler: Any


def load_frozen(settings: TrainSettings) -> FrozenModels:
    """The frozen parts, through the same `from_pretrained` code as inference."""
    path = settings.pretrained_model
    models = FrozenModels(
        load_pretrained("VAE", AutoencoderKL, path, subfolder="vae"),
        load_pretrained("UNet", UNet2DConditionModel, path, subfolder="unet"),
        load_pretrained("text encoder", CLIPTextModel, path, subfolder="text_encoder"),
        load_pretrained("tokenizer", CLIPTokenizer, path, subfolder="tokenizer"),
        load_pretrained("vision model", CLIPVisionModel, settings.vision_model),
        load_pretrained("noise scheduler", DDPMScheduler, path, subfolder="scheduler"))
    for module in (models.vae, models.unet, models.text_encoder, models.vision):
        module.requires_grad_(False).eval()
    return models


def new_mapper(cls: type[GlobalMapper] | type[LocalMapper], frozen: FrozenModels) -> GlobalMapper | LocalMapper:
    """A mapper from scratch: sized by the vision tower and text encoder, its k/v copies initialised from the
    UNet's own (method doc)."""
    layers = cross_attention_layers(frozen.unet)
    mapper = cls(MapperConfig(input_dim=frozen.vision.config.hidden_size,
                              hidden_dim=frozen.vision.config.hidden_size,
                              output_dim=frozen.text_encoder.config.hidden_size, cross_attention_layers=layers))
    copy_unet_key_values(mapper, frozen.unet)
    return mapper


def _mappers(settings: TrainSettings, frozen: FrozenModels) -> tuple[GlobalMapper, LocalMapper | None]:
    layers = cross_attention_layers(frozen.unet)
    glob = (load_mapper(GlobalMapper, settings.global_mapper, layers) if settings.global_mapper
            else new_mapper(GlobalMapper, frozen))
    if settings.stage == "global":
        return glob, None  # type: ignore[return-value]
    glob.requires_grad_(False).eval()
    local = (load_mapper(LocalMapper, settings.local_mapper, layers) if settings.local_mapper
             else new_mapper(LocalMapper, frozen))
    return glob, local  # type: ignore[return-value]


def _features(vision: Any, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():  # the vision tower is frozen
        return vision_features(vision, pixels)


def training_loss(stage: Stage, frozen: FrozenModels, glob: GlobalMapper, local: LocalMapper | None,
                  batch: dict[str, Any], generator: torch.Generator, lambda_local: float = 1.0) -> torch.Tensor:
    """One micro-batch's loss (method doc), noise, timesteps and VAE sample drawn from `generator` (on the CPU)."""
    device = frozen.unet.device
    dtype = frozen.unet.dtype
    with torch.no_grad():
        posterior = frozen.vae.encode(batch["vae_pixels"].to(device, dtype)).latent_dist
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
            device, dtype)) * frozen.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
    timesteps = torch.randint(0, frozen.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(device)
    noisy = frozen.noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if frozen.noise_scheduler.config.prediction_type == "epsilon" else \
        frozen.noise_scheduler.get_velocity(latents, noise, timesteps)
    features = _features(frozen.vision, batch["pixel_values"].to(device, dtype))
    if stage == "global":
        words = glob(features)  # (batch, 5, text_dim): all five injected
        hidden, _ = encode_prompts(frozen.text_encoder, frozen.tokenizer, batch["prompts"],
                                   [{PLACEHOLDER: w} for w in words], truncate=True)
        with elite_attention(frozen.unet, glob):
            pred = frozen.unet(noisy, timesteps, hidden).sample
        return F.mse_loss(pred.float(), target.float()) + WORDS_WEIGHT * words.abs().mean()
    assert local is not None
    with torch.no_grad():
        w0 = glob(features)[:, :1]  # (batch, 1, text_dim)
        hidden, slots = encode_prompts(frozen.text_encoder, frozen.tokenizer, batch["prompts"],
                                       [{PLACEHOLDER: w} for w in w0], truncate=True)
    object_features = _features(frozen.vision, batch["object_pixel_values"].to(device, dtype))
    count = len(batch["prompts"])
    tokens = local(object_features) * batch["mask_grid"].reshape(count, -1, 1).to(device, dtype)
    injection = LocalInjection(torch.arange(count), tokens[:, None],
                               torch.tensor([[found[0][1]] for found in slots]),
                               torch.full((count, 1), float(lambda_local)))
    with elite_attention(frozen.unet, glob, local, injection):
        pred = frozen.unet(noisy, timesteps, hidden).sample
    mask = batch["latent_mask"].to(device)[:, None]  # (batch, 1, h, w)
    squared = (pred.float() - target.float()) ** 2 * mask
    mse = squared.sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)
    values = [local.key_value(path)[1](tokens).abs().mean() for path, _ in local.config.cross_attention_layers]
    return mse + VALUES_WEIGHT * torch.stack(values).mean()


def _micro_batches(dataset: ConceptDataset, batch_size: int, seed: int, start: int, process: int,
                   processes: int) -> Any:
    """Micro-batches from number `start` on: epoch e visits a permutation seeded by (seed, e), sharded over the
    processes; the same numbers give the same samples on every run."""
    per_epoch = max(1, len(dataset) // (batch_size * processes))
    number = start
    while True:
        epoch, offset = divmod(number, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        shard = order.tolist()[process::processes]
        dataset.epoch = epoch
        picked = shard[offset * batch_size:(offset + 1) * batch_size] or shard[:batch_size]
        yield number, collate([dataset[i] for i in picked]), len(picked)
        number += 1


def _checkpoints(output: Path) -> list[Path]:
    return sorted(output.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def save_mapper(mapper: torch.nn.Module, path: Path) -> None:
    """The mapper as the release ships it (a pickled plain state dict, float32 on the CPU) and as safetensors."""
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in mapper.state_dict().items()}
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    save_safetensors(state, path.with_suffix(".safetensors"))


def train(settings: TrainSettings, dataset: ConceptDataset, progress: bool = True) -> TrainResult:
    """Train the stage's mapper for `settings.steps` optimizer steps (from a checkpoint with `resume`)."""
    output = Path(settings.output_dir)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, project_dir=str(output),
                              log_with="tensorboard" if _has_tensorboard() else None)
    frozen = load_frozen(settings)
    set_seed(settings.seed)  # a mapper from scratch starts from the same weights on every run
    glob, local = _mappers(settings, frozen)
    trained: torch.nn.Module = glob if settings.stage == "global" else local  # type: ignore[assignment]
    trained.train()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.mixed_precision, torch.float32)
    for module in (frozen.vae, frozen.unet, frozen.text_encoder, frozen.vision, *([glob] if local is not None else [])):
        module.to(accelerator.device)
        if weight_dtype != torch.float32:  # separate calls: diffusers warns about a dtype cast in float32 too
            module.to(weight_dtype)
    base = settings.learning_rate if settings.learning_rate is not None else REFERENCE_LR[settings.stage]
    scale = settings.batch_size * settings.gradient_accumulation * accelerator.num_processes
    optimizer = torch.optim.AdamW(trained.parameters(), lr=base * (scale if settings.scale_lr else 1),
                                  weight_decay=settings.weight_decay)
    schedule = get_constant_schedule_with_warmup(optimizer, settings.warmup_steps)
    trained, optimizer, schedule = accelerator.prepare(trained, optimizer, schedule)
    mapper = accelerator.unwrap_model(trained)
    step = 0
    if settings.resume:
        found = _checkpoints(output)[-1:] if settings.resume == "latest" else [Path(settings.resume)]
        if not found or not (found[0] / "trainer.json").is_file():
            raise InputError(f"no checkpoint to resume from at {settings.resume if found else output}")
        accelerator.load_state(str(found[0]))
        step = int(json.loads((found[0] / "trainer.json").read_text())["step"])
    if accelerator.is_main_process and accelerator.trackers == [] and _has_tensorboard():
        accelerator.init_trackers(f"elite-{settings.stage}")
    batches = _micro_batches(dataset, settings.batch_size, settings.seed, step * settings.gradient_accumulation,
                             accelerator.process_index, accelerator.num_processes)
    result = TrainResult(step, [], output / f"{settings.stage}_mapper.pt", [], 0)
    bar = tqdm(total=settings.steps, initial=step, desc=f"training {settings.stage}", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    while step < settings.steps:
        total = 0.0
        for _ in range(settings.gradient_accumulation):
            number, batch, asked = next(batches)
            result.skipped += asked - (0 if batch is None else len(batch["prompts"]))
            if batch is None:
                continue
            seed = settings.seed if settings.fixed_noise else settings.seed * 1_000_003 + number
            generator = torch.Generator().manual_seed(seed)
            with accelerator.autocast():
                loss = training_loss(settings.stage, frozen, glob if settings.stage == "local" else mapper,
                                     mapper if settings.stage == "local" else None, batch, generator,
                                     settings.lambda_local)
            accelerator.backward(loss / settings.gradient_accumulation)
            total += float(loss.detach()) / settings.gradient_accumulation
        accelerator.clip_grad_norm_(trained.parameters(), settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        result.losses.append(total)
        accelerator.log({"loss": total, "lr": schedule.get_last_lr()[0]}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            result.checkpoints.append(_save_checkpoint(accelerator, mapper, settings, output, step))
        if settings.validate_every and step % settings.validate_every == 0 and accelerator.is_main_process:
            with accelerator.autocast():
                result.validation.append(validation_images(settings, frozen, glob if local is not None else mapper,
                                                           mapper if local is not None else None, dataset, output,
                                                           step))
            mapper.train()
    bar.close()
    if result.skipped:
        logger.warning("%d training samples were skipped (the reasons are logged above)", result.skipped)
    if accelerator.is_main_process:
        save_mapper(mapper, result.mapper_path)
    accelerator.end_training()
    result.steps = step
    return result


def _save_checkpoint(accelerator: Accelerator, mapper: torch.nn.Module, settings: TrainSettings, output: Path,
                     step: int) -> Path:
    """`output/checkpoint-<step>/`, whole or not at all: written under a temporary name, then renamed."""
    final = output / f"checkpoint-{step:07d}"
    temporary = output / f".checkpoint-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        save_mapper(mapper, temporary / f"{settings.stage}_mapper.pt")
        (temporary / "trainer.json").write_text(json.dumps({"step": step, "settings": asdict(settings)}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
    accelerator.wait_for_everyone()
    return final


def validation_images(settings: TrainSettings, frozen: FrozenModels, glob: GlobalMapper, local: LocalMapper | None,
                      dataset: ConceptDataset, output: Path, step: int) -> Path:
    """`output/validation/step-<step>/<concept>.png`: the first concepts encoded and generated through ElitePipeline
    with the weights as they are ("a photo of a S", seed 0). Stage 1 has no trained local mapper yet: its images
    use the global word alone (lambda 0); stage 2's use the reference lambda."""
    folder = output / "validation" / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    local_mapper = local if local is not None else cast(LocalMapper, new_mapper(LocalMapper, frozen))
    pipe = ElitePipeline(frozen.vae, frozen.text_encoder, frozen.tokenizer, frozen.unet, REFERENCE.scheduler(),
                         frozen.vision, glob, local_mapper)
    for ref in dataset.refs[:settings.validation_concepts]:
        try:
            photo = open_image(dataset.locations.get(ref.image), dataset.locations.uri(ref.image))
            mask = None if ref.mask is None else open_image(dataset.locations.get(ref.mask),
                                                            dataset.locations.uri(ref.mask))
            [concept] = pipe.encode_concepts([photo], [mask], [ref.concept_id])
        except EliteError as err:
            logger.warning("no validation image of %s: %s", ref.concept_id, err)
            continue
        [image] = pipe("a photo of a S", concept, seed=0, num_inference_steps=settings.validation_steps,
                       height=settings.resolution, width=settings.resolution, show_progress=False,
                       lambda_local=0.0 if local is None else REFERENCE.lambda_local).images
        with atomic_path(folder / f"{ref.concept_id}.png") as temporary:
            image.save(temporary, format="PNG")
    return folder


def _has_tensorboard() -> bool:
    """accelerate's TensorBoard tracker needs the package (the `train` extra); without it: no event files."""
    return importlib.util.find_spec("tensorboard") is not None
