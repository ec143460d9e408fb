"""Evaluation metric throughput (CLIP-T, CLIP-I, DINO-I) at the paper's model sizes (torch, fp32, random weights).

The metric models are the library's own, loaded the way `elite evaluate` loads them: `MetricModels.from_pretrained`
on two folders written here in the hub layouts, with random weights at real size:

- CLIP ViT-B/32 as openai/clip-vit-base-patch32 ships it: `CLIPModel` (vision: hidden 768, 12 layers, 12 heads,
  patch 32, 224 px; text: hidden 512, 12 layers, 8 heads, vocab 49408, 77 positions; projection 512), its
  `CLIPImageProcessor` (short side to 224 bicubic, centre crop 224, CLIP mean/std) and a tokenizer;
- DINO ViT-S/16 as facebook/dino-vits16 ships it: `ViTModel` without pooler (hidden 384, 12 layers, 6 heads,
  patch 16, 224 px) and its `ViTImageProcessor` (224x224 bilinear, ImageNet mean/std).

The tokenizer is the repo's small CLIP-style BPE (`elite.model.tiny.write_tokenizer_files`, 577 tokens) while the
text tower keeps CLIP's 49408-row embedding: the prompts here use only words it merges whole, so they tokenize to
as many tokens as with CLIP's own vocabulary (one per word plus start and end) and the text tower's time is the same.

One batch is what `elite.jobs.evaluate.evaluate_batch` scores in its model step: `image_features` over the batch's
generated images (512x512 RGB, as SD 1.x makes them) plus its concepts' source images (one by default: a real test
concept image), `text_features` over the batch's unique CLIP-T texts (two: a catalog run with two prompts), then
the per-image cosines. Reading and decoding the files, checksums and thumbnails are not timed (the job's "io").
Images/s counts generated images only. Each rep also times the parts on the same batch: the two image processors
(PIL resize, crop, normalise, as `MetricModels` calls them), the CLIP image tower, DINO, tokenization and the CLIP
text tower.

The machine may be shared: before each timed rep the script waits (up to --wait-idle seconds) for other processes
to go idle, and it records how many cores others used during the rep (from /proc/stat, as bench_ray.py does). The
figures are medians over the quiet reps (others under 0.3 cores; all reps if none was quiet, which the JSON's
`basis` says): two torch threads on two cores slow down several times when another process takes one core.

    python benchmarks/bench_evaluate.py                  # batch 1 and 32, about 3 min on 2 cores (quiet)
    python benchmarks/bench_evaluate.py --quick          # batch 1 and 32, 1 timed rep each
    python benchmarks/bench_evaluate.py --batch-sizes 1 8 32 64 --reps 3 --sources 2
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import announce, core_count, exact_command, gemm_probe, peak_rss_mib, rusage, save_results
from bench_orchestration import proc_stat, wait_for_idle

from elite.data.sources import find_concepts
from elite.evaluation.metrics import MetricModels, cosine
from elite.model.preprocessing import open_image, to_rgb
from elite.model.tiny import write_tokenizer_files

CONCEPT_DIR = Path("/work/shared/data/elite-test-concepts")
GENERATED_SIZE = 512  # SD 1.x output
# Two CLIP-T texts (the placeholder already replaced by the class word), words the small tokenizer merges whole.
TEXTS = ("a photo of a dog on the beach", "a painting of a dog in the snow")

# openai/clip-vit-base-patch32 config.json (the fields that shape the network).
CLIP_B32_TEXT_CONFIG: dict[str, Any] = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                                        "num_hidden_layers": 12, "num_attention_heads": 8,
                                        "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                                        "layer_norm_eps": 1e-5}
CLIP_B32_VISION_CONFIG: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                          "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
CLIP_B32_PROJECTION_DIM = 512
# facebook/dino-vits16 config.json.
DINO_S16_CONFIG: dict[str, Any] = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12,
                                   "num_attention_heads": 6, "image_size": 224, "patch_size": 16, "hidden_act": "gelu",
                                   "layer_norm_eps": 1e-12, "qkv_bias": True}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def params_m(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def build_models(out: Path, seed: int) -> tuple[Path, Path]:
    """The two metric models with random weights at real size, in the hub layouts."""
    clip_dir, dino_dir = out / "clip-vit-base-patch32", out / "dino-vits16"
    write_tokenizer_files(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    torch.manual_seed(seed)
    text_config = {**CLIP_B32_TEXT_CONFIG, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    CLIPModel(CLIPConfig(text_config=text_config, vision_config=CLIP_B32_VISION_CONFIG,
                         projection_dim=CLIP_B32_PROJECTION_DIM)).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                       resample=Image.Resampling.BICUBIC).save_pretrained(clip_dir)
    ViTModel(ViTConfig(**DINO_S16_CONFIG), add_pooling_layer=False).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=Image.Resampling.BILINEAR,
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def generated_images(count: int, seed: int) -> list[Image.Image]:
    """512x512 RGB images (uniform noise: the processors' and models' time does not depend on the pixels)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (GENERATED_SIZE, GENERATED_SIZE, 3), dtype=np.uint8), "RGB")
            for _ in range(count)]


