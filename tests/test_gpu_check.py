"""benchmarks/gpu_check.py: the CPU run CI makes (`--small`: the same code at tiny sizes, parity must pass), and the
real-size run where a CUDA GPU is present (skipped elsewhere, with the reason)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str, timeout: int) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "== gpu_check" in done.stdout  # the table comes last
    return json.loads(out.read_text())


def test_the_small_check_runs_on_the_cpu_and_its_parity_holds(tmp_path: Path) -> None:
    result = _run(tmp_path, "--small", "--compile", "eager", timeout=900)
    names = [entry["name"] for entry in result["parity"]]
    assert len(names) == 5 and all(entry["ok"] for entry in result["parity"])
    assert any("onnxruntime" in name for name in names) and any("generation" in name for name in names)
    encoding, generation = result["encoding_ms_per_concept"], result["generation_s_per_image"]
    assert set(encoding["torch"]) == set(encoding["onnxruntime"]) == {"1", "4"}
    assert all(value > 0 for value in [*encoding["torch"].values(), *encoding["onnxruntime"].values()])
    assert set(generation["elite"]) == set(generation["plain"]) == set(generation["overhead_pct"]) == {"1", "2"}
    assert set(generation["elite_compiled"]) == {"1", "2"} and result["setting"]["compile"] == "eager"
    assert result["setting"]["device"] == "cpu" and result["setting"]["low_dtype"] == "bfloat16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the real-size check (fp16, ONNX "
                    "Runtime's CUDA provider) runs on a GPU host, see docs/gpu.md")
def test_the_real_size_check_on_a_gpu(tmp_path: Path) -> None:
    result = _run(tmp_path, timeout=1200)
    assert all(entry["ok"] for entry in result["parity"])
    assert set(result["generation_s_per_image"]["elite"]) == {"1", "8"}
