"""personalize_catalog against a real `prefect server start` (a subprocess on 127.0.0.1 with its own PREFECT_HOME and
SQLite database), on tiny models over a local folder: a flow run from a client process, the deployments of
infra/prefect.yaml applied by `prefect deploy`, then taken over by `python -m flows.serve` and run through the API.
Everything is checked through the server's API and on disk. The server runs without its scheduler, so the
nightly schedule never fires during the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from elite.model.tiny import TinyModels

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
FIRST = ("1", "4")  # 1.jpg and 4.png, with their masks
ADDED = "2"  # added to the catalog before the served deployment runs
SMALL = {"steps": 2, "height": 64, "width": 64}
# How long a process may take to come up (the server answering /api/health, `flows.serve` registering its deployments):
# polled until then. Generous: on a busy 2-core machine a Prefect API took 13-32 s to start.
STARTUP_TIMEOUT = 180
RUN_FLOW = """
import json, sys
from flows.personalize import personalize_catalog
print("REPORT " + json.dumps(personalize_catalog(**json.loads(sys.argv[1])), default=str))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    """This process's environment without Prefect or elite settings, pointed at the test server, telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ELITE_"))}
    return env | {"PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "DO_NOT_TRACK": "1", **extra}


@contextmanager
def _started(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess in a process group of its own, output to `log`; on exit the group gets SIGTERM (the server shuts
    down, serve pauses its deployments), then SIGKILL for whatever is left of it (flow run processes)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            yield process
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    pass


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _wait(what: str, check: Callable[[], Any], timeout: float, process: subprocess.Popen[bytes] | None = None,
          log: Path | None = None, seen: Any = None) -> Any:
    """Poll `check()` until it returns something truthy; fail naming `what`, with the process's output."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}:\n{_tail(log) if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{_tail(log) if log else ''}{seen if seen else ''}")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _pngs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.glob("images/*/*.png"))


def _copy_concept(concepts_dir: Path, catalog: Path, name: str) -> None:
    [image] = [p for p in concepts_dir.glob(f"{name}.*") if p.suffix in (".jpg", ".png")]
    shutil.copy(image, catalog / image.name)
    shutil.copy(concepts_dir / f"{name}_bg.png", catalog / f"{name}_bg.png")


