"""`ElitePipeline`: Stable Diffusion 1.x generation with ELITE concepts, batched.

Classifier-free guidance runs as one UNet call per step for the whole batch (unconditional rows
first, then conditional). Each image has its own seed or generator, and the local branch is
normalised per sample by default, so an image does not depend on what else is in its batch.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, LMSDiscreteScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

from elite.errors import CheckpointError, InputError
from elite.model.attention import (
    EliteAttnProcessor,
    LocalInjection,
    Normalization,
    elite_attention,
    install_processors,
)
from elite.model.checkpoints import load_mapper, load_pretrained
from elite.model.concepts import ConceptEmbedding
from elite.model.devices import DeviceArg, DtypeArg, check_torch_device, resolve_device, resolve_dtype
from elite.model.encoder import ConceptEncoderModule, TorchConceptEncoder, check_vision_model
from elite.model.mappers import GlobalMapper, LocalMapper, cross_attention_layers
from elite.model.sampling import check_sampler
from elite.model.text import encode_prompts

Binding = ConceptEmbedding | Mapping[str, ConceptEmbedding]  # one concept (for the default placeholder) or several
ConceptsArg = Binding | Sequence[Binding]
ImageArg = Image.Image | None


@dataclass(frozen=True)
class ReferenceSettings:
    """The method doc's "Reference inference settings", in one place: the pipeline's defaults."""

    # method doc: LMS discrete scheduler, scaled_linear betas 0.00085 to 0.012, 1000 training steps
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    # The reference's diffusers LMS spaced its steps linearly from t=999 down to 0 ("linspace"). Repos saved by
    # current diffusers say "leading", which starts 100 steps at t=991 and 3 steps at 667, so the repo's
    # scheduler config is not read at all.
    timestep_spacing: str = "linspace"
    num_inference_steps: int = 100  # method doc: 100 steps (the authors' demo uses 20)
    guidance_scale: float = 5.0  # method doc: guidance scale 5
    lambda_local: float = 0.8  # method doc: lambda 0.8
    size: int = 512  # method doc: 512x512

    def scheduler(self) -> LMSDiscreteScheduler:
        """The reference sampler, whatever the model repo's own scheduler config says."""
        return LMSDiscreteScheduler(beta_start=self.beta_start, beta_end=self.beta_end,
                                    beta_schedule=self.beta_schedule, num_train_timesteps=self.num_train_timesteps,
                                    timestep_spacing=self.timestep_spacing)


REFERENCE = ReferenceSettings()


@dataclass
class ElitePipelineOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int | None] = field(default_factory=list)  # the seed of each image; None where a generator was given


