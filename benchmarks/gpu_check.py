"""The GPU check: parity against float32 and timings of the GPU path at real size, in one run (docs/gpu.md).

    python benchmarks/gpu_check.py              # real size on the first GPU (about 5 min on an H100)
    python benchmarks/gpu_check.py --small      # the same code, tiny models on the CPU (CI runs this, ~1 min)
    python benchmarks/gpu_check.py --compile    # also generation with the UNet compiled (torch.compile, inductor)
    OUT=/some/dir python benchmarks/gpu_check.py   # also writes $OUT/gpu_check.json (or --out FILE)

It builds models with random weights (nothing is downloaded), writes them in the real on-disk layouts and loads them
through the code users run (`ElitePipeline.from_pretrained`, `TorchConceptEncoder.from_pretrained`,
`export_concept_encoder` + `OnnxConceptEncoder`). Real size: SD 1.4's UNet, VAE and text encoder, CLIP ViT-L/14's
vision tower and the release-size mappers. --small: `elite.model.tiny`'s models.

1. Parity on a small batch, each against float32 on the same device (thresholds printed with the values; any
   failure makes the exit status 1):
   - torch encoder in the low dtype (float16 on CUDA, bfloat16 on the CPU): cosine of words and local tokens;
   - ONNX Runtime encoder (fp16 export on the CUDA provider; fp32 on the CPU provider with --small);
   - generation in the low dtype: cosine of the final latents after a few sampler steps.
2. Timings (model time, synchronised; inputs already preprocessed for the encoders): concept encoding in
   ms/concept at batch 1, 8 and 32, torch and ONNX Runtime; 512x512 generation at 50 steps in s/image at batch 1
   and 8, ElitePipeline against diffusers' StableDiffusionPipeline built from the same UNet, VAE, text encoder and
   sampler (the local-injection overhead). Targets reported against: <= 2 ms/concept at batch 32, <= 0.6 s/image at
   batch 8, <= 10% injection overhead (real size on a GPU only).
3. A short table last; the JSON to $OUT/gpu_check.json when OUT is set, or to --out.

A part that cannot run here (the CUDA provider missing from the installed onnxruntime, say) is reported as skipped
with its reason, never silently left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a file

from elite.errors import EliteError
from elite.model.configs import CLIP_L14_TEXT_CONFIG, CLIP_L14_VISION_CONFIG, SD14_UNET_CONFIG, SD14_VAE_CONFIG
from elite.model.encoder import TorchConceptEncoder
from elite.model.loading import unet_cross_attention_layers
from elite.model.pipeline import REFERENCE, ElitePipeline
from elite.model.tiny import TinyModels, make_tiny_models, write_model_set, write_tokenizer_files

TARGETS = {"encode_ms_per_concept_b32": 2.0, "generate_s_per_image_b8": 0.6, "injection_overhead_pct": 10.0}
PROMPT_ELITE, PROMPT_PLAIN = "a photo of a S on the beach", "a photo of a dog on the beach"


# --------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------

def make_real_size_models(out: Path, seed: int = 0) -> TinyModels:
    """SD 1.4-shaped UNet/VAE/text encoder, CLIP ViT-L/14 vision tower and release-size mappers, random weights, in
    the real layouts (a small byte-level tokenizer: ids stay below the real vocabulary)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

    from elite.model.mappers import MapperConfig, cross_attention_layers

    paths = TinyModels(out / "stable-diffusion", out / "clip-vision", out / "global_mapper.pt", out / "local_mapper.pt")
    with tempfile.TemporaryDirectory() as scratch:
        write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT_CONFIG, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    write_model_set(paths, AutoencoderKL(**SD14_VAE_CONFIG), text_encoder, tokenizer, unet, REFERENCE.scheduler(),
                    CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_VISION_CONFIG)),
                    MapperConfig(cross_attention_layers=cross_attention_layers(unet)))  # release-size mappers
    return paths