def metric_step(models: MetricModels, generated: list[Image.Image], sources: list[Image.Image],
                texts: list[str]) -> list[tuple[float, float, float]]:
    """What evaluate_batch does once its images are read: one image_features call over generated + sources, one
    text_features call over the unique texts, then per-image cosines (image i: text i % len(texts), source
    i % len(sources))."""
    clip, dino = models.image_features(generated + sources)
    unique_texts = sorted(set(texts))
    text_features = models.text_features(unique_texts)
    row = {text: n for n, text in enumerate(unique_texts)}
    n_gen = len(generated)
    clip_t = cosine(clip[:n_gen], text_features[[row[texts[i % len(texts)]] for i in range(n_gen)]])
    scores = []
    for n in range(n_gen):
        at = n_gen + n % len(sources)
        scores.append((float(clip_t[n]), float(cosine(clip[n:n + 1], clip[at:at + 1])[0]),
                       float(cosine(dino[n:n + 1], dino[at:at + 1])[0])))
    return scores


def parts(models: MetricModels, images: list[Image.Image], texts: list[str]) -> dict[str, float]:
    """Seconds of each part of `metric_step`, one after the other, on the same inputs."""
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - start
        return result

    unique_texts = sorted(set(texts))
    with torch.inference_mode():
        # MetricModels._pixels is what image_features calls: convert("RGB") + the processor + .to(device, dtype)
        clip_pixels = timed("prep_clip", lambda: models._pixels(models.clip_processor, images))
        dino_pixels = timed("prep_dino", lambda: models._pixels(models.dino_processor, images))
        timed("clip_image", lambda: models.clip.get_image_features(pixel_values=clip_pixels))
        timed("dino", lambda: models.dino(pixel_values=dino_pixels).last_hidden_state[:, 0])
        tokens = timed("tokenize", lambda: models.tokenizer(unique_texts, padding=True, truncation=True,
                                                            return_tensors="pt").to(models.device))
        timed("clip_text", lambda: models.clip.get_text_features(**tokens))
    return seconds


QUIET_CORES = 0.3  # a rep counts as quiet when other processes used fewer cores than this (wait_for_idle's threshold)


def summarize(seconds: list[float], part_s: dict[str, list[float]], size: int, sources: int,
              keep: list[int]) -> dict[str, Any]:
    """Medians over the reps `keep`: the whole step, and its parts."""
    chosen = [seconds[i] for i in keep]
    median = statistics.median(chosen)
    part_ms = {name: round(1000 * statistics.median(values[i] for i in keep), 2) for name, values in part_s.items()}
    parts_sum = sum(part_ms.values())
    return {
        "reps_used": keep, "median_s": round(median, 4), "ms_per_batch": round(1000 * median, 1),
        "ms_per_batch_best": round(1000 * min(chosen), 1), "ms_per_image": round(1000 * median / size, 1),
        "images_per_s": round(size / median, 2), "images_per_s_best": round(size / min(chosen), 2),
        "parts_ms_per_batch": part_ms,
        "parts_ms_per_image_processed": {name: round(part_ms[name] / (size + sources), 2)
                                         for name in ("prep_clip", "prep_dino", "clip_image", "dino")},
        "parts_share": {name: round(value / parts_sum, 3) for name, value in part_ms.items()},
        "parts_sum_ms": round(parts_sum, 1),
    }


PART_LABELS = {"prep_clip": "CLIP preprocessing", "prep_dino": "DINO preprocessing", "clip_image": "CLIP image tower",
               "dino": "DINO ViT-S/16", "tokenize": "tokenization", "clip_text": "CLIP text tower"}


