"""Shared helpers for the benchmark scripts: machine info, the exact command, JSON results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def code_version() -> dict[str, Any]:
    """The repository commit and whether elite/ differs from it (read-only git queries)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "elite_modified": bool(git("status", "--porcelain", "--", "elite"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "elite_modified": None}


def machine_info() -> dict[str, Any]:
    import diffusers
    import transformers

    return {
        "cpu_model": cpu_model(),
        "cores": core_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "malloc_env": malloc_env(),
        "code": code_version(),
        "date": datetime.datetime.now(datetime.UTC).astimezone().isoformat(timespec="seconds"),
    }


def exact_command() -> str:
    return shlex.join([sys.executable, *sys.argv])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def save_results(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def gemm_probe(seconds: float = 0.25) -> float:
    """GFLOP/s of a fixed fp32 512x512 GEMM right now, to show the VM's speed at the time of a measurement
    (its speed drifts: see docs/benchmarks.md)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count * 2 * 512**3 / (time.perf_counter() - start) / 1e9


def rusage() -> tuple[float, float, int]:
    """(user seconds, system seconds, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def malloc_env() -> dict[str, str]:
    """glibc malloc tunables in the environment (they change page-fault counts a lot here)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}


def announce() -> dict[str, Any]:
    """Print the machine and the exact command (the header of every benchmark) and return the machine info."""
    import torch

    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']} "
          f"({torch.get_num_threads()} threads), diffusers {info.get('diffusers', '?')}; {info['date']}")
    print(f"command: {exact_command()}")
    return info
