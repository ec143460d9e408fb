"""What an operator sees of a flow run: the library's warnings in the run's log as WARNING, failures as a table
artifact, run names that say what they hold, and no report file from a run that had nothing to report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from elite.model.tiny import TinyModels


def _models(tiny: TinyModels) -> dict[str, str]:
    return {"pretrained_model": str(tiny.pretrained_model), "vision_model": str(tiny.vision_model),
            "global_mapper": str(tiny.global_mapper), "local_mapper": str(tiny.local_mapper)}


def _logs(flow_run_id: Any, wanted: str) -> list[Any]:
    """The run's log records holding `wanted`, once the log handler has sent them (it batches in the background)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        found = [log for log in logs if wanted in log.message]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_library_warnings_reach_the_run_log_as_warnings(prefect_harness: None, tiny_models: TinyModels,
                                                        tmp_path: Path) -> None:
    from flows.encode import encode_concepts

    (tmp_path / "empty").mkdir()
    state = encode_concepts(str(tmp_path / "empty"), str(tmp_path / "store"), **_models(tiny_models),
                            return_state=True)
    assert state.is_completed()
    report = state.result()
    assert report["done"] == 0 and report["failures_uri"] is None
    assert not (tmp_path / "store").exists()  # a run with nothing to report writes no report file
    [log] = _logs(state.state_details.flow_run_id, "no concept images")
    assert log.level == 30 and "elite.jobs.encode" in log.message  # WARNING, and which part of elite said it


def test_failures_are_a_table_artifact_and_runs_are_named(prefect_harness: None, tiny_models: TinyModels,
                                                          concepts_dir: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from flows.encode import encode_concepts

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    shutil.copy(concepts_dir / "1.jpg", catalog / "good.jpg")
    (catalog / "broken.jpg").write_bytes(b"not an image")
    state = encode_concepts(str(catalog), str(tmp_path / "store"), **_models(tiny_models), return_state=True)
    report = state.result()
    assert report["failed"] == 1 and report["done"] == 1
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["encode-concepts-failures"])))
        [table] = [a for a in artifacts if a.flow_run_id == run_id]
        assert table.type == "table" and "broken" in str(table.data) and "not an image" in str(table.data)
        assert client.read_flow_run(run_id).name == f"encode {catalog}"
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert [t.name for t in tasks if t.name.startswith("encode ")] == ["encode broken..good (2)"]


class _PrefectDidNotStart:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server\nmore detail")


def test_a_prefect_failure_is_one_line(tmp_path: Path, concepts_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever goes wrong inside Prefect (here: a server that never came up) ends in one `elite: error:` line."""
    import flows.personalize
    from elite_cli.main import main

    monkeypatch.setattr(flows.personalize, "personalize_catalog", _PrefectDidNotStart())
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    shutil.copy(concepts_dir / "1.jpg", catalog / "1.jpg")
    code = main(["personalize", "--concepts", str(catalog), "--out", str(tmp_path / "out"), "--tiny",
                 "--tiny-dir", str(tmp_path / "tiny")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["elite: error: the personalize-catalog flow run failed: RuntimeError: Timed out while attempting "
                   "to connect to ephemeral Prefect API server (--verbose shows the traceback)"]


def test_a_failing_flow_run_prints_no_tracebacks_above_the_one_line(tiny_models: TinyModels, concepts_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A damaged mapper file fails inside the encode subflow: Prefect logs a traceback per nested flow run; the CLI
    keeps them in the run logs and prints the cause once, as its last line."""
    import os
    import subprocess
    import sys

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    shutil.copy(concepts_dir / "1.jpg", catalog / "1.jpg")
    (tmp_path / "damaged.pt").write_bytes(b"\x80\x02 not a checkpoint at all" * 50)
    models = {**_models(tiny_models), "global_mapper": str(tmp_path / "damaged.pt")}
    command = [sys.executable, "-m", "elite_cli", "personalize", "--concepts", str(catalog), "--out",
               str(tmp_path / "out"), "--steps", "1", "--height", "64", "--width", "64",
               *(arg for name, value in models.items() for arg in (f"--{name.replace('_', '-')}", value))]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    last = [line for line in result.stderr.splitlines() if line.startswith("elite: error:")]
    assert len(last) == 1 and "damaged.pt: truncated or not a checkpoint" in last[0]
