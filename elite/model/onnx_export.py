"""Export the concept encoder (CLIP vision tower + global mapper + local mapper) to one ONNX file.

Inputs: `pixel_values` and `object_pixel_values` (batch, 3, size, size), `mask_grid` (batch, grid, grid);
outputs: `words` (batch, 5, dim) and `local_tokens` (batch, patches, dim); the batch axis is dynamic.
torch's exporter fixes the batch size when it is given a batch-1 example, so the example has batch 2
and the axis is declared through `dynamic_shapes`.

Precisions: fp32; fp16 (for CUDA); int8 = fp32 graph with dynamic int8 quantisation of the MatMul/Gemm
weights (per channel), the fast CPU variant (AVX-512 VNNI). Model metadata records content hashes of
the weights, the feature layers, the opset, the precision and the package version.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import onnx
import torch

import elite
from elite.errors import InputError
from elite.fileio import atomic_path
from elite.model.encoder import ConceptEncoderModule, state_digest

Precision = Literal["fp32", "fp16", "int8"]
OPSET = 18
INPUT_NAMES = ("pixel_values", "object_pixel_values", "mask_grid")
OUTPUT_NAMES = ("words", "local_tokens")
logger = logging.getLogger(__name__)


def encoder_metadata(module: ConceptEncoderModule, precision: Precision,
                     sources: dict[str, str] | None = None) -> dict[str, str]:
    """What an exported file says about itself (read back by `OnnxConceptEncoder`)."""
    config = module.vision_model.config
    return {
        "elite.version": elite.__version__,
        "elite.precision": precision,
        "elite.opset": str(OPSET),
        "elite.feature_layers": ",".join(str(i) for i in module.feature_layers),
        "elite.image_size": str(config.image_size),
        "elite.mask_grid": str(config.image_size // config.patch_size),
        "elite.text_dim": str(module.global_mapper.config.output_dim),
        "elite.vision_sha256": state_digest(module.vision_model),
        "elite.global_mapper_sha256": state_digest(module.global_mapper),
        "elite.local_mapper_sha256": state_digest(module.local_mapper),
        **{f"elite.source.{k}": v for k, v in (sources or {}).items()},
    }


def _export_graph(module: ConceptEncoderModule, path: Path, dtype: torch.dtype) -> None:
    config = module.vision_model.config
    size, grid = config.image_size, config.image_size // config.patch_size
    example = (torch.zeros(2, 3, size, size, dtype=dtype), torch.zeros(2, 3, size, size, dtype=dtype),
               torch.ones(2, grid, grid, dtype=dtype))  # batch 2: a batch-1 example would fix the batch size
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes and axis-renaming notices
        program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=({0: batch}, {0: batch}, {0: batch}),
                                    input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                    verbose=False)
    assert program is not None
    program.save(str(path))


def _quantize_int8(graph: Path) -> Path:
    """Dynamic int8 quantisation of the MatMul/Gemm weights (activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = graph.with_name("encoder-prepared.onnx")
    quantized = graph.with_name("encoder-int8.onnx")
    quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
    # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2 only, e.g. the AMD EPYC hosts here) ONNX Runtime's
    # u8 x s8 kernels add pairs of products in int16 and saturate; with full-range weights the words' cosine to
    # fp32 fell to 0.97 on such a host (0.99+ on AVX512-VNNI hosts). A file may run on either, so 7 bits always.
    quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     op_types_to_quantize=["MatMul", "Gemm"])
    return quantized


def export_concept_encoder(module: ConceptEncoderModule, out: str | os.PathLike[str],
                           precision: Precision = "fp32", sources: dict[str, str] | None = None) -> Path:
    """Write the encoder as one ONNX file (atomically) and return its path."""
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    out = Path(out)
    metadata = encoder_metadata(module, precision, sources)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as scratch:
        graph = Path(scratch) / "encoder.onnx"
        if precision == "fp16":  # a half copy: the caller's module stays as it is
            _export_graph(copy.deepcopy(module).half().eval(), graph, torch.float16)
        else:
            _export_graph(module.float().eval(), graph, torch.float32)
        if precision == "int8":
            graph = _quantize_int8(graph)
        model = onnx.load(str(graph))
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
    logger.info("exported %s encoder to %s", precision, out)
    return out
