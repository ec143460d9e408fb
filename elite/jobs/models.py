"""Where the models are: given values, else the ELITE_* environment variables; checked before any work starts.

One rule for both front doors: the CLI's options and the flows' parameters default to the same variables, so a
work pool or a shell can keep model locations in its environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from elite.errors import InputError
from elite.evaluation import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL

MODEL_ENV = {"pretrained_model": "ELITE_PRETRAINED_MODEL", "vision_model": "ELITE_VISION_MODEL",
             "global_mapper": "ELITE_GLOBAL_MAPPER", "local_mapper": "ELITE_LOCAL_MAPPER",
             "onnx_path": "ELITE_ONNX_ENCODER", "clip_model": "ELITE_CLIP_MODEL", "dino_model": "ELITE_DINO_MODEL"}
FILES = ("global_mapper", "local_mapper", "onnx_path")  # always local files; the other two may be hub ids


def resolve_models(needed: tuple[str, ...], environ: Mapping[str, str] | None = None,
                   **given: str | None) -> dict[str, str | None]:
    """Every model location: the given value, else its environment variable, else None. Each of `needed` must be
    found, and a local file or folder named must exist: an InputError names what is missing, before any work."""
    environ = os.environ if environ is None else environ
    needed = tuple(dict.fromkeys(needed))  # once each, however many jobs need it
    models = {name: given.get(name) or environ.get(var) or None for name, var in MODEL_ENV.items()}
    missing = [name for name in needed if not models[name]]
    if missing:
        raise InputError("missing " + ", ".join(f"{name.replace('_', '-')} (or ${MODEL_ENV[name]})"
                                                for name in missing))
    for name, value in models.items():
        if value is None or name not in needed:
            continue
        path = Path(value)
        # a hub id ("org/name") is left to the loader; a path that looks local must exist
        looks_local = name in FILES or value.startswith((".", "/", "~")) or value.count("/") > 1
        if looks_local and not path.expanduser().exists():
            raise InputError(f"{name.replace('_', '-')} {value}: no such file or folder")
    return models


def encoder_needs(engine: str) -> tuple[str, ...]:
    """The models an encoder of `engine` loads (the UNet config names the mappers' layers for torch)."""
    if engine == "onnx":
        return ("onnx_path",)
    if engine == "torch":
        return ("vision_model", "global_mapper", "local_mapper")
    raise InputError(f"engine must be 'torch' or 'onnx', got {engine!r}")


GENERATOR_NEEDS = ("pretrained_model", "global_mapper", "local_mapper")


EVALUATION_NEEDS = ("clip_model", "dino_model")


def resolve_evaluation_models(environ: Mapping[str, str] | None = None, **given: str | None) -> dict[str, str]:
    """The metric models (elite.evaluation.metrics): given, else $ELITE_CLIP_MODEL / $ELITE_DINO_MODEL, else the
    paper's (CLIP ViT-B/32, DINO ViT-S/16 from the hub); a local folder named must exist."""
    environ = os.environ if environ is None else environ
    defaults = {"clip_model": DEFAULT_CLIP_MODEL, "dino_model": DEFAULT_DINO_MODEL}
    chosen = {name: given.get(name) or environ.get(MODEL_ENV[name]) or defaults[name] for name in EVALUATION_NEEDS}
    models = resolve_models(EVALUATION_NEEDS, {}, **chosen)
    return {name: str(models[name]) for name in EVALUATION_NEEDS}
