"""Loading, checking and converting mapper checkpoints.

The public release ships `global_mapper.pt` and `local_mapper.pt`: torch pickles of plain state
dicts. They are read with `torch.load(weights_only=True)`, which refuses any pickle that would
build Python objects (and so could run code) instead of executing it. Safetensors files load the
same way. Every load is checked strictly: the first missing, unexpected or misshaped key is named.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch

from elite.errors import CheckpointError
from elite.fileio import atomic_path
from elite.model.configs import SD1_CROSS_ATTENTION_LAYERS
from elite.model.mappers import GlobalMapper, LocalMapper, MapperConfig, _Mapper

MapperT = TypeVar("MapperT", GlobalMapper, LocalMapper)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a torch (.pt zip or legacy pickle) or safetensors file of tensors, told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    try:
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message: a paragraph about weights_only, then the reason; only the reason helps here
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        if "GLOBAL" not in reason:  # not a pickle of objects at all: damaged, or some other file
            raise CheckpointError(f"{path}: truncated or not a checkpoint ({reason})") from None
        raise CheckpointError(
            f"{path}: refused: the pickle holds Python objects other than tensors and could run code "
            f"(nothing was executed): {reason}"
        ) from None
    except Exception as err:  # torch and safetensors raise many types for damaged files (zip, EOF, key errors)
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint ({type(err).__name__}: {_first_line(err)})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (holds a {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def expected_shapes(config: MapperConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a mapper with this config, built on the meta device (no memory used)."""
    with torch.device("meta"):
        mapper = _Mapper(config)
    return {key: tuple(tensor.shape) for key, tensor in mapper.state_dict().items()}


def infer_config(state: dict[str, torch.Tensor], layers: tuple[tuple[str, int], ...] | None = None,
                 source: str = "checkpoint") -> MapperConfig:
    """Mapper dimensions read off a state dict; cross-attention layers from the caller (default SD 1.x)."""
    for key in ("mapping_0.0.weight", "mapping_0.6.weight"):
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} (not an ELITE mapper checkpoint)")
    if state["mapping_0.0.weight"].ndim != 2 or state["mapping_0.6.weight"].ndim != 2:
        raise CheckpointError(f"{source}: key 'mapping_0.0.weight' is not a matrix")
    hidden_dim, input_dim = state["mapping_0.0.weight"].shape
    output_dim = state["mapping_0.6.weight"].shape[0]
    return MapperConfig(input_dim, hidden_dim, output_dim, cross_attention_layers=layers or SD1_CROSS_ATTENTION_LAYERS)


def check_state_dict(state: dict[str, torch.Tensor], config: MapperConfig, source: str = "checkpoint") -> None:
    """Strict key and shape check; raises CheckpointError naming the first bad key."""
    expected = expected_shapes(config)
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r}")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {list(state[key].shape)}, expected {list(shape)}"
            )
        if not state[key].is_floating_point():
            raise CheckpointError(f"{source}: key {key!r} has dtype {state[key].dtype}, expected a float type")
        if not bool(torch.isfinite(state[key]).all()):  # NaN or inf weights give black images, silently
            bad = int((~torch.isfinite(state[key])).sum())
            raise CheckpointError(f"{source}: key {key!r} holds {bad} non-finite value(s) (NaN or inf)")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key!r}")


def load_mapper(
    cls: type[MapperT],
    path: str | os.PathLike[str],
    cross_attention_layers: tuple[tuple[str, int], ...] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> MapperT:
    """Load a release `.pt` or a safetensors mapper file, strictly checked, as `cls`."""
    state = read_state_dict(path)
    config = infer_config(state, cross_attention_layers, source=str(path))
    check_state_dict(state, config, source=str(path))
    with torch.device("meta"):
        mapper = cls(config)
    mapper.load_state_dict(state, strict=True, assign=True)
    return mapper.to(device=device, dtype=dtype).eval()


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                       cross_attention_layers: tuple[tuple[str, int], ...] | None = None) -> int:
    """Convert a release mapper `.pt` to safetensors after a strict check; returns the tensor count."""
    state = read_state_dict(src)
    check_state_dict(state, infer_config(state, cross_attention_layers, source=str(src)), source=str(src))
    save_safetensors(state, dst, metadata={"format": "pt", "source": Path(src).name})
    return len(state)


def load_pretrained(what: str, loader: Any, source: str | os.PathLike[str], **kwargs: Any) -> Any:
    """`loader.from_pretrained(source, ...)` (a diffusers or transformers class) with its faults as one
    CheckpointError naming the part and the source: a missing folder, a damaged file, a pickle with code in it
    (transformers refuses those; nothing runs)."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CheckpointError(f"cannot load the {what} from {os.fspath(source)}: "
                              f"{lines[0] if lines else type(err).__name__}") from None
