"""Checks on the code itself that need Python to run; lint and types are steps of their own in scripts/test.sh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_library_imports_without_prefect() -> None:
    code = ("import sys, elite, elite.model.pipeline, elite.jobs, elite_cli.main; "
            "assert 'prefect' not in sys.modules, 'importing the library or the CLI imported prefect'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_public_api_resolves() -> None:
    import elite

    missing = [name for name in elite.__all__ if getattr(elite, name, None) is None]
    assert not missing
