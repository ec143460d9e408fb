"""Credentials never leave: not in messages, run tables, manifests, artifacts, logs or Prefect's database, whether
they come from the credential variables or sit in the endpoint URL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from elite.data.s3 import S3Store, StorageSettings
from elite.errors import Failure, StorageError, TransientStorageError, redact

if TYPE_CHECKING:
    from s3_server import MotoS3

pytest_plugins = ["s3_server"]
REPO = Path(__file__).resolve().parents[1]
MARKERS = {name: f"SeCrEt{n}x{uuid.uuid4().hex[:10]}" for n, name in enumerate(
    ("ELITE_S3_ACCESS_KEY_ID", "ELITE_S3_SECRET_ACCESS_KEY", "ELITE_S3_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
     "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "endpoint password"))}


def test_redaction_of_urls_settings_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    password = MARKERS["endpoint password"]
    assert redact(f"cannot reach http://admin:{password}@minio:9000/b/k") == "cannot reach http://***@minio:9000/b/k"
    monkeypatch.setenv("ELITE_S3_SECRET_ACCESS_KEY", MARKERS["ELITE_S3_SECRET_ACCESS_KEY"])
    error = StorageError(f"denied with {MARKERS['ELITE_S3_SECRET_ACCESS_KEY']} at http://u:{password}@h")
    assert MARKERS["ELITE_S3_SECRET_ACCESS_KEY"] not in str(error) and password not in str(error)
    failure = Failure("a", f"http://u:{password}@h/a.jpg", "read", MARKERS["ELITE_S3_SECRET_ACCESS_KEY"])
    assert password not in str(failure.row()) and MARKERS["ELITE_S3_SECRET_ACCESS_KEY"] not in str(failure.row())
    settings = StorageSettings(endpoint_url=f"http://u:{password}@127.0.0.1:9", access_key_id="AKIDMARKER1",
                               secret_access_key=MARKERS["AWS_SECRET_ACCESS_KEY"], max_attempts=1,
                               connect_timeout=0.5, region="us-east-1")
    assert password not in repr(settings) and "AKIDMARKER1" not in repr(settings)
    dead = S3Store("bucket", "x", settings)
    with pytest.raises(TransientStorageError) as caught:
        dead.get("k")
    assert password not in str(caught.value) and "http://***@127.0.0.1:9" in str(caught.value)
    assert caught.value.__suppress_context__  # botocore's own message (with the URL) is not chained into tracebacks


def test_no_secret_in_any_output_of_a_run(s3_server: MotoS3, concepts_dir: Path, tmp_path: Path) -> None:
    """The whole catalog job on S3 (a bad image and a bad prompt line among the inputs, so failure tables and
    artifacts exist), then every byte it produced is searched for each marker."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    prefix = uuid.uuid4().hex
    root = f"s3://{s3_server.bucket}/{prefix}"
    s3_server.seed([(f"{prefix}/catalog/1.jpg", (concepts_dir / "1.jpg").read_bytes()),
                    (f"{prefix}/catalog/1_bg.png", (concepts_dir / "1_bg.png").read_bytes()),
                    (f"{prefix}/catalog/bad.jpg", b"not an image"),
                    (f"{prefix}/prompts.txt", b"a photo of a S\na line without the placeholder\n")])
    home = tmp_path / "prefect-home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "ELITE_S3_"))},
           **{name: value for name, value in MARKERS.items() if name.isupper()},
           "ELITE_S3_ENDPOINT_URL": f"http://elite:{MARKERS['endpoint password']}@127.0.0.1:{s3_server.port}",
           "ELITE_S3_REGION": "us-east-1", "PREFECT_HOME": str(home)}
    command = [sys.executable, "-m", "elite_cli", "personalize", "--concepts", f"{root}/catalog", "--prompts",
               f"{root}/prompts.txt", "--out", f"{root}/out", "--tiny", "--tiny-dir", str(tmp_path / "tiny"),
               "--steps", "1"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr  # the bad image and the bad prompt line
    assert "FAILED bad (read)" in result.stderr and "1 concepts encoded" in result.stdout
    outputs = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in backend.buckets[s3_server.bucket].keys:
        if key.startswith(f"{prefix}/out/"):
            outputs[key] = backend.get_object(s3_server.bucket, key).value
    assert any(key.endswith("-failures.parquet") for key in outputs) and any("/images/1/" in k for k in outputs)
    for path in home.rglob("*"):  # Prefect's database (runs, states, logs, artifacts) and whatever else it kept
        if path.is_file():
            outputs[str(path)] = path.read_bytes()
    assert any(name.endswith(".db") for name in outputs)
    for where, data in outputs.items():
        for name, marker in MARKERS.items():
            assert marker.encode() not in data, f"{name} leaked into {where}"
    # and a failing run: the endpoint's password is not in the one line it prints
    env["ELITE_S3_ENDPOINT_URL"] = f"http://elite:{MARKERS['endpoint password']}@127.0.0.1:9"
    env["ELITE_S3_MAX_ATTEMPTS"], env["ELITE_S3_CONNECT_TIMEOUT"] = "1", "0.5"
    failed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "cannot reach the S3 endpoint http://***@127.0.0.1:9" in failed.stderr
    assert not any(marker in failed.stderr + failed.stdout for marker in MARKERS.values())
    shutil.rmtree(home, ignore_errors=True)
