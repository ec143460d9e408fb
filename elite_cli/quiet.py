"""Keep the CLI's output to our progress bars and results: no weight-loading bars or backend notices."""

from __future__ import annotations

import os

QUIET = (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"))


def quiet_libraries() -> None:
    """Called by the commands that load models, just before: importing diffusers and transformers takes seconds,
    which `--help` and a mistyped folder should not wait for. The variables are read when they are imported."""
    for name, value in QUIET:
        os.environ.setdefault(name, value)
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
