"""Training the mapping networks: seconds per micro-step, forward-only seconds, peak memory, real-size memory.

What one micro-step is here: `elite.training.trainer.training_loss` (VAE encode, CLIP features, the mapper, the
text encoder with the words injected, the UNet with the ELITE processors, the loss), `loss.backward()`, gradient
clipping at 1.0 and an AdamW step (weight decay 1e-2) over the trained mapper's parameters: what `train` does per
micro-batch with accumulation 1 and one process, without accelerate's wrappers, data loading and checkpoints. The
frozen models come from `load_frozen` and the mappers from `_mappers`, as in `train`. The forward-only pass is the
same `training_loss` under `torch.no_grad()`. Data preparation (ConceptDataset + collate on the release's test
concepts) is timed on its own: `train` does it in the same process between steps.

Configs (random weights, real on-disk layouts, loaded through `load_frozen`):
  tiny  `elite.model.tiny.make_tiny_models`, 64x64 images.
  mid   bench_generation's `build_models`: SD 1.4 block types and 16 cross-attention layers with UNet channels
        128/256/256/256, 2 layers per block; the real CLIP text tower size (12 layers, hidden 768); VAE channels
        32/64/128/128; a CLIP vision tower of 16 layers, hidden 512; 256x256 images (32x32 latents).
  real  SD 1.4 UNet, SD 1.4 VAE, CLIP ViT-L/14 text and vision towers at full size (built in the case's process,
        not saved), 512x512 images; batch 1 only by default (a step takes 25-30 s on 2 cores).

Every (config, stage, batch, checkpointing) case runs in its own process; its peak memory is that process's peak
RSS (VmHWM in /proc/self/status; not ru_maxrss, which Linux carries over fork and execve from the parent) read
after loading, after the forward-only calls and again after the training steps (the forward-only calls come first,
so the second figure is theirs alone). Each case also counts the bytes of live torch
tensors through one extra training step (a TorchDispatchMode that registers every new storage and a weak-reference
callback when it is freed; parameters, buffers and optimizer states are registered at the start), which is what a
GPU's allocator would have to hold, without the allocator's caching and fragmentation.

Real-size memory is then worked out without running the real models on a GPU (none was lent): the same tensor
count runs the real-size training step under torch's FakeTensorMode (tensors with shapes and dtypes, no data, no
compute), two steps, the second counted (optimizer states exist by then), for both stages, fp32 or bf16 frozen
models (autocast, the trainable mapper in fp32, as accelerate's mixed precision), with and without the UNet's
gradient checkpointing, batch 1, 2 and 4. The script then adds up weights, gradients and optimizer states on paper
for AdamW (fp32 states: 16 bytes per trained parameter with weight and gradient) and 8-bit Adam (weight 4 + grad 4
+ 2 bytes of states).

Gradient checkpointing: without `hold`, `training_loss` leaves `elite_attention` before it returns, so `backward()`
would recompute checkpointed UNet blocks with diffusers' own processors; torch's checkpoint notices (a different
number of saved tensors) and raises. The trainer therefore passes `hold` (an ExitStack closed after the backward),
and so do the checkpointed cases here; the tiny cases record the error without it and check that the gradients
with checkpointing equal those without.

    python benchmarks/bench_train.py            # tiny, mid and real; about 17 min on 2 cores
    python benchmarks/bench_train.py --quick    # tiny only, 1 rep, fake real-size counts at batch 1: ~3 min
    python benchmarks/bench_train.py --configs tiny mid --batch-sizes 1 2 4 --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import announce, core_count, exact_command, gemm_probe, rusage, save_results

from elite.data.sources import list_concepts
from elite.data.storage import open_store
from elite.jobs.common import Locations
from elite.model.configs import CLIP_L14_TEXT_CONFIG, CLIP_L14_VISION_CONFIG, SD14_UNET_CONFIG, SD14_VAE_CONFIG
from elite.model.mappers import GlobalMapper, LocalMapper
from elite.training.data import ConceptDataset, collate
from elite.training.models import FrozenModels, load_frozen, load_mappers, new_mapper
from elite.training.settings import TrainSettings
from elite.training.trainer import sample_generators, training_loss

CONCEPT_DIR = Path("/work/shared/data/elite-test-concepts")
MiB = 2**20
GiB = 2**30
RELEASE_MAPPER_PARAMS = 48_074_240  # method doc: each mapper file
# CompVis/stable-diffusion-v1-4 vae/config.json (the fields that shape the network)
# the mid config: bench_generation.build_models' arguments
MID_ARGS: dict[str, Any] = {"model_seed": 0, "size": 256, "unet_channels": (128, 256, 256, 256), "unet_layers": 2,
                            "text_layers": 12, "vae_channels": (32, 64, 128, 128), "vision_dim": 512}
RESOLUTION = {"tiny": 64, "mid": MID_ARGS["size"], "real": 512}
GPUS_GIB = {"24 GiB (RTX 4090 / A10G class)": 24, "80 GiB (A100 / H100 80GB)": 80}
GPU_RESERVE_GIB = 1.0  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack: not counted by the tensor count


# --------------------------------------------------------------------------------------------------
# Counting live tensor bytes
# --------------------------------------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages: every storage an op returns is counted once, until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size

    def add_all(self, *objects: Any) -> None:
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for tensor in (*obj.parameters(), *obj.buffers()):
                    self.add(tensor)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            self.add(value)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.add, result)
        return result


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def build_saved_models(config: str, folder: Path) -> dict[str, Any]:
    """tiny or mid models written to `folder` in the real layouts; what a case needs to load them."""
    if config == "tiny":
        from elite.model.tiny import make_tiny_models

        tiny = make_tiny_models(folder)
        return {"pretrained_model": str(tiny.pretrained_model), "vision_model": str(tiny.vision_model),
                "global_mapper": str(tiny.global_mapper), "facts": {"builder": "elite.model.tiny.make_tiny_models"}}
    from bench_generation import build_models

    paths, facts = build_models(folder, argparse.Namespace(**MID_ARGS))
    facts = {"builder": "bench_generation.build_models",
             "arguments": {k: list(v) if isinstance(v, tuple) else v for k, v in MID_ARGS.items()}, **facts}
    return {"pretrained_model": str(paths.pretrained_model), "vision_model": str(paths.vision_model),
            "global_mapper": str(paths.global_mapper), "facts": facts}


def build_real() -> FrozenModels:
    """SD 1.4 UNet + VAE, CLIP ViT-L/14 text and vision towers at full size, random weights (in whatever tensor
    mode is active: real or fake); a small byte-level BPE tokenizer (ids below the real vocab size)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

    from elite.model.tiny import write_tokenizer_files

    with tempfile.TemporaryDirectory() as scratch:
        write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT_CONFIG, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    frozen = FrozenModels(AutoencoderKL(**SD14_VAE_CONFIG), UNet2DConditionModel(**SD14_UNET_CONFIG), text_encoder,
                          tokenizer, CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_VISION_CONFIG)),
                          DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000))
    for module in (frozen.vae, frozen.unet, frozen.text_encoder, frozen.vision):
        module.requires_grad_(False).eval()
    return frozen


