"""Micro-benchmark of one cross-attention layer: where the ELITE processor's extra time goes.

For layer shapes of the mid-size UNet used by bench_generation.py (8 heads; 8 UNet rows per call = batch 4
with classifier-free guidance, the local branch on the 4 conditional rows), time one call of:

  default   diffusers' AttnProcessor2_0 (what plain Stable Diffusion runs)
  elite-g   elite.model.attention.EliteAttnProcessor with global k/v copies only (no local branch)
  elite     EliteAttnProcessor with the local branch (256 local tokens, one placeholder slot)
  release   the release-style processor of bench_generation.py, called once per row as the release calls
            the UNet: 4 conditional rows with the local branch, 4 unconditional rows without

and the pieces of the local branch: the global SDPA, the attention map A (explicit q k^T, softmax,
gather), the local SDPA over the 256 local tokens.

    python benchmarks/bench_attention.py              # ~20 s
    python benchmarks/bench_attention.py --reps 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import core_count, exact_command, gemm_probe, machine_info, save_results
from bench_generation import ReleaseContext, ReleaseCrossAttnProcessor

from elite.model.attention import EliteAttnProcessor, LocalInjection

# (inner width, queries): the mid-size UNet's cross-attention layers at 32x32 latents
SHAPES = ((128, 1024), (256, 256), (256, 64))
HEADS, ROWS, INJECTED, CONTEXT, PATCHES, TEXT_DIM, PLACEHOLDER = 8, 8, 4, 77, 256, 768, 5


def bench(fn: Any, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def measure(inner: int, queries: int, reps: int) -> dict[str, float]:
    head_dim = inner // HEADS
    attn = Attention(inner, cross_attention_dim=TEXT_DIM, heads=HEADS, dim_head=head_dim).eval()
    hidden = torch.randn(ROWS, queries, inner)
    context = torch.randn(ROWS, CONTEXT, TEXT_DIM)
    linear = lambda: torch.nn.Linear(TEXT_DIM, inner, bias=False)  # noqa: E731
    to_k, to_v, to_k_local, to_v_local = linear(), linear(), linear(), linear()
    local_tokens = torch.randn(INJECTED, 1, PATCHES, TEXT_DIM)
    injection = LocalInjection(torch.arange(ROWS - INJECTED, ROWS), local_tokens,
                               torch.full((INJECTED, 1), PLACEHOLDER), torch.full((INJECTED, 1), 0.8))
    default = AttnProcessor2_0()
    elite_global = EliteAttnProcessor(to_k, to_v)
    elite = EliteAttnProcessor(to_k, to_v, to_k_local, to_v_local, injection)
    ctx = ReleaseContext()
    release = ReleaseCrossAttnProcessor(to_k, to_v, to_k_local, to_v_local, ctx)

    def release_rows() -> None:  # the release: one image per call, conditional (local) and unconditional
        for row in range(ROWS):
            cond = row >= ROWS - INJECTED
            ctx.local = local_tokens[row - (ROWS - INJECTED), 0][None] if cond else None
            ctx.local_index = torch.tensor([PLACEHOLDER]) if cond else None
            ctx.llambda = 0.8
            release(attn, hidden[row:row + 1], context[row:row + 1])

    query = attn.to_q(hidden).view(ROWS, -1, HEADS, head_dim).transpose(1, 2)
    key = to_k(context).view(ROWS, -1, HEADS, head_dim).transpose(1, 2)
    value = to_v(context).view(ROWS, -1, HEADS, head_dim).transpose(1, 2)
    key_local, value_local = elite._local_key_value(HEADS, head_dim, query.dtype)
    rows = injection.rows
    index = injection.placeholder_index[:, None, None, :].expand(-1, HEADS, queries, -1)

    def attention_map() -> torch.Tensor:
        scores = query[rows] @ key[rows].transpose(-1, -2) * attn.scale
        return scores.softmax(dim=-1).gather(-1, index)

    return {
        "default_ms": bench(lambda: default(attn, hidden, context), reps),
        "elite_global_only_ms": bench(lambda: elite_global(attn, hidden, context), reps),
        "elite_ms": bench(lambda: elite(attn, hidden, context), reps),
        "release_8_calls_of_1_row_ms": bench(release_rows, reps),
        "piece_global_sdpa_ms": bench(lambda: F.scaled_dot_product_attention(query, key, value), reps),
        "piece_local_term_ms": bench(lambda: elite._local_term(attn, query, key), reps),
        "piece_local_sdpa_ms": bench(lambda: F.scaled_dot_product_attention(query[rows], key_local, value_local,
                                                                            scale=attn.scale), reps),
        "piece_attention_map_ms": bench(attention_map, reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or core_count())
    torch.manual_seed(0)
    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']}; {info['date']}")
    print(f"one cross-attention call, {ROWS} rows ({INJECTED} with the local branch), {HEADS} heads, "
          f"{CONTEXT} context tokens, {PATCHES} local tokens; median of {args.reps}, ms")
    results = {}
    for inner, queries in SHAPES:
        probe = gemm_probe()
        r = measure(inner, queries, args.reps)
        r["gemm_probe_gflops"] = probe
        results[f"inner{inner}_queries{queries}"] = {k: round(v, 3) for k, v in r.items()}
        print(f"inner {inner:>4}, queries {queries:>5}: default {r['default_ms']:6.2f} | elite global-only "
              f"{r['elite_global_only_ms']:6.2f} | elite {r['elite_ms']:6.2f} | release 8x1 row "
              f"{r['release_8_calls_of_1_row_ms']:6.2f} || global SDPA {r['piece_global_sdpa_ms']:5.2f}, local term "
              f"{r['piece_local_term_ms']:5.2f} (local SDPA {r['piece_local_sdpa_ms']:5.2f}, A map "
              f"{r['piece_attention_map_ms']:5.2f}); GEMM probe {probe:.0f} GFLOP/s", flush=True)
    payload = {"benchmark": "attention", "command": exact_command(), "machine": info,
               "settings": {"rows": ROWS, "injected_rows": INJECTED, "heads": HEADS, "context": CONTEXT,
                            "local_tokens": PATCHES, "reps": args.reps, "dtype": "float32"},
               "results": results}
    print(f"saved {save_results('attention', payload, args.out)}")


if __name__ == "__main__":
    main()
