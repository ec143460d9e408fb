"""Run an exported concept encoder with ONNX Runtime: the same interface as `TorchConceptEncoder`.

Device: "cpu" runs on the CPU provider alone; "cuda" / "cuda:N" on the CUDA provider of GPU N, with the CPU
provider behind it for any op CUDA lacks; "auto" on CUDA when this onnxruntime offers it, else the CPU.
`onnxruntime-gpu` provides CUDA on GPU hosts and the CPU package `onnxruntime` elsewhere: install one of
the two, never both, since both provide the module `onnxruntime`. ONNX Runtime itself falls back to the
CPU when CUDA cannot start, quietly; here that is a WARNING naming the file, or an InputError with
`strict_device=True`, so a GPU worker never encodes on its CPU unnoticed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elite.errors import CheckpointError, InputError
from elite.fileio import sha256_file
from elite.model.devices import DeviceArg, resolve_device
from elite.model.encoder import PreprocessingEncoder
from elite.model.preprocessing import ConceptPreprocessor

logger = logging.getLogger(__name__)
REQUIRED_METADATA = ("elite.version", "elite.precision", "elite.image_size", "elite.mask_grid", "elite.text_dim")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _cuda_plan(device: DeviceArg, provider_options: Mapping[str, Any] | None,
               available: list[str]) -> tuple[int | None, bool, str]:
    """(GPU index to try, None for the CPU alone; whether ending on the CPU is a surprise; what was asked)."""
    if device is None or device == "auto":
        # ORT may see a GPU that a CPU-only torch does not; torch seeing one is what makes the CPU a surprise.
        gpu = 0 if CUDA in available or torch.cuda.is_available() else None
        return gpu, torch.cuda.is_available(), "auto"
    where = resolve_device(device)
    if where.type == "cpu":
        if provider_options:
            raise InputError(f"provider_options {dict(provider_options)} are CUDA provider options; "
                             "device 'cpu' takes none")
        return None, False, "cpu"
    return where.index or 0, True, str(where)


class OnnxConceptEncoder(PreprocessingEncoder):
    """Encode concepts with one ONNX Runtime session over an exported encoder file."""

    def __init__(self, path: str | os.PathLike[str], device: DeviceArg = "auto",
                 provider_options: Mapping[str, Any] | None = None, strict_device: bool = False,
                 threads: int | None = None) -> None:
        """`device`: "auto", "cpu", "cuda" or "cuda:N"; `provider_options`: extra CUDA provider options
        (`gpu_mem_limit`, ...); `threads`: intra-op threads on the CPU (default: every core)."""
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        available = ort.get_available_providers()
        gpu, expect_cuda, asked = _cuda_plan(device, provider_options, available)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one graph, parallel inside each op
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.log_severity_level = 3  # the optimiser's warnings about unused initialisers are noise
        why_not_cuda = "" if CUDA in available else f"this onnxruntime offers no CUDA provider, only {available}"
        if gpu is not None and not why_not_cuda:
            try:
                self.session = self._start(ort, options, [(CUDA, {"device_id": gpu, **(provider_options or {})}),
                                                          CPU])
            except CheckpointError as err:
                # A CUDA provider that cannot start may raise instead of falling back: the CPU alone tells a
                # device fault (warned about below) from a bad file (raised from here).
                self.session = self._start(ort, options, [CPU])
                why_not_cuda = f"the CUDA provider failed: {err.__cause__}".splitlines()[0]
        else:
            self.session = self._start(ort, options, [CPU])
        self.provider: str = self.session.get_providers()[0]
        self.device: str = f"cuda:{gpu}" if self.provider == CUDA else "cpu"  # where it encodes, for reports
        if expect_cuda and self.provider != CUDA:
            message = (f"{self.path}: asked to encode on {asked}, runs on {self.provider} instead "
                       f"({why_not_cuda or 'the CUDA provider did not start'})")
            if strict_device:
                raise InputError(message)
            logger.warning("%s", message)
        logger.info("ONNX encoder %s runs on %s (%s)", self.path.name, self.provider, self.device)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in self.session.get_inputs()]
        if names != ["pixel_values", "object_pixel_values", "mask_grid"]:
            raise CheckpointError(f"{self.path}: inputs {names} are not those of an exported ELITE encoder")
        self._check_exported()
        self.input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.preprocessor = ConceptPreprocessor(int(self.metadata["elite.image_size"]),
                                                int(self.metadata["elite.mask_grid"]))
        self._encoder_id: str | None = None

    def _check_exported(self) -> None:
        """A file with the right input names is not yet an ELITE encoder: it must carry the metadata `elite
        export-onnx` writes and give (batch, words, text_dim) words and (batch, patches, text_dim) local tokens."""
        missing = [key for key in REQUIRED_METADATA if key not in self.metadata]
        if missing:
            raise CheckpointError(f"{self.path}: no {', '.join(missing)} in its metadata: not written by `elite "
                                  "export-onnx` (export the encoder with it)")
        outputs = {o.name: len(o.shape) for o in self.session.get_outputs()}
        if outputs != {"words": 3, "local_tokens": 3}:
            raise CheckpointError(f"{self.path}: outputs {outputs} (name: rank) are not those of an ELITE encoder, "
                                  "{'words': 3, 'local_tokens': 3}")
        try:
            sizes = [int(self.metadata[key]) for key in ("elite.image_size", "elite.mask_grid")]
        except ValueError:
            sizes = []
        if len(sizes) != 2 or min(sizes) < 1:
            raise CheckpointError(f"{self.path}: metadata elite.image_size / elite.mask_grid are not positive "
                                  "integers")

    def _start(self, ort: Any, options: Any, providers: list[Any]) -> Any:
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as err:  # ORT raises its own Fail/InvalidProtobuf/InvalidGraph types
            raise CheckpointError(f"{self.path}: not a loadable ONNX encoder: {str(err).splitlines()[0]}") from err

    @property
    def encoder_id(self) -> str:
        """`onnx-<sha256 of the file>`: a re-export or another precision is another encoder."""
        if self._encoder_id is None:
            self._encoder_id = f"onnx-{sha256_file(self.path)}"
        return self._encoder_id

    def run(self, pixel_values: np.ndarray, object_pixel_values: np.ndarray,
            mask_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw call on preprocessed arrays; checks shapes so a mistake names the input, not an ORT node."""
        size, grid = self.preprocessor.image_size, self.preprocessor.mask_grid
        batch = pixel_values.shape[0] if pixel_values.ndim else 0
        expected = {"pixel_values": (batch, 3, size, size), "object_pixel_values": (batch, 3, size, size),
                    "mask_grid": (batch, grid, grid)}
        feeds = {"pixel_values": pixel_values, "object_pixel_values": object_pixel_values, "mask_grid": mask_grid}
        for name, array in feeds.items():
            if batch < 1 or tuple(array.shape) != expected[name]:
                raise InputError(f"{name} has shape {tuple(array.shape)}; the encoder takes "
                                 f"(batch, {', '.join(str(d) for d in expected[name][1:])}) with the same batch "
                                 "for all three inputs")
        words, local_tokens = self.session.run(
            None, {name: np.ascontiguousarray(array, dtype=self.input_dtype) for name, array in feeds.items()})
        return words, local_tokens

    def _run(self, pixel_values: torch.Tensor, object_pixel_values: torch.Tensor,
             mask_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words, local_tokens = self.run(pixel_values.numpy(), object_pixel_values.numpy(), mask_grid.numpy())
        return torch.from_numpy(words.astype(np.float32)), torch.from_numpy(local_tokens.astype(np.float32))
