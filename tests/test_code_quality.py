from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "elite", "tests", "benchmarks", "flows"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "elite", "flows"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_imports_without_prefect() -> None:
    code = "import sys, elite, elite.pipeline, elite.cli; assert 'prefect' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_public_api_resolves() -> None:
    import elite

    missing = [name for name in elite.__all__ if getattr(elite, name, None) is None]
    assert not missing