class ElitePipeline:
    """Load SD 1.x + a CLIP vision tower + the two ELITE mappers; encode concepts; generate images."""

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin, image_encoder: CLIPVisionModel | None,
                 global_mapper: GlobalMapper, local_mapper: LocalMapper) -> None:
        if text_encoder.config.hidden_size != global_mapper.config.output_dim:
            raise CheckpointError(f"text encoder width {text_encoder.config.hidden_size} does not match the "
                                  f"mappers' word width {global_mapper.config.output_dim}")
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae.eval(), text_encoder.eval(), tokenizer, unet.eval()
        self.scheduler = scheduler
        self.global_mapper, self.local_mapper = global_mapper.eval(), local_mapper.eval()
        self.encoder: TorchConceptEncoder | None = None
        if image_encoder is not None:  # only needed to encode concepts, not to generate from stored ones
            check_vision_model(image_encoder, global_mapper, "image encoder")
            self.encoder = TorchConceptEncoder(ConceptEncoderModule(image_encoder, global_mapper, local_mapper),
                                               device=unet.device, dtype=unet.dtype)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._installed: dict[str, EliteAttnProcessor] | None = None  # processors kept across calls (compiled UNet)

    def optimize(self, channels_last: bool = False, compile_backend: str | None = None,
                 compile_mode: str | None = None) -> ElitePipeline:
        """GPU speed-ups (docs/gpu.md). `channels_last`: the UNet and VAE in channels-last memory format (NHWC
        convolution kernels). `compile_backend` ("inductor", ...): the UNet compiled by torch.compile; the ELITE
        attention processors are then installed once for every later call and each call only hands them its
        concepts, so the compiled graph is reused from call to call (a new batch size compiles once more)."""
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile_backend and self._installed is None:
            self._installed = install_processors(self.unet, self.global_mapper, self.local_mapper)[1]
            self.unet.compile(backend=compile_backend, mode=compile_mode)
        return self

    @contextlib.contextmanager
    def _attention(self, injection: LocalInjection | None) -> Iterator[None]:
        """The ELITE processors for one call: installed for it, or (optimize(compile_backend=...)) handed its
        concepts."""
        if self._installed is None:
            with elite_attention(self.unet, self.global_mapper, self.local_mapper, injection):
                yield
            return
        for processor in self._installed.values():
            processor.set_injection(injection)
        try:
            yield
        finally:
            for processor in self._installed.values():
                processor.set_injection(None)

    @classmethod
    def from_pretrained(cls, pretrained_model: str | os.PathLike[str], vision_model: str | os.PathLike[str] | None,
                        global_mapper: str | os.PathLike[str], local_mapper: str | os.PathLike[str],
                        torch_dtype: DtypeArg = None, device: DeviceArg = "cpu",
                        scheduler: SchedulerMixin | None = None) -> ElitePipeline:
        """`pretrained_model`: an SD 1.x hub id or folder (diffusers layout); `vision_model`: a CLIP vision
        tower id or folder (None: generation only); mappers: the release's `.pt` files or safetensors conversions.

        `device`: "auto" (the first GPU, else the CPU), "cpu", "cuda" or "cuda:N"; `torch_dtype`: None or "auto"
        (float16 on CUDA, float32 on the CPU), a name or a torch dtype. `scheduler`: the default sampler of
        every call (default: the reference LMS, `REFERENCE.scheduler()`; the repo's scheduler is not read)."""
        where = check_torch_device(resolve_device(device))  # before any weight is read: a bad device fails fast
        torch_dtype = resolve_dtype(torch_dtype, where)
        if scheduler is not None and not isinstance(scheduler, SchedulerMixin):
            raise InputError(f"scheduler must be a diffusers scheduler, got a {type(scheduler).__name__}")
        kw: dict[str, Any] = {"torch_dtype": torch_dtype}
        unet = load_pretrained("UNet", UNet2DConditionModel, pretrained_model, subfolder="unet", **kw)
        vae = load_pretrained("VAE", AutoencoderKL, pretrained_model, subfolder="vae", **kw)
        text_encoder = load_pretrained("text encoder", CLIPTextModel, pretrained_model, subfolder="text_encoder", **kw)
        tokenizer = load_pretrained("tokenizer", CLIPTokenizer, pretrained_model, subfolder="tokenizer")
        image_encoder = load_pretrained("image encoder", CLIPVisionModel, vision_model, **kw) if vision_model else None
        layers = cross_attention_layers(unet)
        glob = load_mapper(GlobalMapper, global_mapper, layers, dtype=torch_dtype)
        local = load_mapper(LocalMapper, local_mapper, layers, dtype=torch_dtype)
        sampler = scheduler if scheduler is not None else REFERENCE.scheduler()  # a scheduler's len() is its steps
        return cls(vae, text_encoder, tokenizer, unet, sampler, image_encoder, glob, local).to(where)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ElitePipeline:
        for module in (self.vae, self.text_encoder, self.unet, self.global_mapper, self.local_mapper):
            if device is not None:
                module.to(device)
            if dtype is not None:  # separate calls: diffusers warns when dtype=None is passed along
                module.to(dtype)
        if self.encoder is not None:
            self.encoder = TorchConceptEncoder(self.encoder.module, device=self.unet.device, dtype=self.unet.dtype)
        return self

    @property
    def device(self) -> torch.device:
        # the first weight's device: diffusers' `unet.device` walks every module (~0.6 ms a call, many per call)
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_concepts(self, images: Sequence[Image.Image], masks: Sequence[ImageArg] | None = None,
                        concept_ids: Sequence[str] | None = None) -> list[ConceptEmbedding]:
        if self.encoder is None:
            raise InputError("this pipeline was loaded without a vision model; it can only generate")
        return self.encoder.encode(images, masks, concept_ids)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        concepts: ConceptsArg,
        *,
        placeholder: str = "S",  # reference template "a photo of a S"
        negative_prompt: str | Sequence[str] = "",  # reference: empty unconditional prompt
        lambda_local: float = REFERENCE.lambda_local,
        guidance_scale: float = REFERENCE.guidance_scale,
        num_inference_steps: int = REFERENCE.num_inference_steps,
        scheduler: SchedulerMixin | None = None,  # default: the pipeline's (the reference LMS unless given at load)
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        height: int = REFERENCE.size,
        width: int = REFERENCE.size,
        output_type: str = "pil",  # "pil" | "np" | "pt" | "latent"
        attention_normalization: Normalization = "per_sample",
        show_progress: bool = True,
    ) -> ElitePipelineOutput:
        # 1. Check inputs and bind every prompt's placeholders to concepts.
        prompts, bindings = self._bind(prompt, concepts, placeholder)
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        bindings = [b for b in bindings for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        negatives = ([negative_prompt] * batch if isinstance(negative_prompt, str)
                     else [n for n in negative_prompt for _ in range(num_images_per_prompt)])
        if len(negatives) != batch:
            raise InputError(f"got {len(negatives)} negative prompts for {batch} images")
        check_sampler(num_inference_steps, guidance_scale, lambda_local, height, width, self.vae_scale_factor)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"unknown output_type {output_type!r}")
        if attention_normalization not in ("per_sample", "batch"):
            raise InputError(f"unknown attention_normalization {attention_normalization!r}")
        do_guidance = guidance_scale > 1.0

        # 2. Encode prompts: w0 of each bound concept injected at its placeholder.
        words = [{p: c.primary_word[None].to(self.device, self.dtype) for p, c in b.items()} for b in bindings]
        cond, slots = encode_prompts(self.text_encoder, self.tokenizer, prompts, words)
        context = torch.cat([self._encode_plain(negatives), cond]) if do_guidance else cond  # (rows, ctx, dim)

        # 3. Prepare latents, each image from its own seed or generator.
        generators, seeds = self._generators(batch, seed, generator)
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        # Drawn where each generator lives (CPU for seeds) in float32, so a seed gives the same image anywhere.
        latents = torch.cat([torch.randn(shape, generator=g, device=g.device) for g in generators])
        latents = latents.to(self.device, self.dtype)
        sched = type(scheduler or self.scheduler).from_config((scheduler or self.scheduler).config)
        sched.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * sched.init_noise_sigma
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}

        # 4. Local branch for the conditional rows only.
        injection = self._local_injection(bindings, slots, lambda_local, attention_normalization,
                                          first_row=batch if do_guidance else 0)

        # 5. Denoise: one UNet call per step for the whole batch.
        with self._attention(injection):
            for t in tqdm(sched.timesteps, desc="denoising", disable=not show_progress, leave=False):
                model_input = torch.cat([latents, latents]) if do_guidance else latents  # (rows, c, h, w)
                model_input = sched.scale_model_input(model_input, t)
                noise = self.unet(model_input, t, encoder_hidden_states=context).sample
                if do_guidance:
                    noise_uncond, noise_cond = noise.chunk(2)
                    noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latents = sched.step(noise, t, latents, **step_kwargs).prev_sample

        # 6. Decode.
        if output_type == "latent":
            return ElitePipelineOutput(latents, seeds)
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)  # (batch, 3, height, width)
        if output_type == "pt":
            return ElitePipelineOutput(images.cpu(), seeds)
        array = images.permute(0, 2, 3, 1).cpu().numpy()  # (batch, height, width, 3)
        if output_type == "np":
            return ElitePipelineOutput(array, seeds)
        return ElitePipelineOutput([Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)], seeds)

    def _bind(self, prompt: str | Sequence[str], concepts: ConceptsArg,
              placeholder: str) -> tuple[list[str], list[dict[str, ConceptEmbedding]]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        items = [concepts] if isinstance(concepts, ConceptEmbedding | Mapping) else list(concepts)
        if not prompts or not items:
            raise InputError("at least one prompt and one concept are needed")
        if len(prompts) == 1:
            prompts = prompts * len(items)
        if len(items) == 1:
            items = items * len(prompts)
        if len(items) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts and {len(items)} concepts; give one, or one per prompt")
        bindings = [dict(item) if isinstance(item, Mapping) else {placeholder: item} for item in items]
        width = self.global_mapper.config.output_dim
        for binding in bindings:
            for key, value in binding.items():
                if not isinstance(value, ConceptEmbedding):
                    raise InputError(f"placeholder {key!r} is bound to a {type(value).__name__}, "
                                     "not a ConceptEmbedding")
                if value.words.shape[-1] != width or value.local_tokens.shape[-1] != width:
                    raise InputError(f"concept {value.concept_id!r} has embeddings of width "
                                     f"{value.words.shape[-1]}; this pipeline's text encoder takes {width} "
                                     "(encoded with other models?)")
        return prompts, bindings

    def _encode_plain(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(input_ids=ids.to(self.device)).last_hidden_state  # (batch, ctx, dim)

    def _generators(self, batch: int, seed: int | Sequence[int] | None,
                    generator: torch.Generator | Sequence[torch.Generator] | None,
                    ) -> tuple[list[torch.Generator], list[int | None]]:
        """One generator per image: given, or seeded (an int seed s gives s, s+1, ...; none: random seeds)."""
        if generator is not None and seed is not None:
            raise InputError("give either seed or generator, not both")
        if generator is not None:
            generators = [generator] * batch if isinstance(generator, torch.Generator) else list(generator)
            if len(generators) != batch:
                raise InputError(f"got {len(generators)} generators for {batch} images")
            return generators, [None] * batch
        if seed is None:
            seeds = [int(s) for s in torch.randint(0, 2**62, (batch,))]
        else:
            seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise InputError(f"got {len(seeds)} seeds for {batch} images")
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], list(seeds)

    def _local_injection(self, bindings: list[dict[str, ConceptEmbedding]], slots: list[list[tuple[str, int]]],
                         lambda_local: float, normalization: Normalization, first_row: int) -> LocalInjection:
        batch, most = len(bindings), max(len(s) for s in slots)
        patches, dim = next(iter(bindings[0].values())).local_tokens.shape
        tokens = torch.zeros(batch, most, patches, dim)  # (batch, slots, patches, text_dim)
        index = torch.zeros(batch, most, dtype=torch.long)
        weight = torch.zeros(batch, most)
        for row, (binding, row_slots) in enumerate(zip(bindings, slots, strict=True)):
            for k, (placeholder, position) in enumerate(row_slots):
                tokens[row, k] = binding[placeholder].local_tokens
                index[row, k] = position
                weight[row, k] = lambda_local
        rows = torch.arange(first_row, first_row + batch)
        # everything on the device and in the UNet's dtype once per call: no copy in the processors' steps
        return LocalInjection(rows.to(self.device), tokens.to(self.device, self.dtype), index.to(self.device),
                              weight.to(self.device, self.dtype), normalization)
