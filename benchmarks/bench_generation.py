"""Generation throughput (images/s): ElitePipeline vs a reference-style loop vs plain Stable Diffusion.

Three contenders, one run, the same random-weight models, LMS scheduler, steps, seeds and concepts:

  a. `ElitePipeline.__call__` on a batch of N images: classifier-free guidance as one UNet call per
     step for the whole batch, local injection on (the library's EliteAttnProcessor, SDPA based).
  b. a reference-style loop written here: one image at a time, separate conditional and unconditional
     UNet calls per step, with a cross-attention processor that computes what the authors' release
     (`inj_forward_crossattention` in csyxwei/ELITE train_local.py) computes, the way it computes it.
  c. diffusers' plain `StableDiffusionPipeline` with the same UNet/VAE/text encoder/tokenizer/scheduler
     config, same batch and steps, no ELITE injection: what the local branch costs.

Self-attention keeps diffusers' default processor in a, b and c (see --release-self-attention for
the release's behaviour, where self-attention also ran the explicit math path).

The models are a mid-size, SD-1.x-shaped set with random weights (defaults: UNet block channels
128/256/256/256, 2 layers per block, the SD 1.4 block types, so 16 cross-attention layers, cross
attention dim 768; CLIP text model of hidden 768), saved in the real on-disk layout to a temporary
folder and loaded with `ElitePipeline.from_pretrained`. Concepts are encoded by the pipeline from the
release's test images (a small random CLIP vision tower feeds the mappers).

    python benchmarks/bench_generation.py            # defaults: 256x256, 10 steps, batch 4, 2 timed reps
    python benchmarks/bench_generation.py --quick    # smoke run: 128x128, 4 steps, batch 2, 1 rep
    python benchmarks/bench_generation.py --steps 20 --batch 8 --reps 3 --size 512
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import core_count, exact_command, machine_info, peak_rss_mib, save_results  # noqa: E402

from elite.concepts import ConceptEmbedding, find_concepts  # noqa: E402
from elite.configs import SD14_UNET_CONFIG  # noqa: E402
from elite.mappers import GlobalMapper, LocalMapper, MapperConfig, cross_attention_layers  # noqa: E402
from elite.pipeline import ElitePipeline  # noqa: E402
from elite.preprocessing import open_image  # noqa: E402
from elite.text import encode_prompts  # noqa: E402
from elite.tiny import write_tokenizer_files  # noqa: E402

CONCEPT_DIR = Path("/work/shared/data/elite-test-concepts")
PROMPT = "a photo of a S"  # the reference template with the reference placeholder
GUIDANCE = 5.0  # reference guidance scale
LAMBDA = 0.8  # reference lambda


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelPaths:
    pretrained_model: Path
    vision_model: Path
    global_mapper: Path
    local_mapper: Path


def build_models(out: Path, args: argparse.Namespace) -> tuple[ModelPaths, dict[str, Any]]:
    """A mid-size SD-1.x-shaped model set with random weights, in the real on-disk layouts."""
    paths = ModelPaths(out / "stable-diffusion", out / "clip-vision", out / "global_mapper.pt",
                       out / "local_mapper.pt")
    with tempfile.TemporaryDirectory() as scratch:
        vocab_size = write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    torch.manual_seed(args.model_seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=args.text_layers,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    latent = args.size // 8
    unet_config = {**SD14_UNET_CONFIG, "block_out_channels": list(args.unet_channels),
                   "layers_per_block": args.unet_layers, "sample_size": latent}
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(
        block_out_channels=tuple(args.vae_channels), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, sample_size=args.size, scaling_factor=0.18215)
    # The reference sampler: LMS, scaled_linear betas 0.00085-0.012, 1000 training steps.
    scheduler = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     num_train_timesteps=1000)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(paths.pretrained_model)
    tokenizer_dir = paths.pretrained_model / "tokenizer"  # as SD 1.4 ships it: vocab.json + merges.txt
    for stale in tokenizer_dir.iterdir():
        stale.unlink()
    write_tokenizer_files(tokenizer_dir)
    CLIPVisionModel(CLIPVisionConfig(
        hidden_size=args.vision_dim, intermediate_size=4 * args.vision_dim, num_hidden_layers=16,
        num_attention_heads=max(1, args.vision_dim // 64), image_size=224, patch_size=14,
        projection_dim=768)).save_pretrained(paths.vision_model)
    config = MapperConfig(input_dim=args.vision_dim, output_dim=768, cross_attention_layers=cross_attention_layers(unet))
    for cls, path in ((GlobalMapper, paths.global_mapper), (LocalMapper, paths.local_mapper)):
        mapper = cls(config)
        for layer, _ in config.cross_attention_layers:  # k/v copies start from the UNet's own, as in training
            to_k, to_v = mapper.key_value(layer)
            host = unet.get_submodule(layer)
            to_k.weight.data.copy_(host.to_k.weight.data)
            to_v.weight.data.copy_(host.to_v.weight.data)
        torch.save(mapper.state_dict(), path)  # the release's format
    facts = {
        "unet_config": {k: unet_config[k] for k in ("block_out_channels", "layers_per_block", "attention_head_dim",
                                                   "cross_attention_dim", "down_block_types", "up_block_types")},
        "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "cross_attention_layers": len(config.cross_attention_layers),
        "text_encoder_layers": args.text_layers,
        "text_encoder_params_M": round(sum(p.numel() for p in text_encoder.parameters()) / 1e6, 1),
        "vae_block_out_channels": list(args.vae_channels),
        "vae_params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 1),
        "vision_hidden": args.vision_dim,
        "image_size": args.size,
        "latent_size": latent,
    }
    return paths, facts


def load_concepts(pipe: ElitePipeline, count: int) -> list[ConceptEmbedding]:
    sources = find_concepts(CONCEPT_DIR)
    chosen = [sources[i % len(sources)] for i in range(count)]
    images = [open_image(s.image) for s in chosen]
    masks = [open_image(s.mask) if s.mask else None for s in chosen]
    return pipe.encode_concepts(images, masks, [s.concept_id for s in chosen])


# --------------------------------------------------------------------------------------------------
# (b) The reference-style loop
# --------------------------------------------------------------------------------------------------

class ReleaseContext:
    """What the release packed into `encoder_hidden_states` as a dict besides the text states.

    The release passed {"CONTEXT_TENSOR", "LOCAL", "LOCAL_INDEX", "LAMBDA"} through the UNet; current
    diffusers passes `encoder_hidden_states` to other code that expects a tensor, so here the text
    states go through the UNet as usual and the rest sits on this shared object (None = no local
    branch, as in the release's unconditional call)."""

    def __init__(self) -> None:
        self.local: torch.Tensor | None = None  # (batch, patches, text_dim), masked local tokens
        self.local_index: torch.Tensor | None = None  # (batch,) long: the placeholder's token position
        self.llambda: float = 1.0


value_local_list: list[torch.Tensor] = []  # the release keeps every value_local of a UNet call alive


class ReleaseCrossAttnProcessor:
    """The release's `inj_forward_crossattention`, line by line, as a diffusers attention processor.

    Explicit math path with heads folded into the batch dim (`head_to_batch_dim`, the release's
    `reshape_heads_to_batch_dim`), `torch.matmul` (3-D: bmm), softmax, matmul; keys and values from
    the global mapper's copies; the local branch re-projects q, and the local k/v from the local
    tokens, on every call; A is the global attention on the placeholder token divided by its maximum
    over the whole tensor; the result is P_l * A * lambda, then @ v_l.
    """

    def __init__(self, to_k_global: torch.nn.Linear, to_v_global: torch.nn.Linear,
                 to_k_local: torch.nn.Linear, to_v_local: torch.nn.Linear, context: ReleaseContext) -> None:
        self.to_k_global, self.to_v_global = to_k_global, to_v_global
        self.to_k_local, self.to_v_local = to_k_local, to_v_local
        self.context = context

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        # The release's code path assumes SD 1.x attn2: no norms, no residual, no mask, 3-D input.
        assert encoder_hidden_states is not None and attention_mask is None and hidden_states.ndim == 3
        context_tensor = encoder_hidden_states
        hidden_states_local = hidden_states.clone()

        query = attn.to_q(hidden_states)
        key = self.to_k_global(context_tensor)
        value = self.to_v_global(context_tensor)

        query = attn.head_to_batch_dim(query)  # (batch * heads, queries, head_dim)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        attention_scores = torch.matmul(query, key.transpose(-1, -2))
        attention_scores = attention_scores * attn.scale
        attention_probs = attention_scores.softmax(dim=-1)
        hidden_states = torch.matmul(attention_probs, value)

        ctx = self.context
        if ctx.local is not None:
            query_local = attn.to_q(hidden_states_local)
            key_local = self.to_k_local(ctx.local)
            value_local = self.to_v_local(ctx.local)

            query_local = attn.head_to_batch_dim(query_local)
            key_local = attn.head_to_batch_dim(key_local)
            value_local = attn.head_to_batch_dim(value_local)

            attention_scores_local = torch.matmul(query_local, key_local.transpose(-1, -2))
            attention_scores_local = attention_scores_local * attn.scale
            attention_probs_local = attention_scores_local.softmax(dim=-1)

            # the attention map of the placeholder word, normalised by its maximum over the whole tensor
            index_local = ctx.local_index
            assert index_local is not None
            index_local = index_local.reshape(index_local.shape[0], 1).repeat((1, attn.heads)).reshape(-1)
            attention_probs_clone = attention_probs.clone().permute((0, 2, 1))
            attention_probs_mask = attention_probs_clone[torch.arange(index_local.shape[0]), index_local]
            attention_probs_mask = attention_probs_mask.unsqueeze(2) / attention_probs_mask.max()

            attention_probs_local = attention_probs_local * attention_probs_mask * ctx.llambda
            hidden_states += torch.matmul(attention_probs_local, value_local)
            value_local_list.append(value_local)

        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        return hidden_states


class ReleaseSelfAttnProcessor:
    """Optional: the release patched `CrossAttention.__call__` at class level, so self-attention also
    ran its explicit math path (context None: k and v from the layer's own to_k/to_v)."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        assert encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(hidden_states))
        attention_probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        hidden_states = attn.batch_to_head_dim(torch.matmul(attention_probs, value))
        return attn.to_out[1](attn.to_out[0](hidden_states))


@contextlib.contextmanager
def release_attention(pipe: ElitePipeline, context: ReleaseContext,
                      self_attention: bool = False) -> Iterator[None]:
    unet = pipe.unet
    original = dict(unet.attn_processors)
    installed: dict[str, Any] = {}
    for path, _ in pipe.global_mapper.config.cross_attention_layers:
        installed[f"{path}.processor"] = ReleaseCrossAttnProcessor(
            *pipe.global_mapper.key_value(path), *pipe.local_mapper.key_value(path), context)
    if self_attention:
        for name in original:
            if name.endswith("attn1.processor"):
                installed[name] = ReleaseSelfAttnProcessor()
    unet.set_attn_processor({**original, **installed})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))


@torch.inference_mode()
def reference_loop(pipe: ElitePipeline, concepts: list[ConceptEmbedding], seeds: list[int], steps: int,
                   size: int, self_attention: bool = False) -> np.ndarray:
    """The release's `validation()`: one image at a time, conditional then unconditional UNet call per step."""
    unet, vae, tokenizer, text_encoder = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    context = ReleaseContext()
    images = []
    with release_attention(pipe, context, self_attention):
        for concept, seed in zip(concepts, seeds):
            scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)  # fresh, as the release
            uncond_input = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                     return_tensors="pt")
            uncond_embeddings = text_encoder(input_ids=uncond_input.input_ids.to(pipe.device))[0]
            generator = torch.Generator("cpu").manual_seed(seed)
            latents = torch.randn((1, unet.config.in_channels, size // 8, size // 8), generator=generator)
            scheduler.set_timesteps(steps)
            latents = latents * scheduler.init_noise_sigma
            # w0 injected at the placeholder (the release's inj_forward_text; the position from the tokenizer)
            encoder_hidden_states, slots = encode_prompts(text_encoder, tokenizer, [PROMPT],
                                                          [{"S": concept.primary_word[None]}])
            placeholder_idx = torch.tensor([slots[0][0][1]])
            inj_embedding_local = concept.local_tokens[None]  # (1, 256, 768), already x mask
            for t in scheduler.timesteps:
                latent_model_input = scheduler.scale_model_input(latents, t)
                context.local, context.local_index, context.llambda = inj_embedding_local, placeholder_idx, LAMBDA
                noise_pred_text = unet(latent_model_input, t, encoder_hidden_states=encoder_hidden_states).sample
                value_local_list.clear()
                latent_model_input = scheduler.scale_model_input(latents, t)
                context.local = context.local_index = None  # unconditional: global k/v, no local branch
                noise_pred_uncond = unet(latent_model_input, t, encoder_hidden_states=uncond_embeddings).sample
                value_local_list.clear()
                noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
                latents = scheduler.step(noise_pred, t, latents).prev_sample
            image = vae.decode(1 / 0.18215 * latents.clone()).sample
            images.append((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy())
    return np.concatenate(images)


# --------------------------------------------------------------------------------------------------
# (a) and (c)
# --------------------------------------------------------------------------------------------------

def run_elite(pipe: ElitePipeline, concepts: list[ConceptEmbedding], seeds: list[int], steps: int,
              size: int) -> np.ndarray:
    out = pipe(PROMPT, concepts, num_inference_steps=steps, seed=seeds, height=size, width=size,
               guidance_scale=GUIDANCE, lambda_local=LAMBDA, output_type="np", show_progress=False)
    return np.asarray(out.images)


def run_plain(sd: StableDiffusionPipeline, seeds: list[int], steps: int, size: int) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = sd([PROMPT] * len(seeds), height=size, width=size, num_inference_steps=steps,
             guidance_scale=GUIDANCE, negative_prompt=[""] * len(seeds), generator=generators,
             output_type="np")
    return np.asarray(out.images)


# --------------------------------------------------------------------------------------------------
# Timing breakdown (forward hooks on the UNet and its attention layers)
# --------------------------------------------------------------------------------------------------

class Breakdown:
    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.totals = {"unet": 0.0, "attn1": 0.0, "attn2": 0.0}
        self.unet_calls = 0
        self.unet_rows = 0
        self._handles = []
        self._start: dict[int, float] = {}
        for name, module in unet.named_modules():  # the first is ("", unet)
            kind = "unet" if module is unet else name.rsplit(".", 1)[-1]
            if kind not in self.totals:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post(kind)))

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, kind: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.totals[kind] += time.perf_counter() - self._start.pop(id(module))
            if kind == "unet":
                self.unet_calls += 1
                self.unet_rows += args[0].shape[0]
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------

def timed(fn: Any) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="images per call of (a) and (c)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (reference: 100, demo: 20)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per contender (after one warm-up)")
    parser.add_argument("--seed", type=int, default=1000, help="image i gets seed SEED + i")
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--unet-channels", type=int, nargs=4, default=(128, 256, 256, 256))
    parser.add_argument("--unet-layers", type=int, default=2, help="UNet layers per block (SD 1.4: 2)")
    parser.add_argument("--text-layers", type=int, default=6, help="CLIP text layers (SD 1.4: 12)")
    parser.add_argument("--vae-channels", type=int, nargs=4, default=(32, 64, 128, 128))
    parser.add_argument("--vision-dim", type=int, default=256, help="hidden size of the small vision tower")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: core count)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the hooked breakdown runs")
    parser.add_argument("--release-self-attention", action="store_true",
                        help="also time (b) with self-attention on the release's math path (slower)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 128x128, 4 steps, batch 2, 1 rep")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generation.json)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.batch, args.reps = 128, 4, 2, 1
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or core_count())
    t_start = time.perf_counter()
    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']} "
          f"({torch.get_num_threads()} threads), diffusers {info['diffusers']}; {info['date']}")
    seeds = [args.seed + i for i in range(args.batch)]

    with tempfile.TemporaryDirectory(prefix="elite-bench-") as tmp:
        paths, facts = build_models(Path(tmp), args)
        pipe = ElitePipeline.from_pretrained(paths.pretrained_model, paths.vision_model, paths.global_mapper,
                                             paths.local_mapper)
    print(f"models: UNet {facts['unet_params_M']}M params ({facts['cross_attention_layers']} cross-attention "
          f"layers), text encoder {facts['text_encoder_params_M']}M, VAE {facts['vae_params_M']}M; "
          f"{args.size}x{args.size} images ({facts['latent_size']}x{facts['latent_size']} latents), "
          f"{args.steps} LMS steps, batch {args.batch}, guidance {GUIDANCE}, lambda {LAMBDA}")
    concepts = load_concepts(pipe, args.batch)
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                 unet=pipe.unet, scheduler=LMSDiscreteScheduler.from_config(pipe.scheduler.config),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)

    contenders: dict[str, Any] = {
        "a_elite_pipeline": lambda: run_elite(pipe, concepts, seeds, args.steps, args.size),
        "b_reference_loop": lambda: reference_loop(pipe, concepts, seeds, args.steps, args.size),
        "c_plain_sd": lambda: run_plain(sd, seeds, args.steps, args.size),
    }
    if args.release_self_attention:
        contenders["b2_reference_loop_release_self_attention"] = lambda: reference_loop(
            pipe, concepts, seeds, args.steps, args.size, self_attention=True)

    # Check that (b) is a fair stand-in: at batch 1 it must give (a)'s image.
    print("check: (a) vs (b) at batch 1 ...", flush=True)
    one_a = run_elite(pipe, concepts[:1], seeds[:1], args.steps, args.size)
    one_b = reference_loop(pipe, concepts[:1], seeds[:1], args.steps, args.size)
    diff_batch1 = float(np.abs(one_a - one_b).max())
    print(f"  max |a - b| over the output array at batch 1: {diff_batch1:.2e}")

    print("warm-up: one call of each contender ...", flush=True)
    outputs = {}
    warmup_s = {}
    for name, fn in contenders.items():
        warmup_s[name], outputs[name] = timed(fn)
        print(f"  {name}: {warmup_s[name]:.1f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(args.reps):  # interleaved, so slow drift hits every contender alike
        for name, fn in contenders.items():
            seconds, outputs[name] = timed(fn)
            times[name].append(seconds)
            print(f"  rep {rep + 1}/{args.reps} {name}: {seconds:.2f} s = {args.batch / seconds:.3f} images/s",
                  flush=True)

    diff_batch = float(np.abs(outputs["a_elite_pipeline"] - outputs["b_reference_loop"]).max())
    diff_plain = float(np.abs(outputs["a_elite_pipeline"] - outputs["c_plain_sd"]).max())

    breakdown: dict[str, Any] = {}
    if not args.no_breakdown:
        print("breakdown: one hooked call of each contender ...", flush=True)
        for name, fn in contenders.items():
            hooks = Breakdown(pipe.unet)
            try:
                total, _ = timed(fn)
            finally:
                hooks.close()
            tot = hooks.totals
            breakdown[name] = {
                "total_s": round(total, 3),
                "unet_s": round(tot["unet"], 3),
                "unet_calls": hooks.unet_calls,
                "unet_rows_per_call": hooks.unet_rows / max(hooks.unet_calls, 1),
                "unet_ms_per_row": round(1000 * tot["unet"] / max(hooks.unet_rows, 1), 1),
                "attn2_s": round(tot["attn2"], 3),
                "attn1_s": round(tot["attn1"], 3),
                "attn2_ms_per_row": round(1000 * tot["attn2"] / max(hooks.unet_rows, 1), 2),
                "unet_minus_attention_s": round(tot["unet"] - tot["attn1"] - tot["attn2"], 3),
                "outside_unet_s": round(total - tot["unet"], 3),
            }
            b = breakdown[name]
            print(f"  {name}: total {b['total_s']:.2f} s, UNet {b['unet_s']:.2f} s in {b['unet_calls']} calls "
                  f"of {b['unet_rows_per_call']:.0f} rows ({b['unet_ms_per_row']} ms/row), attn2 {b['attn2_s']:.2f} s "
                  f"({b['attn2_ms_per_row']} ms/row), attn1 {b['attn1_s']:.2f} s, outside UNet "
                  f"{b['outside_unet_s']:.2f} s", flush=True)

    results: dict[str, Any] = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {"seconds": [round(v, 3) for v in values], "median_s": round(median, 3),
                         "images_per_s": round(args.batch / median, 4),
                         "s_per_image": round(median / args.batch, 3), "warmup_s": round(warmup_s[name], 3)}
    a, b, c = (results[k]["median_s"] for k in ("a_elite_pipeline", "b_reference_loop", "c_plain_sd"))
    speedup = b / a
    overhead = a / c - 1
    summary = {
        "speedup_a_over_b": round(speedup, 3), "target_speedup": 1.5, "speedup_met": speedup >= 1.5,
        "overhead_a_over_c": round(overhead, 4), "target_overhead": 0.15, "overhead_met": overhead <= 0.15,
        "max_abs_diff_a_b_batch1": diff_batch1, f"max_abs_diff_a_b_batch{args.batch}": diff_batch,
        "max_abs_diff_a_c": diff_plain,
    }
    print()
    print(f"{'contender':<44} {'s/call':>8} {'images/s':>9} {'s/image':>8}")
    for name, r in results.items():
        print(f"{name:<44} {r['median_s']:>8.2f} {r['images_per_s']:>9.3f} {r['s_per_image']:>8.2f}")
    print(f"speed-up (a) over (b): {speedup:.2f}x (target >= 1.5x: {'met' if speedup >= 1.5 else 'MISSED'})")
    print(f"overhead (a) over (c): {100 * overhead:+.1f}% (target <= 15%: {'met' if overhead <= 0.15 else 'MISSED'})")
    print(f"max |a - b|: batch 1 {diff_batch1:.2e}, batch {args.batch} {diff_batch:.2e}; "
          f"max |a - c| (effect of injection) {diff_plain:.2e}")

    payload = {
        "benchmark": "generation", "command": exact_command(), "machine": info,
        "settings": {"batch": args.batch, "steps": args.steps, "size": args.size, "reps": args.reps,
                     "seeds": seeds, "prompt": PROMPT, "guidance_scale": GUIDANCE, "lambda_local": LAMBDA,
                     "scheduler": "LMSDiscreteScheduler", "dtype": "float32", "concepts": [c.concept_id for c in concepts],
                     "release_self_attention": args.release_self_attention},
        "models": facts, "results": results, "summary": summary, "breakdown": breakdown,
        "peak_rss_mib": round(peak_rss_mib(), 1), "script_wall_s": round(time.perf_counter() - t_start, 1),
    }
    path = save_results("generation", payload, args.out)
    print(f"peak RSS {payload['peak_rss_mib']:.0f} MiB; script wall time {payload['script_wall_s']:.0f} s; "
          f"saved {path}")


if __name__ == "__main__":
    main()