@torch.inference_mode()
def count_gflops(models: MetricModels, image: Image.Image, text: str) -> dict[str, float]:
    """Forward GFLOPs (torch's FLOP counter: matmuls and convolutions, 2 per multiply-add) of one image / text."""
    out: dict[str, float] = {}
    clip_pixels = models._pixels(models.clip_processor, [image])
    dino_pixels = models._pixels(models.dino_processor, [image])
    tokens = models.tokenizer([text], return_tensors="pt")
    for name, fn in (("clip_image", lambda: models.clip.get_image_features(pixel_values=clip_pixels)),
                     ("dino", lambda: models.dino(pixel_values=dino_pixels)),
                     ("clip_text", lambda: models.clip.get_text_features(**tokens))):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        out[name] = round(counter.get_total_flops() / 1e9, 3)
    out["text_tokens"] = int(tokens["input_ids"].shape[1])
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32],
                        help="generated images per batch (evaluate's default batch size is 32)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed reps per batch size (default: 10 for batch 1, 5 above)")
    parser.add_argument("--sources", type=int, default=1, help="source images per batch (the batch's concepts)")
    parser.add_argument("--texts", type=int, default=len(TEXTS), choices=range(1, len(TEXTS) + 1),
                        help="unique CLIP-T texts per batch (at most the batch size)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: core count)")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="before each timed rep, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one timed rep per batch size")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/evaluate.json)")
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    if min(args.batch_sizes) < 1 or args.sources < 1:
        parser.error("--batch-sizes and --sources must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads or core_count())
    t_start = time.perf_counter()
    info = announce()
    rss_start = peak_rss_mib()

    with tempfile.TemporaryDirectory(prefix="elite-bench-") as tmp:
        build_start = time.perf_counter()
        clip_dir, dino_dir = build_models(Path(tmp), args.seed)
        build_s = time.perf_counter() - build_start
        gc.collect()
        load_start = time.perf_counter()
        models = MetricModels.from_pretrained(str(clip_dir), str(dino_dir), device="cpu", dtype="float32")
        load_s = time.perf_counter() - load_start
    rss_models = peak_rss_mib()
    clip, dino = models.clip, models.dino
    model_facts: dict[str, Any] = {
        "clip_vision_params_M": params_m(clip.vision_model) + params_m(clip.visual_projection),
        "clip_text_params_M": params_m(clip.text_model) + params_m(clip.text_projection),
        "clip_params_M": params_m(clip), "dino_params_M": params_m(dino),
        "clip_text_config": CLIP_B32_TEXT_CONFIG, "clip_vision_config": CLIP_B32_VISION_CONFIG,
        "clip_projection_dim": CLIP_B32_PROJECTION_DIM, "dino_config": DINO_S16_CONFIG,
        "clip_processor": type(models.clip_processor).__name__, "dino_processor": type(models.dino_processor).__name__,
        "tokenizer": f"{type(models.tokenizer).__name__}, vocab {len(models.tokenizer)} (elite.model.tiny's small "
                     "BPE; the text tower has CLIP's 49408 rows)",
        "build_and_save_s": round(build_s, 1), "from_pretrained_s": round(load_s, 1),
    }
    print(f"models: CLIP ViT-B/32 {model_facts['clip_params_M']}M params (vision "
          f"{model_facts['clip_vision_params_M']}M, text {model_facts['clip_text_params_M']}M), DINO ViT-S/16 "
          f"{model_facts['dino_params_M']}M; processors {model_facts['clip_processor']}, "
          f"{model_facts['dino_processor']}; built and saved in {build_s:.0f} s, from_pretrained {load_s:.1f} s; "
          f"peak RSS {rss_models:.0f} MiB")

    concept_sources = find_concepts(CONCEPT_DIR)
    source_pool = [to_rgb(open_image(s.image)) for s in concept_sources]
    pool = generated_images(max(args.batch_sizes) * 2, args.seed)
    gflops = count_gflops(models, pool[0], TEXTS[0])
    print(f"forward GFLOPs: CLIP image {gflops['clip_image']}, DINO {gflops['dino']} per image; CLIP text "
          f"{gflops['clip_text']} per text ({gflops['text_tokens']} tokens)")

    results: dict[str, Any] = {}
    offset = 0

    def batch_of(size: int) -> tuple[list[Image.Image], list[Image.Image], list[str]]:
        nonlocal offset
        generated = [pool[(offset + i) % len(pool)] for i in range(size)]
        sources = [source_pool[(offset + i) % len(source_pool)] for i in range(args.sources)]
        texts = [TEXTS[i % min(args.texts, size)] for i in range(size)]
        offset += size
        return generated, sources, texts

    for size in args.batch_sizes:
        reps = args.reps or (10 if size == 1 else 5)
        generated, sources, texts = batch_of(size)
        warm_start = time.perf_counter()
        scores = metric_step(models, generated, sources, texts)  # warm-up at this batch shape
        parts(models, generated + sources, texts)
        warm_s = time.perf_counter() - warm_start
        assert len(scores) == size and all(-1.0 <= v <= 1.0 for row in scores for v in row)
        seconds, probes, sys_s, cpu_s, faults, others = [], [], [], [], [], []
        part_s: dict[str, list[float]] = {name: [] for name in PART_LABELS}
        for rep in range(reps):
            generated, sources, texts = batch_of(size)
            wait_for_idle(args.wait_idle)
            probes.append(gemm_probe())
            gc.collect()
            busy0, total0 = proc_stat()
            rep_start = time.perf_counter()
            user0, sys0, faults0 = rusage()
            start = time.perf_counter()
            metric_step(models, generated, sources, texts)
            seconds.append(time.perf_counter() - start)
            user1, sys1, faults1 = rusage()
            cpu_s.append(user1 - user0 + sys1 - sys0)
            sys_s.append(sys1 - sys0)
            faults.append(faults1 - faults0)
            for name, value in parts(models, generated + sources, texts).items():
                part_s[name].append(value)
            user2, sys2, _ = rusage()
            busy1, total1 = proc_stat()
            rep_s = time.perf_counter() - rep_start
            machine = (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1) * rep_s  # core-seconds
            others.append(max(0.0, machine - (user2 - user0 + sys2 - sys0)) / rep_s)
            split = ", ".join(f"{name} {1000 * values[-1]:.0f}" for name, values in part_s.items())
            print(f"  batch {size} rep {rep + 1}/{reps}: {1000 * seconds[-1]:.0f} ms = {size / seconds[-1]:.2f} "
                  f"images/s (cpu {cpu_s[-1]:.2f} s, system {sys_s[-1]:.2f} s, {faults[-1]} minor page faults; "
                  f"GEMM probe before: {probes[-1]:.0f} GFLOP/s); parts ms: {split}; other load {others[-1]:.2f} cores",
                  flush=True)
        quiet = [i for i, other in enumerate(others) if other < QUIET_CORES]
        headline = summarize(seconds, part_s, size, args.sources, quiet or list(range(reps)))
        results[str(size)] = {
            "generated_images": size, "source_images": args.sources, "unique_texts": len(set(texts)),
            "images_per_call": size + args.sources, "reps": reps, "seconds": [round(s, 4) for s in seconds],
            "cpu_seconds": [round(s, 3) for s in cpu_s], "system_s": [round(s, 3) for s in sys_s],
            "minor_page_faults": faults, "gemm_probe_gflops": [round(p, 1) for p in probes],
            "other_busy_cores": [round(x, 2) for x in others],
            "other_busy_cores_max": round(max(others), 2),
            "warmup_s": round(warm_s, 3),
            "basis": (f"the {len(quiet)} reps with other load < {QUIET_CORES} cores" if quiet
                      else f"all reps (none had other load < {QUIET_CORES} cores)"),
            **headline,
            "all_reps": summarize(seconds, part_s, size, args.sources, list(range(reps))),
            "parts_seconds": {name: [round(v, 4) for v in values] for name, values in part_s.items()},
            "peak_rss_mib_after": round(peak_rss_mib(), 1),
        }

    print()
    print(f"{'batch':>5} {'reps':>5} {'images/s':>9} {'ms/batch':>9} {'ms/image':>9} "
          + " ".join(f"{label:>19}" for label in PART_LABELS.values())
          + f" {'sum of parts':>13} {'peak RSS MiB':>13}")
    for size, r in results.items():
        split = " ".join(f"{r['parts_ms_per_batch'][name]:>10.1f} ({100 * r['parts_share'][name]:>4.1f}%)"
                         for name in PART_LABELS)
        print(f"{size:>5} {len(r['reps_used']):>2}/{r['reps']:<2} {r['images_per_s']:>9.2f} {r['ms_per_batch']:>9.1f} "
              f"{r['ms_per_image']:>9.1f} {split} {r['parts_sum_ms']:>13.1f} {r['peak_rss_mib_after']:>13.0f}")
    print("(medians over the reps in which other processes used < "
          f"{QUIET_CORES} cores, or over all reps if none did; parts: ms per batch and share of their sum)")
    payload: dict[str, Any] = {
        "benchmark": "evaluate", "command": exact_command(), "machine": info,
        "settings": {"batch_sizes": args.batch_sizes, "sources_per_batch": args.sources,
                     "unique_texts_per_batch": args.texts, "texts": list(TEXTS[:args.texts]),
                     "generated_size": GENERATED_SIZE, "dtype": "float32", "device": "cpu",
                     "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
                     "sources": str(CONCEPT_DIR), "weights": "random", "seed": args.seed},
        "models": model_facts, "forward_gflops": gflops, "results": results,
        "peak_rss_mib": {"at_start": round(rss_start, 1), "after_model_load": round(rss_models, 1),
                         "at_end": round(peak_rss_mib(), 1)},
        "script_wall_s": round(time.perf_counter() - t_start, 1),
    }
    path = save_results("evaluate", payload, args.out)
    print(f"peak RSS {payload['peak_rss_mib']['at_end']:.0f} MiB; script wall time {payload['script_wall_s']:.0f} s; "
          f"saved {path}")


if __name__ == "__main__":
    main()
