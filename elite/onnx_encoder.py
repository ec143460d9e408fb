"""Run an exported concept encoder with ONNX Runtime: the same interface as `TorchConceptEncoder`.

Provider preference: CUDA, then CPU (`onnxruntime-gpu` provides CUDA on GPU hosts; the CPU package
`onnxruntime` elsewhere: install one of the two, never both, since both provide the module
`onnxruntime`). The provider in use is logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from elite.encoder import PreprocessingEncoder
from elite.errors import CheckpointError, InputError
from elite.fileio import sha256_file
from elite.preprocessing import ConceptPreprocessor

logger = logging.getLogger(__name__)
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxConceptEncoder(PreprocessingEncoder):
    """Encode concepts with one ONNX Runtime session over an exported encoder file."""

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        available = ort.get_available_providers()
        chosen = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
        if not chosen:
            raise InputError(f"none of the providers {list(providers or PREFERRED_PROVIDERS)} is available "
                             f"(available: {available})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one graph, parallel inside each op
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.log_severity_level = 3  # warnings of the optimiser about unused initialisers are noise
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=chosen)
        except Exception as err:  # ORT raises its own Fail/InvalidProtobuf/InvalidGraph types
            raise CheckpointError(f"{self.path}: not a loadable ONNX encoder: {str(err).splitlines()[0]}") from err
        self.provider = self.session.get_providers()[0]
        logger.info("ONNX encoder %s runs on %s", self.path.name, self.provider)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in self.session.get_inputs()]
        if names != ["pixel_values", "object_pixel_values", "mask_grid"]:
            raise CheckpointError(f"{self.path}: inputs {names} are not those of an exported ELITE encoder")
        self.input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        shape = self.session.get_inputs()[0].shape  # (batch, 3, size, size)
        size = int(self.metadata.get("elite.image_size", shape[2]))
        grid = int(self.metadata.get("elite.mask_grid", self.session.get_inputs()[2].shape[1]))
        self.preprocessor = ConceptPreprocessor(size, grid)
        self._encoder_id: str | None = None

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
