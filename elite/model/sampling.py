"""Sampler settings a user can get wrong, checked before any model loads (this module imports no model library)."""

from __future__ import annotations

import math

from elite.errors import InputError

MAX_STEPS = 1000  # the scheduler's training steps: more denoising steps than that do not exist


def check_sampler(steps: int, guidance_scale: float, lambda_local: float, height: int, width: int,
                  multiple: int = 8) -> None:
    """InputError for sampler settings that cannot be meant: steps outside 1..1000, a guidance scale or lambda
    that is not a finite number, a size that is not a positive multiple of the VAE's downsampling."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    for name, value in (("guidance_scale", guidance_scale), ("lambda_local", lambda_local)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    if guidance_scale < 0:
        raise InputError(f"guidance_scale must be at least 0 (1 or less turns guidance off), got {guidance_scale}")
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % multiple:
            raise InputError(f"{name} must be a positive multiple of {multiple}, got {size!r}")