def concept_images(count: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """Deterministic photos (a gradient and an ellipse of a colour per concept) with their masks."""
    images, masks = [], []
    for i in range(count):
        ramp = np.linspace(0, 255, 256, dtype=np.float32)
        pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (256, 1)), np.full((256, 256), 40.0 * (i % 6))],
                          -1)
        image = Image.fromarray(pixels.astype(np.uint8))
        mask = Image.new("L", (256, 256))
        box = (40 + 3 * (i % 10), 50, 200, 210 - 4 * (i % 8))
        ImageDraw.Draw(image).ellipse(box, fill=(200 - 10 * (i % 12), 30 * (i % 7), 90))
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        images.append(image)
        masks.append(mask)
    return images, masks


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def min_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The smallest per-sample cosine of two (batch, ...) tensors, in float64."""
    a, b = reference.double().flatten(1), other.double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def check(name: str, value: float, threshold: float) -> dict[str, Any]:
    passed = math.isfinite(value) and value >= threshold
    print(f"  parity {name}: {value:.6f} (threshold >= {threshold}) {'ok' if passed else 'FAILED'}", flush=True)
    return {"name": name, "value": value, "threshold": threshold, "ok": passed}


# --------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------

def encoder_part(paths: TinyModels, device: torch.device, low: torch.dtype, batches: list[int], reps: int,
                 scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    parity: list[dict[str, Any]] = []
    timings: dict[str, Any] = {"torch": {}, "onnxruntime": {}}
    load = {"cross_attention_layers": unet_cross_attention_layers(paths.pretrained_model), "device": device}
    reference = TorchConceptEncoder.from_pretrained(paths.vision_model, paths.global_mapper, paths.local_mapper,
                                                    dtype=torch.float32, **load)  # type: ignore[arg-type]
    fast = TorchConceptEncoder.from_pretrained(paths.vision_model, paths.global_mapper, paths.local_mapper,
                                               dtype=low, **load)  # type: ignore[arg-type]
    images, masks = concept_images(max(batches))
    prepared = [reference.preprocessor(image, mask) for image, mask in zip(images, masks, strict=True)]
    inputs = [torch.stack([getattr(p, name) for p in prepared]) for name in
              ("pixel_values", "object_pixel_values", "mask_grid")]
    few = [tensor[:4] for tensor in inputs]
    with torch.inference_mode():
        words32, tokens32 = (t.float().cpu() for t in reference._run(*few))
        words, tokens = (t.float().cpu() for t in fast._run(*few))
    threshold = 0.999 if low == torch.float16 else 0.99
    parity += [check(f"encoder torch {str(low)[6:]} words", min_cosine(words32, words), threshold),
               check(f"encoder torch {str(low)[6:]} local tokens", min_cosine(tokens32, tokens), threshold)]
    for batch in batches:
        batch_inputs = [tensor[:batch].to(device) for tensor in inputs]
        with torch.inference_mode():
            seconds = timed(lambda: fast._run(*batch_inputs), device, reps)  # noqa: B023
        timings["torch"][str(batch)] = round(seconds / batch * 1000, 3)
        print(f"  encode torch {str(low)[6:]} b{batch}: {seconds / batch * 1000:.3f} ms/concept", flush=True)
    with torch.inference_mode():
        full = timed(lambda: fast.encode(images, masks), device, max(1, reps // 2))
    timings["torch_with_preprocessing_ms_per_concept"] = round(full / len(images) * 1000, 3)

    reason = onnx_unavailable(device)
    if not reason:
        try:
            parity += onnx_part(reference, words32, tokens32, inputs, device, batches, reps, scratch, timings)
        except (ImportError, EliteError) as err:  # a provider that does not start, a failed export
            reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    if reason:
        timings["onnxruntime"] = {"skipped": reason}
        print(f"  encode onnxruntime: skipped ({reason})", flush=True)
    return parity, timings


def onnx_part(reference: TorchConceptEncoder, words32: torch.Tensor, tokens32: torch.Tensor,
              inputs: list[torch.Tensor], device: torch.device, batches: list[int], reps: int, scratch: Path,
              timings: dict[str, Any]) -> list[dict[str, Any]]:
    """The encoder exported (fp16 for CUDA, fp32 for the CPU) and run by ONNX Runtime: parity and timings."""
    from elite.model.onnx_encoder import OnnxConceptEncoder
    from elite.model.onnx_export import export_concept_encoder

    precision = "fp16" if device.type == "cuda" else "fp32"
    onnx_path = scratch / f"encoder-{precision}.onnx"
    start = time.perf_counter()
    export_concept_encoder(reference.module.cpu(), onnx_path, precision)  # type: ignore[arg-type]
    timings["onnx_export_s"] = round(time.perf_counter() - start, 1)
    ort_encoder = OnnxConceptEncoder(onnx_path, device=str(device), strict_device=device.type == "cuda")
    timings["onnxruntime_provider"] = ort_encoder.provider
    arrays = [tensor.numpy() for tensor in inputs]
    ort_words, ort_tokens = ort_encoder.run(*(array[:4] for array in arrays))
    threshold = 0.99 if precision == "fp16" else 0.9999
    parity = [check(f"encoder onnxruntime {precision} words", min_cosine(words32, torch.from_numpy(
                  ort_words.astype(np.float32))), threshold),
              check(f"encoder onnxruntime {precision} local tokens", min_cosine(tokens32, torch.from_numpy(
                  ort_tokens.astype(np.float32))), threshold)]
    for batch in batches:
        batch_arrays = [array[:batch] for array in arrays]
        seconds = timed(lambda: ort_encoder.run(*batch_arrays), device, reps)  # noqa: B023 (run() returns on host)
        timings["onnxruntime"][str(batch)] = round(seconds / batch * 1000, 3)
        print(f"  encode onnxruntime {precision} b{batch}: {seconds / batch * 1000:.3f} ms/concept", flush=True)
    return parity


def onnx_unavailable(device: torch.device) -> str | None:
    """Why the ONNX Runtime part cannot run on `device`, or None."""
    try:
        import onnx  # noqa: F401  (the export)
        import onnxruntime as ort
    except ImportError as err:
        return f"{err.name} is not installed (the onnx extra, or onnx-gpu on CUDA hosts)"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime has no CUDA provider ({ort.get_available_providers()}): install onnxruntime-gpu"
    return None


def generation_part(paths: TinyModels, device: torch.device, low: torch.dtype, batches: list[int], size: int,
                    steps: int, parity_steps: int, reps: int, channels_last: bool,
                    compile_backend: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from diffusers import StableDiffusionPipeline

    reference = ElitePipeline.from_pretrained(paths.pretrained_model, paths.vision_model, paths.global_mapper,
                                              paths.local_mapper, torch_dtype=torch.float32, device=device)
    images, masks = concept_images(max(*batches, 2))
    concepts = reference.encode_concepts(images, masks)
    common = {"height": size, "width": size, "show_progress": False}
    latents32 = reference(PROMPT_ELITE, concepts[:2], seed=[0, 1], num_inference_steps=parity_steps,
                          output_type="latent", **common).images
    del reference
    pipe = ElitePipeline.from_pretrained(paths.pretrained_model, paths.vision_model, paths.global_mapper,
                                         paths.local_mapper, torch_dtype=low, device=device)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    latents = pipe(PROMPT_ELITE, concepts[:2], seed=[0, 1], num_inference_steps=parity_steps, output_type="latent",
                   **common).images
    parity = [check(f"generation {str(low)[6:]} latents after {parity_steps} steps",
                    min_cosine(latents32.float().cpu(), latents.float().cpu()), 0.99)]
    with warnings.catch_warnings():  # diffusers asks for steps_offset 1, which LMS's linspace spacing ignores
        warnings.simplefilter("ignore", FutureWarning)
        plain = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                        unet=pipe.unet, scheduler=REFERENCE.scheduler(), safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    timings: dict[str, Any] = {"elite": {}, "plain": {}, "overhead_pct": {}}
    for batch in batches:
        def elite_call(n: int = batch) -> Any:
            return pipe(PROMPT_ELITE, concepts[:n], seed=list(range(n)), num_inference_steps=steps,
                        output_type="np", **common)

        def plain_call(n: int = batch) -> Any:
            generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
            return plain([PROMPT_PLAIN] * n, height=size, width=size, num_inference_steps=steps,
                         guidance_scale=REFERENCE.guidance_scale, negative_prompt=[""] * n, generator=generators,
                         output_type="np")

        elite_s, plain_s = timed(elite_call, device, reps) / batch, timed(plain_call, device, reps) / batch
        overhead = (elite_s / plain_s - 1) * 100
        timings["elite"][str(batch)], timings["plain"][str(batch)] = round(elite_s, 4), round(plain_s, 4)
        timings["overhead_pct"][str(batch)] = round(overhead, 1)
        print(f"  generate b{batch}: ElitePipeline {elite_s:.4f} s/image, StableDiffusionPipeline {plain_s:.4f} "
              f"s/image, overhead {overhead:+.1f}%", flush=True)
    if compile_backend:  # after the plain timings: the compiled UNet is shared with StableDiffusionPipeline
        pipe.optimize(compile_backend=compile_backend)
        timings["elite_compiled"] = {}
        for batch in batches:
            start = time.perf_counter()
            pipe(PROMPT_ELITE, concepts[:batch], seed=list(range(batch)), num_inference_steps=2, **common)
            timings.setdefault("compile_s", {})[str(batch)] = round(time.perf_counter() - start, 1)
            seconds = timed(lambda n=batch: pipe(PROMPT_ELITE, concepts[:n], seed=list(range(n)),
                                                 num_inference_steps=steps, output_type="np", **common),
                            device, reps, warmup=0) / batch
            timings["elite_compiled"][str(batch)] = round(seconds, 4)
            print(f"  generate b{batch}: ElitePipeline compiled ({compile_backend}) {seconds:.4f} s/image", flush=True)
    if device.type == "cuda":
        timings["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return parity, timings


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny models on the CPU (what CI runs)")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu (--small: cpu)")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json when OUT is set)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per case (default 3; --small 1)")
    parser.add_argument("--no-channels-last", action="store_true", help="keep the UNet and VAE in NCHW")
    parser.add_argument("--encode-batches", type=int, nargs="+", default=None, help="default 1 8 32 (--small: 1 4)")
    parser.add_argument("--generate-batches", type=int, nargs="+", default=None, help="default 1 8 (--small: 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed sampler steps (default 50; --small 4)")
    parser.add_argument("--parity-steps", type=int, default=None, help="sampler steps of the parity check "
                        "(default 10; --small 3)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 512; --small 64)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="also time generation with the UNet compiled (inductor unless named; minutes on a GPU)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (run with --small on the CPU)", file=sys.stderr)
        return 2
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    reps = args.reps or (1 if args.small else 3)
    setting = {"small": args.small, "device": str(device), "low_dtype": str(low)[6:], "reps": reps,
               "channels_last": not args.no_channels_last, "compile": args.compile,
               "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    print(f"gpu_check: {setting}", flush=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        start = time.perf_counter()
        paths = make_tiny_models(scratch / "models") if args.small else make_real_size_models(scratch / "models")
        setting["build_s"] = round(time.perf_counter() - start, 1)
        enc_batches = args.encode_batches or ([1, 4] if args.small else [1, 8, 32])
        gen_batches = args.generate_batches or ([1, 2] if args.small else [1, 8])
        parity, encoding = encoder_part(paths, device, low, enc_batches, reps, scratch)
        more, generation = generation_part(paths, device, low, gen_batches, args.size or (64 if args.small else 512),
                                           args.steps or (4 if args.small else 50),
                                           args.parity_steps or (3 if args.small else 10), reps,
                                           channels_last=not args.no_channels_last, compile_backend=args.compile)
    parity += more
    setting["wall_s"] = round(time.perf_counter() - started, 1)
    result = {"setting": setting, "parity": parity, "encoding_ms_per_concept": encoding,
              "generation_s_per_image": generation, "targets": TARGETS}
    print_table(result)
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {out}")
    return 0 if all(entry["ok"] for entry in parity) else 1


def print_table(result: dict[str, Any]) -> None:
    enc, gen, setting = result["encoding_ms_per_concept"], result["generation_s_per_image"], result["setting"]
    real = not setting["small"] and setting["device"].startswith("cuda")
    print(f"\n== gpu_check ({'real size' if not setting['small'] else 'tiny'}, {setting['device']}"
          f"{', ' + setting['card'] if setting['card'] else ''}, {setting['wall_s']} s)")
    print(f"{'what':<52}{'value':>14}  target")
    for entry in result["parity"]:
        print(f"{'parity ' + entry['name']:<52}{entry['value']:>14.6f}  >= {entry['threshold']} "
              f"{'ok' if entry['ok'] else 'FAILED'}")
    for engine in ("torch", "onnxruntime"):
        for batch, value in enc[engine].items():
            target = f"<= {TARGETS['encode_ms_per_concept_b32']}" if real and batch == "32" else ""
            print(f"{f'encode {engine} b{batch} (ms/concept)':<52}{value if batch != 'skipped' else '-':>14}  "
                  f"{target if batch != 'skipped' else value}")
    for batch in gen["elite"]:
        target = f"<= {TARGETS['generate_s_per_image_b8']}" if real and batch == "8" else ""
        print(f"{f'generate ElitePipeline b{batch} (s/image)':<52}{gen['elite'][batch]:>14}  {target}")
        print(f"{f'generate StableDiffusionPipeline b{batch}':<52}{gen['plain'][batch]:>14}")
        target = f"<= {TARGETS['injection_overhead_pct']}" if real else ""
        print(f"{f'local-injection overhead b{batch} (%)':<52}{gen['overhead_pct'][batch]:>14}  {target}")
        if batch in gen.get("elite_compiled", {}):
            print(f"{f'generate ElitePipeline compiled b{batch} (s/image)':<52}{gen['elite_compiled'][batch]:>14}")


if __name__ == "__main__":
    raise SystemExit(main())
