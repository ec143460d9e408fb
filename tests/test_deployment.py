"""The deployments, without a server: infra/prefect.yaml read by Prefect's own project-file model, each entrypoint
loaded as `prefect deploy` and a worker load it, its parameters checked against the flow's signature, its schedule
built as `prefect deploy` builds it; and the deployments `python -m flows.serve` builds."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "infra" / "prefect.yaml"


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(PREFECT_FILE.read_text())
    PrefectYamlModel.model_validate(raw)  # what `prefect deploy` validates the file with (it skips a bad one)
    return raw


def _deployment(project: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [d for d in project["deployments"] if d["name"] == name]
    return found


def _load(entrypoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The flow at a file entrypoint, imported for real (no placeholder flow on an import error); the loader puts
    the file's folder on sys.path for good, so sys.path is restored after the test."""
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)  # file entrypoints are relative to the project root, where `prefect deploy` runs
    monkeypatch.setattr(sys, "path", list(sys.path))
    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def _cron(config: dict[str, Any]) -> Any:
    """A schedule of the file as the server's scheduler sees it, built by `prefect deploy`'s own code."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.server.schemas.schedules import CronSchedule

    schedule = _schedule_config_to_deployment_schedule(config)["schedule"]
    return CronSchedule(**schedule.model_dump())


def test_prefect_file_deployments(project: dict[str, Any]) -> None:
    assert sorted(d["name"] for d in project["deployments"]) == ["export-embeddings", "personalize-catalog",
                                                                  "personalize-catalog-ray"]
    assert {d["name"]: d["work_pool"]["name"] for d in project["deployments"]} == {
        "export-embeddings": "elite-gpu", "personalize-catalog": "elite-gpu", "personalize-catalog-ray": "elite-ray"}
    ray = _deployment(project, "personalize-catalog-ray")
    assert ray["parameters"]["runner"] == "ray" and ray["parameters"]["ray_address"].startswith("ray://")
    assert ray["schedules"] == []  # never two nightly runs of one catalog
    [step] = project["pull"]
    assert Path(step["prefect.deployments.steps.set_working_directory"]["directory"]).is_absolute()


@pytest.mark.parametrize(("name", "flow_name"), [("personalize-catalog", "personalize-catalog"),
                                                 ("personalize-catalog-ray", "personalize-catalog"),
                                                 ("export-embeddings", "export-embeddings")])
def test_entrypoint_and_parameters(project: dict[str, Any], name: str, flow_name: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = _deployment(project, name)
    flow = _load(deployment["entrypoint"], monkeypatch)
    assert flow.name == flow_name
    flow.validate_parameters(deployment["parameters"])  # required ones present, types right, no unknown names


def test_job_variables_are_settings_elite_reads(project: dict[str, Any]) -> None:
    from elite.data.storage import StorageSettings, storage_settings_from_env
    from elite.jobs.models import MODEL_ENV

    s3_names = {f"ELITE_S3_{field.name.upper()}" for field in dataclasses.fields(StorageSettings)}
    for deployment in project["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert all(isinstance(value, str) for value in env.values())  # a process environment holds strings
        assert set(env) <= s3_names | set(MODEL_ENV.values()), sorted(set(env) - s3_names - set(MODEL_ENV.values()))
        assert not {name for name in env if "SECRET" in name or "SESSION_TOKEN" in name}  # stored in the deployment
        storage_settings_from_env(env)  # every value parses
    for name in ("personalize-catalog", "personalize-catalog-ray"):
        models = _deployment(project, name)["work_pool"]["job_variables"]["env"]
        assert {"ELITE_PRETRAINED_MODEL", "ELITE_VISION_MODEL", "ELITE_GLOBAL_MAPPER",
                "ELITE_LOCAL_MAPPER"} <= set(models)


def test_schedules(project: dict[str, Any]) -> None:
    from flows.serve import CRON, TIMEZONE

    [config] = _deployment(project, "personalize-catalog")["schedules"]
    schedule = _cron(config)
    assert (schedule.cron, schedule.timezone) == (CRON, TIMEZONE)  # both deployment paths run at the same time
    dates = asyncio.run(schedule.get_dates(n=3))
    assert len(dates) == 3 and dates[0] > datetime.datetime.now(datetime.UTC)
    assert _deployment(project, "export-embeddings")["schedules"] == []  # on demand, and `prefect deploy` won't ask


def test_serve_builds_the_deployments(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.export import export_embeddings
    from flows.personalize import personalize_catalog
    from flows.serve import build_deployments

    catalog, export = build_deployments("s3://b/concepts", "s3://b/prompts.txt", "s3://b/out", cron="30 3 * * 1",
                                        timezone="Europe/Berlin", parameters={"steps": 50, "devices": ["cuda:0"]})
    assert (catalog.name, export.name) == ("personalize-catalog", "export-embeddings")
    [schedule] = catalog.schedules or []
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 3 * * 1", "Europe/Berlin",
                                                                                    True)
    assert catalog.parameters == {"concepts_uri": "s3://b/concepts", "prompts_uri": "s3://b/prompts.txt",
                                  "out_uri": "s3://b/out", "steps": 50, "devices": ["cuda:0"]}
    assert catalog.concurrency_limit == 1
    assert not export.schedules and export.parameters == {"store_uri": "s3://b/out/embeddings"}
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir("/")  # module entrypoints load from anywhere the package is installed
    assert load_flow_from_entrypoint(str(catalog.entrypoint)) is personalize_catalog
    assert load_flow_from_entrypoint(str(export.entrypoint)) is export_embeddings


def test_serve_refuses_bad_parameters_and_missing_models(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.exceptions import ParameterTypeError

    from elite.jobs.models import MODEL_ENV
    from flows.serve import build_deployments, main

    with pytest.raises(ParameterTypeError, match="steps"):
        build_deployments("a", "b", "c", parameters={"steps": "many"})
    for var in MODEL_ENV.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as exit_:  # before registering anything with the API
        main(["--concepts-uri", "a", "--prompts-uri", "b", "--out-uri", "c", "--param", "steps=3"])
    assert exit_.value.code == 2 and "ELITE_PRETRAINED_MODEL" in capsys.readouterr().err
