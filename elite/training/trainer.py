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
- Reproducible and resumable: the batch order is a seeded permutation per epoch and each sample's noise,
  timestep and VAE sample come from a generator seeded by (seed, micro-batch, slot), the slot counting over all
  processes, so a resumed run continues with exactly what the uninterrupted one would have drawn, and P processes
  x batch B draw what one process x batch P*B draws.
- Several processes (`accelerate launch -m elite_cli train ...`, or torchrun): each reads its shard of every
  epoch; the mapper is not wrapped in DistributedDataParallel (its k/v copies are used through attention
  processors, outside the mapper's forward, where DDP's hooks would never fire): the gradients are averaged over
  the processes once per optimizer step, after the accumulated micro-batches.
- `output_dir/checkpoint-<step>/` holds accelerate's state (weights, optimizer, schedule, RNG) and the mapper in
  the release's `.pt` layout and as safetensors; the finished mapper is `output_dir/<stage>_mapper.pt`
  (+ `.safetensors`), ready for ElitePipeline and the flows.
- Gradient checkpointing (`gradient_checkpointing`): the ELITE processors stay installed through the backward,
  which recomputes UNet blocks with them (`training_loss(..., hold=...)`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from elite.errors import InputError
from elite.model.attention import LocalInjection, elite_attention
from elite.model.encoder import vision_features
from elite.model.mappers import GlobalMapper, LocalMapper
from elite.model.text import encode_prompts
from elite.training.data import PLACEHOLDER, ConceptDataset, Stage, collate
from elite.training.models import FrozenModels, load_frozen, load_mappers
from elite.training.outputs import list_checkpoints, save_checkpoint, save_mapper, validation_images
from elite.training.settings import REFERENCE_LR, TrainSettings

logger = logging.getLogger(__name__)

WORDS_WEIGHT = 0.01  # stage 1: x mean |words|
VALUES_WEIGHT = 1e-4  # stage 2: x mean over layers of mean |v_l|


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimizer step, mean over its micro-batches (and processes)
    mapper_path: Path  # <stage>_mapper.pt
    checkpoints: list[Path]
    skipped: int  # samples skipped (unreadable, no object) by this process
    validation: list[Path] = field(default_factory=list)  # folders of validation images, one per validation step


def _features(vision: Any, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():  # the vision tower is frozen
        return vision_features(vision, pixels)


def training_loss(stage: Stage, frozen: FrozenModels, glob: GlobalMapper, local: LocalMapper | None,
                  batch: dict[str, Any], generators: Sequence[torch.Generator], lambda_local: float = 1.0,
                  hold: contextlib.ExitStack | None = None) -> torch.Tensor:
    """One micro-batch's loss (method doc); each sample's VAE sample, noise and timestep drawn from its own CPU
    generator. With `hold`, the ELITE attention processors stay installed until the caller closes it (after
    backward: gradient checkpointing recomputes UNet blocks there, which must see the same processors)."""
    device, dtype = frozen.unet.device, frozen.unet.dtype
    count = len(batch["prompts"])
    if len(generators) != count:
        raise ValueError(f"{len(generators)} generators for {count} samples")
    with torch.no_grad():
        posterior = frozen.vae.encode(batch["vae_pixels"].to(device, dtype)).latent_dist
        shape = posterior.mean.shape[1:]
        drawn = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)
        latents = (posterior.mean + posterior.std * drawn) * frozen.vae.config.scaling_factor
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)
    steps = frozen.noise_scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(device)
    noisy = frozen.noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if frozen.noise_scheduler.config.prediction_type == "epsilon" else \
        frozen.noise_scheduler.get_velocity(latents, noise, timesteps)
    features = _features(frozen.vision, batch["pixel_values"].to(device, dtype))
    if stage == "global":
        words = glob(features)  # (batch, 5, text_dim): all five injected
        hidden, _ = encode_prompts(frozen.text_encoder, frozen.tokenizer, batch["prompts"],
                                   [{PLACEHOLDER: w} for w in words], truncate=True)
        with _attention(hold, frozen.unet, glob):
            pred = frozen.unet(noisy, timesteps, hidden).sample
        return F.mse_loss(pred.float(), target.float()) + WORDS_WEIGHT * words.abs().mean()
    assert local is not None
    with torch.no_grad():
        w0 = glob(features)[:, :1]  # (batch, 1, text_dim)
        hidden, slots = encode_prompts(frozen.text_encoder, frozen.tokenizer, batch["prompts"],
                                       [{PLACEHOLDER: w} for w in w0], truncate=True)
    object_features = _features(frozen.vision, batch["object_pixel_values"].to(device, dtype))
    tokens = local(object_features) * batch["mask_grid"].reshape(count, -1, 1).to(device, dtype)
    injection = LocalInjection(torch.arange(count), tokens[:, None],
                               torch.tensor([[found[0][1]] for found in slots]),
                               torch.full((count, 1), float(lambda_local)))
    with _attention(hold, frozen.unet, glob, local, injection):
        pred = frozen.unet(noisy, timesteps, hidden).sample
    mask = batch["latent_mask"].to(device)[:, None]  # (batch, 1, h, w)
    squared = (pred.float() - target.float()) ** 2 * mask
    mse = squared.sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)
    values = [local.key_value(path)[1](tokens).abs().mean() for path, _ in local.config.cross_attention_layers]
    return mse + VALUES_WEIGHT * torch.stack(values).mean()


