"""Where models run: the one definition of the device and dtype defaults of generation and encoding.

"auto" is the first CUDA GPU when torch sees one, else the CPU; its precision is float16 on CUDA (the usual
SD 1.x inference precision, half the memory of float32) and float32 on the CPU, where float16 matrix
kernels are slow or missing. Only CPU and CUDA devices are known: they are the two that both engines
(torch and ONNX Runtime's CPU and CUDA providers) can run on.
"""

from __future__ import annotations

import torch

from elite.errors import InputError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DeviceArg = str | torch.device | None
DtypeArg = str | torch.dtype | None


def resolve_device(device: DeviceArg = "auto") -> torch.device:
    """The device meant: for "auto" or None cuda:0 if torch sees a GPU, else the CPU; "cpu", "cuda" (cuda:0)
    and "cuda:N" as given.

    Only the spelling is checked, not whether the device exists: ONNX Runtime may reach a GPU that a
    CPU-only torch cannot see, so each engine checks availability itself."""
    if device is None or device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if resolved.type == "cpu":
        return torch.device("cpu")  # "cpu:0" and "cpu" are the same device; one spelling in reports
    if resolved.type == "cuda":
        # A bare "cuda" is the first GPU, as ONNX Runtime's default device_id, so both engines agree.
        return torch.device("cuda", resolved.index or 0)
    raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def check_torch_device(device: torch.device) -> torch.device:
    """`device` if torch can place tensors there: one clear InputError instead of torch's assertion deep
    inside a `.to()`."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count:
            raise InputError(f"device {str(device)!r} asked for, but torch sees {count} CUDA device(s)"
                             + ("" if count else f" (torch {torch.__version__}, built for CUDA "
                                                 f"{torch.version.cuda or 'none'})"))
    return device


def resolve_dtype(dtype: DtypeArg, device: DeviceArg = "auto") -> torch.dtype:
    """The dtype meant on `device`: for "auto" or None float16 on CUDA, float32 on the CPU; else "float32",
    "float16", "bfloat16" or that torch dtype. float16 on the CPU is refused: many CPU kernels lack it, and
    the rest are slow."""
    where = resolve_device(device)
    if dtype is None or dtype == "auto":
        return torch.float16 if where.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved: torch.dtype | None = dtype if dtype in DTYPES.values() else None
    else:
        resolved = DTYPES.get(dtype)
    if resolved is None:
        raise InputError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    if resolved == torch.float16 and where.type == "cpu":
        raise InputError("float16 needs a CUDA device; use float32 or bfloat16 on the CPU")
    return resolved


def cuda_devices() -> list[str]:
    """Every CUDA device torch sees ("cuda:0", "cuda:1", ...), else ["cpu"]: the default slots of a worker."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]
