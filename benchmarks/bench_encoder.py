"""Concept encoder throughput at real ViT-L/14 size (torch, fp32, random weights): ms per concept.

The encoder is the library's own: `ConceptEncoderModule(CLIPVisionModel(ViT-L/14 config), GlobalMapper,
LocalMapper)` with release-size mappers (`MapperConfig()` defaults, SD 1.x cross-attention k/v copies
included), run through `TorchConceptEncoder.encode` on the release's test concepts (image + `_bg.png`
mask), so preprocessing (PIL resize, CLIP normalisation, mask grid) is inside the timing. One concept is
two vision-tower passes (the whole image and the object image) plus both mappers.

Weights are random: the time does not depend on their values. This is the torch baseline for the
ONNX export work.

    python benchmarks/bench_encoder.py                       # batch 1 and 8, about 1 min on 2 cores
    python benchmarks/bench_encoder.py --quick               # batch 1 and 2, 1 rep
    python benchmarks/bench_encoder.py --batch-sizes 1 4 8 16 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import announce, core_count, exact_command, gemm_probe, peak_rss_mib, rusage, save_results

from elite.data.sources import find_concepts
from elite.model.configs import CLIP_L14_VISION_CONFIG
from elite.model.encoder import ConceptEncoderModule, TorchConceptEncoder
from elite.model.mappers import GlobalMapper, LocalMapper, MapperConfig
from elite.model.preprocessing import open_image

CONCEPT_DIR = Path("/work/shared/data/elite-test-concepts")


def params_m(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per batch size (default: 5 for batch 1, 3 above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: core count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 2, one timed call each")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/encoder.json)")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.reps = [1, 2], 1
    return args


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads or core_count())
    t_start = time.perf_counter()
    info = announce()
    rss_start = peak_rss_mib()

    torch.manual_seed(args.seed)
    build_start = time.perf_counter()
    vision = CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_VISION_CONFIG))
    config = MapperConfig()  # release sizes: 1024 -> 1024 -> 768, SD 1.x cross-attention layers
    module = ConceptEncoderModule(vision, GlobalMapper(config), LocalMapper(config))
    encoder = TorchConceptEncoder(module)  # cpu, float32
    build_s = time.perf_counter() - build_start
    models = {"vision_params_M": params_m(vision), "global_mapper_params_M": params_m(module.global_mapper),
              "local_mapper_params_M": params_m(module.local_mapper), "total_params_M": params_m(module),
              "vision_config": CLIP_L14_VISION_CONFIG, "build_s": round(build_s, 1)}
    rss_models = peak_rss_mib()
    print(f"models: ViT-L/14 vision tower {models['vision_params_M']}M params + mappers "
          f"{models['global_mapper_params_M']}M + {models['local_mapper_params_M']}M (built in {build_s:.0f} s); "
          f"peak RSS {rss_models:.0f} MiB")

    sources = find_concepts(CONCEPT_DIR)
    images = [open_image(s.image) for s in sources]
    masks = [open_image(s.mask) if s.mask else None for s in sources]
    ids = [s.concept_id for s in sources]

    def batch_of(size: int, offset: int) -> tuple[list[Any], list[Any], list[str]]:
        picks = [(offset + i) % len(sources) for i in range(size)]
        return [images[i] for i in picks], [masks[i] for i in picks], [ids[i] for i in picks]

    # Preprocessing alone (PIL + numpy), for reference: it is part of every encode() below.
    prep_start = time.perf_counter()
    for image, mask, cid in zip(images, masks, ids, strict=True):
        encoder.preprocessor(image, mask, name=cid)
    prep_ms = 1000 * (time.perf_counter() - prep_start) / len(images)
    print(f"preprocessing alone: {prep_ms:.1f} ms/concept ({len(images)} concepts)")

    results: dict[str, Any] = {}
    offset = 0
    for size in args.batch_sizes:
        reps = args.reps or (5 if size == 1 else 3)
        warm_images, warm_masks, warm_ids = batch_of(size, offset)
        warm_start = time.perf_counter()
        encoded = encoder.encode(warm_images, warm_masks, warm_ids)  # warm-up at this batch shape
        warm_s = time.perf_counter() - warm_start
        assert len(encoded) == size and encoded[0].words.shape == (5, 768)
        assert encoded[0].local_tokens.shape == (256, 768)
        offset += size
        seconds, probes, sys_s, faults = [], [], [], []
        for rep in range(reps):
            batch_images, batch_masks, batch_ids = batch_of(size, offset)
            offset += size
            probes.append(gemm_probe())
            _, sys0, faults0 = rusage()
            start = time.perf_counter()
            encoder.encode(batch_images, batch_masks, batch_ids)
            seconds.append(time.perf_counter() - start)
            _, sys1, faults1 = rusage()
            sys_s.append(sys1 - sys0)
            faults.append(faults1 - faults0)
            print(f"  batch {size} rep {rep + 1}/{reps}: {seconds[-1]:.2f} s = "
                  f"{1000 * seconds[-1] / size:.0f} ms/concept (system time {sys_s[-1]:.2f} s, "
                  f"{faults[-1]} minor page faults; GEMM probe before: {probes[-1]:.0f} GFLOP/s)", flush=True)
        median = statistics.median(seconds)
        results[str(size)] = {
            "reps": reps, "seconds": [round(s, 3) for s in seconds],
            "gemm_probe_gflops": [round(p, 1) for p in probes],
            "system_s": [round(x, 3) for x in sys_s], "minor_page_faults": faults, "warmup_s": round(warm_s, 3),
            "median_s": round(median, 3), "ms_per_concept": round(1000 * median / size, 1),
            "ms_per_concept_best": round(1000 * min(seconds) / size, 1),
            "concepts_per_s": round(size / median, 3), "peak_rss_mib_after": round(peak_rss_mib(), 1),
        }

    print()
    print(f"{'batch':>5} {'ms/concept':>11} {'concepts/s':>11} {'best ms/concept':>16} {'peak RSS MiB':>13}")
    for size, r in results.items():
        print(f"{size:>5} {r['ms_per_concept']:>11.0f} {r['concepts_per_s']:>11.3f} {r['ms_per_concept_best']:>16.0f} "
              f"{r['peak_rss_mib_after']:>13.0f}")
    payload: dict[str, Any] = {
        "benchmark": "encoder", "command": exact_command(), "machine": info,
        "settings": {"batch_sizes": args.batch_sizes, "dtype": "float32", "device": "cpu",
                     "concepts": str(CONCEPT_DIR), "weights": "random"},
        "models": models, "preprocessing_ms_per_concept": round(prep_ms, 2), "results": results,
        "peak_rss_mib": {"at_start": round(rss_start, 1), "after_model_build": round(rss_models, 1),
                         "at_end": round(peak_rss_mib(), 1)},
        "script_wall_s": round(time.perf_counter() - t_start, 1),
    }
    path = save_results("encoder", payload, args.out)
    print(f"peak RSS {payload['peak_rss_mib']['at_end']:.0f} MiB; script wall time {payload['script_wall_s']:.0f} s; "
          f"saved {path}")


if __name__ == "__main__":
    main()