def _attention(hold: contextlib.ExitStack | None, *args: Any) -> contextlib.AbstractContextManager[Any]:
    """`elite_attention(*args)` for one `with` block, or entered on `hold` (left when the caller closes it)."""
    if hold is None:
        return elite_attention(*args)
    hold.enter_context(elite_attention(*args))
    return contextlib.nullcontext()


def sample_generators(seed: int, number: int, first_slot: int, count: int, fixed: bool) -> list[torch.Generator]:
    """Generators of micro-batch `number`'s samples, slots `first_slot`.. counted over all processes (`fixed`: the
    same for every micro-batch, so a slot's noise never changes)."""
    base = seed if fixed else seed * 1_000_003 + number
    return [torch.Generator().manual_seed(base * 65_537 + slot) for slot in range(first_slot, first_slot + count)]


class MicroBatches:
    """Batch sampler: micro-batches from number `start` on, as (epoch, index) pairs. Epoch e visits a permutation
    seeded by (seed, e), sharded over the processes; the same numbers give the same samples on every run."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, process: int, processes: int) -> None:
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.process, self.processes = process, processes

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = max(1, self.size // (self.batch_size * self.processes))
        number = self.start
        while True:
            epoch, offset = divmod(number, per_epoch)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            shard = order.tolist()[self.process::self.processes]
            picked = shard[offset * self.batch_size:(offset + 1) * self.batch_size] or shard[:self.batch_size]
            yield [(epoch, index) for index in picked]
            number += 1


def _counted(examples: Sequence[Any]) -> tuple[dict[str, Any] | None, int]:
    """collate + how many samples were asked for (the rest were skipped)."""
    return collate(examples), len(examples)


def _average_gradients(parameters: Sequence[torch.nn.Parameter], processes: int) -> None:
    """The gradients' mean over the processes, in one flat all-reduce (a parameter without a gradient on a process,
    whose samples were all skipped, counts as zero there)."""
    if processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [parameter.grad for parameter in parameters]
    flat = torch.cat([grad.reshape(-1) for grad in grads])  # type: ignore[union-attr]
    torch.distributed.all_reduce(flat)
    flat /= processes
    offset = 0
    for grad in grads:
        assert grad is not None
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def train(settings: TrainSettings, dataset: ConceptDataset, progress: bool = True) -> TrainResult:
    """Train the stage's mapper for `settings.steps` optimizer steps (from a checkpoint with `resume`)."""
    output = Path(settings.output_dir)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, project_dir=str(output),
                              log_with="tensorboard" if _has_tensorboard() else None, cpu=not _has_accelerator())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # else every process would think it is the main one
        raise InputError(f"launched as {launched} processes (WORLD_SIZE) but accelerate runs as "
                         f"{accelerator.num_processes}: check the launcher's settings (docs/training.md)")
    frozen = load_frozen(settings)
    if settings.gradient_checkpointing:
        frozen.unet.enable_gradient_checkpointing()
    set_seed(settings.seed)  # a mapper from scratch starts from the same weights on every run
    glob, local = load_mappers(settings, frozen)
    mapper: torch.nn.Module = glob if local is None else local
    mapper.train()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.mixed_precision, torch.float32)
    for module in (frozen.vae, frozen.unet, frozen.text_encoder, frozen.vision, *([glob] if local is not None else [])):
        module.to(accelerator.device)
        if weight_dtype != torch.float32:  # separate calls: diffusers warns about a dtype cast in float32 too
            module.to(weight_dtype)
    mapper.to(accelerator.device)
    parameters = list(mapper.parameters())
    base = settings.learning_rate if settings.learning_rate is not None else REFERENCE_LR[settings.stage]
    processes = accelerator.num_processes
    scale = settings.batch_size * settings.gradient_accumulation * processes
    optimizer = torch.optim.AdamW(parameters, lr=base * (scale if settings.scale_lr else 1),
                                  weight_decay=settings.weight_decay)
    schedule = get_constant_schedule_with_warmup(optimizer, settings.warmup_steps)
    optimizer, schedule = accelerator.prepare(optimizer, schedule)
    accelerator.register_for_checkpointing(mapper)  # saved and restored with the optimizer's state
    step = 0
    if settings.resume:
        found = list_checkpoints(output)[-1:] if settings.resume == "latest" else [Path(settings.resume)]
        if not found or not (found[0] / "trainer.json").is_file():
            raise InputError(f"no checkpoint to resume from at {settings.resume if found else output}")
        accelerator.load_state(str(found[0]))
        step = int(json.loads((found[0] / "trainer.json").read_text())["step"])
    if accelerator.is_main_process and accelerator.trackers == [] and _has_tensorboard():
        accelerator.init_trackers(f"elite-{settings.stage}")
    sampler = MicroBatches(len(dataset), settings.batch_size, settings.seed, step * settings.gradient_accumulation,
                           accelerator.process_index, processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_counted,
                                         num_workers=settings.num_workers)
    batches = iter(loader)
    number = step * settings.gradient_accumulation
    result = TrainResult(step, [], output / f"{settings.stage}_mapper.pt", [], 0)
    bar = tqdm(total=settings.steps, initial=step, desc=f"training {settings.stage}", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    while step < settings.steps:
        total = torch.zeros((), device=accelerator.device)
        for _ in range(settings.gradient_accumulation):
            batch, asked = next(batches)
            result.skipped += asked - (0 if batch is None else len(batch["prompts"]))
            generators = sample_generators(settings.seed, number, accelerator.process_index * settings.batch_size,
                                           0 if batch is None else len(batch["prompts"]), settings.fixed_noise)
            number += 1
            if batch is None:
                continue
            with contextlib.ExitStack() as held, accelerator.autocast():
                loss = training_loss(settings.stage, frozen, glob, local, batch, generators, settings.lambda_local,
                                     hold=held)
                accelerator.backward(loss / settings.gradient_accumulation)
            total += loss.detach().float() / settings.gradient_accumulation
        _average_gradients(parameters, processes)
        accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        mean = float(accelerator.reduce(total, "mean")) if processes > 1 else float(total)
        result.losses.append(mean)
        accelerator.log({"loss": mean, "lr": schedule.get_last_lr()[0]}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{mean:.4f}")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            result.checkpoints.append(save_checkpoint(accelerator, mapper, settings, output, step))
        if settings.validate_every and step % settings.validate_every == 0 and accelerator.is_main_process:
            with accelerator.autocast():
                result.validation.append(validation_images(settings, frozen, glob, local, dataset, output, step))
            mapper.train()
    bar.close()
    if result.skipped:
        logger.warning("%d training samples were skipped (the reasons are logged above)", result.skipped)
    if accelerator.is_main_process:
        save_mapper(mapper, result.mapper_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.steps = step
    return result


def _has_accelerator() -> bool:
    """A CUDA (or MPS, XPU) device: without one accelerate runs several launched processes only with cpu=True."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _has_tensorboard() -> bool:
    """accelerate's TensorBoard tracker needs the package (the `train` extra); without it: no event files."""
    return importlib.util.find_spec("tensorboard") is not None