def _finished(process: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> str:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: still running after {timeout:.0f} s\n{_tail(log)}")
    assert process.returncode == 0, f"{what} exited with {process.returncode}:\n{_tail(log)}"
    return log.read_text(errors="replace")


def _model_env(tiny_models: TinyModels) -> dict[str, str]:
    return {"ELITE_PRETRAINED_MODEL": str(tiny_models.pretrained_model),
            "ELITE_VISION_MODEL": str(tiny_models.vision_model),
            "ELITE_GLOBAL_MAPPER": str(tiny_models.global_mapper),
            "ELITE_LOCAL_MAPPER": str(tiny_models.local_mapper)}


def _catalog(tmp_path: Path, concepts_dir: Path, prompts: str) -> tuple[Path, Path, Path]:
    """A catalog of FIRST and a prompt file under tmp_path/root; returns (root, out folder, logs folder)."""
    root = tmp_path / "root"
    (root / "catalog").mkdir(parents=True)
    for name in FIRST:
        _copy_concept(concepts_dir, root / "catalog", name)
    (root / "prompts.txt").write_text(prompts)
    logs = tmp_path / "logs"
    logs.mkdir()
    return root, root / "out", logs


def _server(stack: ExitStack, tmp_path: Path, logs: Path) -> tuple[str, int, Any]:
    """`prefect server start` on a free port, waited for; returns its API URL, its port and a sync client set to
    it (this process's Prefect settings point at it until the stack closes)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_log = logs / "server.log"
    server = stack.enter_context(_started(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--no-scheduler"],
        _env(tmp_path / "server-home", api_url), server_log, tmp_path))
    _wait("the server's /api/health", lambda: _healthy(api_url), STARTUP_TIMEOUT, server, server_log)
    stack.enter_context(temporary_settings({PREFECT_API_URL: api_url}))
    return api_url, port, stack.enter_context(get_client(sync_client=True))


def test_flows_and_deployments_on_a_real_server(tiny_models: TinyModels, concepts_dir: Path, tmp_path: Path) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker

    from elite.jobs.models import MODEL_ENV

    models = _model_env(tiny_models)
    root, out, logs = _catalog(tmp_path, concepts_dir, "a photo of a S on the beach\n")
    project = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())

    with ExitStack() as stack:
        api_url, port, client = _server(stack, tmp_path, logs)

        # 1. the flow from a client process, and meanwhile the project file's deployments through `prefect deploy`
        for pool in ("elite-gpu", "elite-ray"):  # as the header of infra/prefect.yaml says
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        client.create_concurrency_limit("elite-gpu", 1)  # as `prefect concurrency-limit create elite-gpu 1`
        run_log, deploy_log = logs / "run.log", logs / "deploy.log"
        arguments = {"concepts_uri": str(root / "catalog"), "prompts_uri": str(root / "prompts.txt"),
                     "out_uri": str(out), **{name: models[var] for name, var in MODEL_ENV.items() if var in models},
                     **SMALL}
        run = stack.enter_context(_started([sys.executable, "-c", RUN_FLOW, json.dumps(arguments)],
                                           _env(tmp_path / "client-home", api_url), run_log, tmp_path))
        deploy = stack.enter_context(_started(
            [PREFECT, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"],
            _env(tmp_path / "deploy-home", api_url), deploy_log, REPO))
        [report] = [json.loads(line.removeprefix("REPORT ")) for line in
                    _finished(run, run_log, "the flow run", 300).splitlines() if line.startswith("REPORT ")]
        assert (report["encoded"], report["generated"], report["failed"]) == (len(FIRST), len(FIRST), 0)
        assert len(_pngs(out)) == len(FIRST)

        flows = {flow.id: flow.name for flow in client.read_flows()}
        runs = {flows[r.flow_id]: r for r in client.read_flow_runs()}
        assert sorted(runs) == ["encode-concepts", "generate-images", "personalize-catalog"]
        assert all(r.state_type == StateType.COMPLETED for r in runs.values()), {n: r.state for n, r in runs.items()}
        parent = runs["personalize-catalog"]
        for name in ("encode-concepts", "generate-images"):  # subflows: linked to the parent through a task run
            assert client.read_task_run(runs[name].parent_task_run_id).flow_run_id == parent.id

        def batches() -> dict[str, Any]:  # task runs reach the server as events: recorded a little later
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
                any_=[runs["encode-concepts"].id, runs["generate-images"].id])))
            # task runs are named after what they hold: "encode 1..3 (3)", "generate 1 (1)"
            done = {t.name.split(" ", 1)[0]: t for t in tasks if t.state_type == StateType.COMPLETED}
            return done if {"encode", "generate"} <= set(done) else {}

        tasks = _wait("completed batch task runs", batches, 60)
        assert re.fullmatch(r"encode \S+ \(\d+\)|encode \S+\.\.\S+ \(\d+\)", tasks["encode"].name), tasks["encode"].name
        assert "elite-gpu" in tasks["generate"].tags  # the limit exists: generation batches take its slots
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["personalize-catalog"])))
        assert artifact.type == "markdown" and artifact.flow_run_id == parent.id
        assert f"| images generated | {len(FIRST)} |" in str(artifact.data)

        # 2. what `prefect deploy` made of infra/prefect.yaml
        _finished(deploy, deploy_log, "prefect deploy", 240)
        catalog_config = next(d for d in project["deployments"] if d["name"] == "personalize-catalog")
        deployed = client.read_deployment_by_name("personalize-catalog/personalize-catalog")
        assert (deployed.work_pool_name, deployed.entrypoint) == ("elite-gpu", catalog_config["entrypoint"])
        assert deployed.parameters == catalog_config["parameters"]
        assert deployed.job_variables == catalog_config["work_pool"]["job_variables"]
        assert deployed.pull_steps == project["pull"]
        [schedule] = deployed.schedules
        assert schedule.active and schedule.schedule.model_dump(include={"cron", "timezone"}) == {
            k: catalog_config["schedules"][0][k] for k in ("cron", "timezone")}
        assert not client.read_deployment_by_name("export-embeddings/export-embeddings").schedules

        # 3. `python -m flows.serve` takes the deployments over and runs one through the API
        _copy_concept(concepts_dir, root / "catalog", ADDED)
        serve_log = logs / "serve.log"
        params = [f"--param={k}={v}" for k, v in SMALL.items()]
        serve = stack.enter_context(_started(
            [sys.executable, "-m", "flows.serve", "--concepts-uri", str(root / "catalog"), "--prompts-uri",
             str(root / "prompts.txt"), "--out-uri", str(out), *params],
            _env(tmp_path / "serve-home", api_url, PREFECT_RUNNER_POLL_FREQUENCY="1", **models), serve_log, tmp_path))

        def served() -> Any:
            found = client.read_deployment_by_name("personalize-catalog/personalize-catalog")
            return found if found.entrypoint == "flows.personalize.personalize_catalog" else None

        taken = _wait("the served deployment", served, STARTUP_TIMEOUT, serve, serve_log)
        assert (taken.work_pool_name, taken.pull_steps, taken.parameters["steps"]) == (None, None, 2)
        flow_run = run_deployment("personalize-catalog/personalize-catalog", timeout=240, poll_interval=1)
        assert flow_run.state_type == StateType.COMPLETED, f"{flow_run.state}\n{_tail(serve_log)}"
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["personalize-catalog"])), flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        assert "| concepts encoded | 1 |" in str(artifact.data) and "| images generated | 1 |" in str(artifact.data)
        assert len(_pngs(out)) == len(FIRST) + 1
        assert serve.poll() is None

    with socket.socket() as probe:  # the server and the runner are gone: nothing listens on the port
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_ray_deployment_run_by_a_process_worker(tiny_models: TinyModels, concepts_dir: Path, tmp_path: Path) -> None:
    """personalize-catalog-ray of infra/prefect.yaml, its `edit` values filled in as a user would (the checkout's
    path, the catalog, the models, the Ray head), deployed with `prefect deploy`, run by `prefect worker start`
    (a process worker) with its batches on a local Ray cluster. The batches' task runs are on this server: the
    Ray workers reported to it, not to a temporary server of their own."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker
    from ray.cluster_utils import Cluster

    root, out, logs = _catalog(tmp_path, concepts_dir, "a photo of a S on the beach\na painting of a S\n")
    project = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    [deployment] = [d for d in project["deployments"] if d["name"] == "personalize-catalog-ray"]
    project["deployments"] = [deployment]
    project["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] = str(REPO)
    deployment["parameters"] |= {"concepts_uri": str(root / "catalog"), "prompts_uri": str(root / "prompts.txt"),
                                 "out_uri": str(out), "generate_batch_size": 1, **SMALL}
    deployment["work_pool"]["job_variables"]["env"] |= _model_env(tiny_models)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        deployment["parameters"]["ray_address"] = cluster.address
        project_file = tmp_path / "prefect.yaml"
        project_file.write_text(yaml.safe_dump(project, sort_keys=False))

        with ExitStack() as stack:
            api_url, _, client = _server(stack, tmp_path, logs)
            client.create_work_pool(WorkPoolCreate(name="elite-ray", type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            deploy_log = logs / "deploy.log"
            deploy = stack.enter_context(_started(
                [PREFECT, "--no-prompt", "deploy", "--prefect-file", str(project_file), "-n",
                 "personalize-catalog-ray"], _env(tmp_path / "deploy-home", api_url), deploy_log, REPO))
            _finished(deploy, deploy_log, "prefect deploy", 240)
            worker_log = logs / "worker.log"
            worker = stack.enter_context(_started(
                [PREFECT, "worker", "start", "--pool", "elite-ray", "--type", "process"],
                _env(tmp_path / "worker-home", api_url, PREFECT_WORKER_QUERY_SECONDS="1"), worker_log, tmp_path))

            flow_run = run_deployment("personalize-catalog/personalize-catalog-ray", timeout=420, poll_interval=1)
            assert flow_run.state_type == StateType.COMPLETED, f"{flow_run.state}\n{_tail(worker_log, 8000)}"
            assert worker.poll() is None
            pngs = _pngs(out)
            assert len(pngs) == 2 * len(FIRST)
            runs = client.read_flow_runs()
            generate = [r for r in runs if r.parent_task_run_id is not None
                        and client.read_flow(r.flow_id).name == "generate-images"]
            assert len(generate) == 1

            seen: list[Any] = []

            def batches() -> list[Any]:  # recorded by the Ray workers through this server's API
                tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[generate[0].id])))
                seen[:] = [(t.name, t.state_type) for t in tasks]
                done = [t for t in tasks if t.name.startswith("generate ") and t.state_type == StateType.COMPLETED]
                return done if len(done) == len(pngs) else []

            _wait("the Ray workers' task runs on this server", batches, 60, seen=seen)
    finally:
        ray.shutdown()
        cluster.shutdown()