def load_case_models(spec: dict[str, Any]) -> tuple[FrozenModels, GlobalMapper, LocalMapper | None]:
    stage = spec["stage"]
    if spec["config"] == "real":
        frozen = build_real()
        torch.manual_seed(0)
        glob = new_mapper(GlobalMapper, frozen)
        local = None
        if stage == "local":
            glob.requires_grad_(False).eval()
            local = new_mapper(LocalMapper, frozen)
        return frozen, glob, local  # type: ignore[return-value]
    settings = TrainSettings(stage, spec["pretrained_model"], spec["vision_model"], output_dir="unused",
                             global_mapper=spec["global_mapper"] if stage == "local" else None,
                             resolution=spec["resolution"])
    frozen = load_frozen(settings)
    torch.manual_seed(0)  # train() seeds before making the mappers too
    glob, local = load_mappers(settings, frozen)
    return frozen, glob, local


def proc_status_mib(field: str) -> float:
    """VmHWM (peak RSS) or VmRSS of this process from /proc/self/status. Not ru_maxrss: Linux keeps that across
    fork and execve, so a case process would report its parent's peak when that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def param_count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def model_params(frozen: FrozenModels, glob: GlobalMapper, local: LocalMapper | None) -> dict[str, int]:
    return {"unet": param_count(frozen.unet), "vae": param_count(frozen.vae),
            "text_encoder": param_count(frozen.text_encoder), "vision": param_count(frozen.vision),
            "global_mapper": param_count(glob), "local_mapper": param_count(local),
            "trained": param_count(glob if local is None else local)}


def concept_batch(stage: str, resolution: int, batch: int) -> tuple[dict[str, Any], float]:
    """A micro-batch of the release's test concepts through ConceptDataset + collate, and the seconds it took
    (median of 3, different augmentations)."""
    store = open_store(CONCEPT_DIR)
    dataset = ConceptDataset(list_concepts(store), Locations(store), stage, resolution=resolution)  # type: ignore[arg-type]
    seconds, result = [], None
    for epoch in range(3):
        start = time.perf_counter()
        result = collate([dataset[(epoch, i % len(dataset))] for i in range(batch)])
        seconds.append(time.perf_counter() - start)
    assert result is not None
    return result, statistics.median(seconds)


# --------------------------------------------------------------------------------------------------
# One case (in its own process)
# --------------------------------------------------------------------------------------------------

class Step:
    """training_loss + backward + clipping + AdamW, or training_loss alone under no_grad."""

    def __init__(self, stage: str, frozen: FrozenModels, glob: GlobalMapper, local: LocalMapper | None,
                 batch: dict[str, Any], checkpointing: bool, autocast: torch.dtype | None = None) -> None:
        self.stage, self.frozen, self.glob, self.local, self.batch = stage, frozen, glob, local, batch
        self.trained: torch.nn.Module = glob if local is None else local
        self.trained.train()
        self.optimizer = torch.optim.AdamW(self.trained.parameters(), lr=1e-5, weight_decay=1e-2)
        self.checkpointing, self.autocast = checkpointing, autocast
        if checkpointing:
            frozen.unet.enable_gradient_checkpointing()

    def loss(self, seed: int, hold: contextlib.ExitStack | None = None) -> torch.Tensor:
        generators = sample_generators(seed, 0, 0, len(self.batch["prompts"]), fixed=False)
        context = torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with context:
            return training_loss(self.stage, self.frozen, self.glob, self.local, self.batch, generators,  # type: ignore[arg-type]
                                 hold=hold)

    def forward(self, seed: int) -> float:
        with torch.no_grad():
            return float(self.loss(seed))

    def backward(self, seed: int, hold: bool) -> torch.Tensor:
        """The loss's gradients into the trained mapper, the ELITE processors held until after the backward or
        (hold False) restored before it, as `training_loss` does."""
        with contextlib.ExitStack() as held:
            loss = self.loss(seed, held if hold else None)
            loss.backward()
        return loss.detach()

    def train(self, seed: int, counter: LiveTensorBytes | None = None) -> dict[str, float]:
        marks: dict[str, float] = {}
        with contextlib.ExitStack() as held:
            loss = self.loss(seed, held if self.checkpointing else None)
            if counter is not None:
                marks["after_forward"] = counter.current
            loss.backward()
        if counter is not None:
            marks["after_backward"] = counter.current
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not isinstance(loss, FakeTensor):  # a fake tensor has no value
            marks["loss"] = float(loss.detach())
        return marks

    def counted_train(self, seed: int) -> dict[str, float]:
        """One training step with the live tensor bytes counted (weights and optimizer states registered)."""
        gc.collect()
        counter = LiveTensorBytes()
        counter.add_all(self.frozen.vae, self.frozen.unet, self.frozen.text_encoder, self.frozen.vision,
                        *(m for m in (self.glob, self.local) if m is not None), self.optimizer)
        start = counter.current
        with counter:
            marks = self.train(seed, counter)
        opt_state = sum(v.untyped_storage().nbytes() for s in self.optimizer.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor) and v.ndim > 0)
        weights = start - opt_state
        return {"weights_mib": weights / MiB, "optimizer_states_mib": opt_state / MiB,
                "start_mib": start / MiB, "after_forward_above_start_mib": (marks["after_forward"] - start) / MiB,
                "after_backward_above_start_mib": (marks["after_backward"] - start) / MiB,
                "peak_above_start_mib": (counter.peak - start) / MiB, "peak_mib": counter.peak / MiB}


def timed_calls(fn: Callable[[int], Any], reps: int, seed0: int) -> dict[str, Any]:
    seconds, cpu, probes = [], [], []
    for rep in range(reps):
        probes.append(gemm_probe())
        gc.collect()
        user0, sys0, _ = rusage()
        start = time.perf_counter()
        fn(seed0 + rep)
        seconds.append(time.perf_counter() - start)
        user1, sys1, _ = rusage()
        cpu.append(user1 - user0 + sys1 - sys0)
    return {"seconds": [round(s, 4) for s in seconds], "median_s": round(statistics.median(seconds), 4),
            "min_s": round(min(seconds), 4), "cpu_seconds": [round(c, 2) for c in cpu],
            "gemm_probe_gflops": [round(p, 1) for p in probes]}


def checkpointing_checks(step: Step) -> dict[str, Any]:
    """Tiny config: what enabling checkpointing does to `training_loss` as it is, and whether the held
    processors give the gradients of the run without checkpointing."""
    out: dict[str, Any] = {}
    step.frozen.unet.disable_gradient_checkpointing()
    step.optimizer.zero_grad(set_to_none=True)
    step.backward(7, hold=False)
    reference = [p.grad.clone() for p in step.trained.parameters() if p.grad is not None]
    step.optimizer.zero_grad(set_to_none=True)
    step.frozen.unet.enable_gradient_checkpointing()
    try:
        step.backward(7, hold=False)  # as the trainer would: processors restored before backward
        out["as_is"] = "no error"
        as_is = [p.grad.clone() for p in step.trained.parameters() if p.grad is not None]
        out["as_is_max_abs_grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(as_is, reference, strict=True))
    except Exception as err:  # the point: record what happens
        out["as_is"] = f"{type(err).__name__}: {str(err).splitlines()[0]} {str(err).splitlines()[1:3]}"
    step.optimizer.zero_grad(set_to_none=True)
    step.backward(7, hold=True)
    held = [p.grad.clone() for p in step.trained.parameters() if p.grad is not None]
    out["held_max_abs_grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(held, reference, strict=True))
    out["held_max_abs_grad"] = max(float(r.abs().max()) for r in reference)
    step.optimizer.zero_grad(set_to_none=True)
    step.frozen.unet.enable_gradient_checkpointing()
    return out


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "fake":
        return run_fake_case(spec)
    rss_imports = proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    frozen, glob, local = load_case_models(spec)
    load_s = time.perf_counter() - t0
    batch, data_s = concept_batch(spec["stage"], spec["resolution"], spec["batch"])
    rss_loaded = proc_status_mib("VmHWM")
    step = Step(spec["stage"], frozen, glob, local, batch, spec["checkpointing"])
    result: dict[str, Any] = {"spec": {k: v for k, v in spec.items() if k not in ("pretrained_model", "vision_model",
                                                                                   "global_mapper")},
                              "params": model_params(frozen, glob, local), "load_s": round(load_s, 2),
                              "data_s_per_micro_batch": round(data_s, 4),
                              "rss_after_imports_mib": round(rss_imports, 1),
                              "peak_rss_loaded_mib": round(rss_loaded, 1)}
    if spec.get("checks"):
        result["checkpointing_checks"] = checkpointing_checks(step)
    print(f"  [{spec['name']}] loaded in {load_s:.1f} s; forward-only ...", file=sys.stderr, flush=True)
    for _ in range(spec["warmup"]):
        step.forward(1000)
    result["forward"] = timed_calls(step.forward, spec["reps"], 2000)
    result["peak_rss_forward_mib"] = round(proc_status_mib("VmHWM"), 1)
    print(f"  [{spec['name']}] forward {result['forward']['median_s']:.3f} s; training steps ...", file=sys.stderr,
          flush=True)
    for _ in range(spec["warmup"]):
        step.train(1000)
    result["train"] = timed_calls(step.train, spec["reps"], 3000)
    result["peak_rss_train_mib"] = round(proc_status_mib("VmHWM"), 1)
    result["train_over_forward"] = round(result["train"]["median_s"] / result["forward"]["median_s"], 3)
    print(f"  [{spec['name']}] train {result['train']['median_s']:.3f} s; counted step ...", file=sys.stderr,
          flush=True)
    result["tensor_bytes"] = {k: round(v, 1) for k, v in step.counted_train(4000).items()}
    result["peak_rss_end_mib"] = round(proc_status_mib("VmHWM"), 1)
    result["case_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def run_fake_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Real-size training steps under FakeTensorMode: tensor bytes only, nothing computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = {"fp32": None, "bf16": torch.bfloat16}[spec["precision"]]
    t0 = time.perf_counter()
    out: dict[str, Any] = {"spec": spec, "batches": {}}
    batches = {size: concept_batch(spec["stage"], 512, size)[0] for size in spec["batches"]}  # real tensors
    # As train(): the frozen parts (and a frozen global mapper) in the weight dtype, the trained mapper in fp32.
    # Built in that dtype: Module.to() cannot swap fake parameters here.
    with FakeTensorMode(allow_non_fake_inputs=True):
        with default_dtype(dtype or torch.float32):
            frozen = build_real()
            torch.manual_seed(0)
            glob = new_mapper(GlobalMapper, frozen)
        local = None
        if spec["stage"] == "local":
            glob.requires_grad_(False).eval()
            local = new_mapper(LocalMapper, frozen)
        else:
            glob = new_mapper(GlobalMapper, frozen)  # fp32
        out["params"] = model_params(frozen, glob, local)
        for size in spec["batches"]:
            step = Step(spec["stage"], frozen, glob, local, batches[size], spec["checkpointing"], autocast=dtype)
            step.train(1)  # the first step makes the optimizer states
            out["batches"][str(size)] = {k: round(v, 1) for k, v in step.counted_train(2).items()}
    out["case_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case {spec['name']} failed (exit {proc.returncode}); stdout tail: {proc.stdout[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_wall_s"] = round(time.perf_counter() - start, 1)
    return result


# --------------------------------------------------------------------------------------------------
# On paper
# --------------------------------------------------------------------------------------------------

def on_paper(fake: list[dict[str, Any]]) -> dict[str, Any]:
    """Real-size memory: the components at their byte sizes, and totals from the fake-tensor counts."""
    params = next(f["params"] for f in fake if f["spec"]["stage"] == "local")
    trained = params["trained"]
    frozen_parts = {k: params[k] for k in ("unet", "vae", "text_encoder", "vision")}
    components = {
        **{f"{name} (frozen)": {"params": n, "fp32_gib": 4 * n / GiB, "half_gib": 2 * n / GiB}
           for name, n in frozen_parts.items()},
        "global mapper (frozen, stage 2 only)": {"params": params["global_mapper"],
                                                 "fp32_gib": 4 * params["global_mapper"] / GiB,
                                                 "half_gib": 2 * params["global_mapper"] / GiB},
        "trained mapper: weights fp32": {"params": trained, "bytes_per_param": 4, "gib": 4 * trained / GiB},
        "trained mapper: gradients fp32": {"params": trained, "bytes_per_param": 4, "gib": 4 * trained / GiB},
        "trained mapper: AdamW states (2 x fp32)": {"params": trained, "bytes_per_param": 8,
                                                    "gib": 8 * trained / GiB},
        "trained mapper: 8-bit Adam states (2 x int8)": {"params": trained, "bytes_per_param": 2,
                                                         "gib": 2 * trained / GiB},
    }
    adam8_saving = 6 * trained
    rows = []
    for f in fake:
        s = f["spec"]
        for size, counted in f["batches"].items():
            peak = counted["peak_mib"] * MiB
            weights = counted["weights_mib"] * MiB
            states = counted["optimizer_states_mib"] * MiB
            rows.append({"stage": s["stage"], "precision": s["precision"], "checkpointing": s["checkpointing"],
                         "batch": int(size), "weights_gib": weights / GiB, "optimizer_states_gib": states / GiB,
                         "activations_after_forward_gib": counted["after_forward_above_start_mib"] * MiB / GiB,
                         "step_peak_above_weights_and_states_gib": (peak - weights - states) / GiB,
                         "peak_adamw_gib": peak / GiB, "peak_8bit_adam_gib": (peak - adam8_saving) / GiB})
    fits = []
    groups: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["stage"], row["precision"], row["checkpointing"]), []).append(row)
    for (stage, precision, checkpointing), items in groups.items():
        items.sort(key=lambda r: r["batch"])
        if len(items) < 2:
            continue
        first, last = items[0], items[-1]  # peak = a + b x batch, from the smallest and largest batch counted
        slope = (last["peak_adamw_gib"] - first["peak_adamw_gib"]) / (last["batch"] - first["batch"])
        base = first["peak_adamw_gib"] - slope * first["batch"]
        entry: dict[str, Any] = {"stage": stage, "precision": precision, "checkpointing": checkpointing,
                                 "gib_per_sample": slope, "gib_at_batch_0": base}
        for gpu, cap in GPUS_GIB.items():
            usable = cap - GPU_RESERVE_GIB
            entry[f"max_batch_adamw {gpu}"] = max(0, math.floor((usable - base) / slope))
            entry[f"max_batch_8bit {gpu}"] = max(0, math.floor((usable - base + adam8_saving / GiB) / slope))
        fits.append(entry)
    return {"components": components, "trained_params": trained,
            "release_mapper_params": RELEASE_MAPPER_PARAMS, "adam8_saving_gib": adam8_saving / GiB,
            "rows": rows, "max_batch": fits, "gpu_reserve_gib": GPU_RESERVE_GIB}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=["tiny", "mid", "real"], choices=["tiny", "mid", "real"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--real-batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--reps", type=int, default=None, help="timed calls per case (default: tiny 5, mid 3, real 2)")
    parser.add_argument("--checkpointing-configs", nargs="*", default=["tiny", "mid"],
                        help="configs also run with the UNet's gradient checkpointing (default: tiny mid)")
    parser.add_argument("--fake-batch-sizes", type=int, nargs="*", default=[1, 2, 4],
                        help="batches of the real-size tensor counts under FakeTensorMode (none: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: core count)")
    parser.add_argument("--quick", action="store_true", help="tiny only, one rep, fake counts at batch 1")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train.json)")
    args = parser.parse_args()
    if args.quick:
        args.configs, args.reps, args.fake_batch_sizes, args.checkpointing_configs = ["tiny"], 1, [1], ["tiny"]
    return args


def case_specs(args: argparse.Namespace, saved: dict[str, dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    specs = []
    default_reps = {"tiny": 5, "mid": 3, "real": 2}
    for config in args.configs:
        for checkpointing in (False, True) if config in args.checkpointing_configs else (False,):
            for stage in ("global", "local"):
                for size in args.real_batch_sizes if config == "real" else args.batch_sizes:
                    name = f"{config}/{stage}/b{size}" + ("/ckpt" if checkpointing else "")
                    specs.append({"kind": "measure", "name": name, "config": config, "stage": stage, "batch": size,
                                  "checkpointing": checkpointing, "resolution": RESOLUTION[config],
                                  "reps": args.reps or default_reps[config], "warmup": 1, "threads": threads,
                                  "checks": config == "tiny" and checkpointing and size == args.batch_sizes[0],
                                  **{k: v for k, v in saved.get(config, {}).items() if k != "facts"}})
    if args.fake_batch_sizes:
        for precision in ("fp32", "bf16"):
            for checkpointing in (False, True):
                for stage in ("global", "local"):
                    specs.append({"kind": "fake", "name": f"fake-real/{stage}/{precision}"
                                  + ("/ckpt" if checkpointing else ""), "stage": stage, "precision": precision,
                                  "checkpointing": checkpointing, "batches": args.fake_batch_sizes,
                                  "threads": threads})
    return specs


def print_tables(measured: list[dict[str, Any]], paper: dict[str, Any] | None) -> None:
    print()
    print(f"{'case':<22} {'train s':>8} {'fwd s':>7} {'ratio':>6} {'data s':>7} {'RSS load':>9} {'RSS fwd':>8} "
          f"{'RSS train':>9} {'tensors peak':>12} {'acts':>8} {'trained':>11}")
    for r in measured:
        t = r["tensor_bytes"]
        print(f"{r['spec']['name']:<22} {r['train']['median_s']:>8.3f} {r['forward']['median_s']:>7.3f} "
              f"{r['train_over_forward']:>6.2f} {r['data_s_per_micro_batch']:>7.3f} {r['peak_rss_loaded_mib']:>9.0f} "
              f"{r['peak_rss_forward_mib']:>8.0f} {r['peak_rss_train_mib']:>9.0f} {t['peak_mib']:>12.0f} "
              f"{t['after_forward_above_start_mib']:>8.0f} {r['params']['trained']:>11,}")
    print("(seconds: medians; RSS and tensor bytes in MiB; acts: tensor bytes held after the forward, above weights "
          "and optimizer states)")
    if not paper:
        return
    print()
    print("real size (SD 1.4 + CLIP ViT-L/14), tensor bytes counted under FakeTensorMode, GiB:")
    print(f"{'stage':<7} {'precision':<9} {'ckpt':<5} {'batch':>5} {'weights':>8} {'acts':>6} {'peak-w-s':>8} "
          f"{'AdamW':>7} {'8-bit':>7}")
    for row in paper["rows"]:
        print(f"{row['stage']:<7} {row['precision']:<9} {'on' if row['checkpointing'] else 'off':<5} "
              f"{row['batch']:>5} {row['weights_gib']:>8.2f} {row['activations_after_forward_gib']:>6.2f} "
              f"{row['step_peak_above_weights_and_states_gib']:>8.2f} {row['peak_adamw_gib']:>7.2f} "
              f"{row['peak_8bit_adam_gib']:>7.2f}")
    print()
    for entry in paper["max_batch"]:
        print(f"{entry['stage']:<7} {entry['precision']:<5} ckpt {'on ' if entry['checkpointing'] else 'off'}: "
              f"{entry['gib_per_sample']:.2f} GiB per sample; max batch "
              + ", ".join(f"{gpu.split(' ')[0]} GiB {entry[f'max_batch_adamw {gpu}']}" for gpu in GPUS_GIB))


def main() -> None:
    args = parse_args()
    threads = args.threads or core_count()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    info = announce()
    measured: list[dict[str, Any]] = []
    fake: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="elite-bench-train-") as tmp:
        saved = {}
        for config in args.configs:
            if config != "real":
                saved[config] = build_saved_models(config, Path(tmp) / config)
                facts[config] = saved[config]["facts"]
        facts["real"] = {"unet": "SD14_UNET_CONFIG", "vae": SD14_VAE_CONFIG, "text_encoder": CLIP_L14_TEXT_CONFIG,
                         "vision": "CLIP_L14_VISION_CONFIG", "image_size": 512, "latent_size": 64}
        specs = case_specs(args, saved, threads)
        print(f"{len(specs)} cases, each in its own process", flush=True)
        for spec in specs:
            start = time.perf_counter()
            result = spawn(spec, timeout=3600)
            (fake if spec["kind"] == "fake" else measured).append(result)
            if spec["kind"] == "fake":
                summary = ", ".join(f"b{b} peak {v['peak_mib'] / 1024:.2f} GiB" for b, v in result["batches"].items())
            else:
                summary = (f"train {result['train']['median_s']:.3f} s, forward {result['forward']['median_s']:.3f} s "
                           f"(x{result['train_over_forward']:.2f}), peak RSS {result['peak_rss_train_mib']:.0f} MiB")
            print(f"{spec['name']}: {summary} [{time.perf_counter() - start:.0f} s]", flush=True)
    paper = on_paper(fake) if fake else None
    print_tables(measured, paper)
    payload = {
        "benchmark": "train", "command": exact_command(), "machine": info,
        "settings": {"configs": args.configs, "batch_sizes": args.batch_sizes,
                     "real_batch_sizes": args.real_batch_sizes, "reps": args.reps,
                     "checkpointing_configs": args.checkpointing_configs,
                     "fake_batch_sizes": args.fake_batch_sizes, "threads": threads, "dtype": "float32",
                     "optimizer": "torch.optim.AdamW(lr=1e-5, weight_decay=1e-2), clip_grad_norm_ 1.0",
                     "memory": "peak RSS per case process (VmHWM); live torch tensor bytes (TorchDispatchMode)"},
        "models": facts, "cases": measured, "fake_real_size": fake, "on_paper": paper,
        "script_wall_s": round(time.perf_counter() - t_start, 1),
    }
    path = save_results("train", payload, args.out)
    print(f"script wall time {payload['script_wall_s']:.0f} s; saved {path}")


if __name__ == "__main__":
    main()
