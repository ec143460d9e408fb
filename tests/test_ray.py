"""The Ray runner of the flows on a real local Ray cluster: a head node with no CPUs (the flow's side) and a
worker node with 2 CPUs (2 worker processes at a time), tiny models, the stores on moto's S3 server on 127.0.0.1.

The worker node's processes are started by Ray, not by the test: they get the S3 credentials from their own
environment (AWS_* set before the node starts, as on a real worker host), and the endpoint and the Prefect API
URL from what the run forwards to them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from elite.data.storage import ObjectStore, open_store
from elite.errors import InputError
from elite.fileio import sha256_bytes
from elite.model.tiny import TinyModels

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster
    from s3_server import MotoS3

pytest_plugins = ["s3_server"]
ray = pytest.importorskip("ray")
pytest.importorskip("prefect_ray")

CONCEPTS = ("1", "7", "10")
PROMPTS = ('{"prompt": "a photo of a S", "images": 2}\n{"prompt": "a S in the snow", "concept_id": "7"}\n'
           '{"prompt": "a painting of a S"}\n')
IMAGES = 3 * 2 + 1 + 3  # 10
# Columns that say when, how fast and where an image was made; every other manifest column is the same whichever
# runner made it (the output URI names the output location, which each run here has its own of)
PLACEMENT = ("seconds", "created_at", "device", "slot", "output_uri")


def _start_cluster() -> Cluster:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return cluster


@pytest.fixture(scope="module")
def s3_env(s3_server: MotoS3) -> Iterator[dict[str, str]]:
    """The S3 settings for the flow (endpoint, retries) and AWS credentials in this process's environment before
    any Ray node starts, so the nodes' worker processes inherit the credentials (the run forwards no secret)."""
    settings = s3_server.settings()
    env = {f"ELITE_S3_{name.upper()}": str(getattr(settings, name)) for name in
           ("endpoint_url", "region", "max_attempts", "connect_timeout", "read_timeout")}
    env |= {"AWS_ACCESS_KEY_ID": str(settings.access_key_id), "AWS_SECRET_ACCESS_KEY": str(settings.secret_access_key)}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def ray_cluster(s3_env: dict[str, str]) -> Iterator[Cluster]:
    cluster = _start_cluster()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _models(tiny: TinyModels) -> dict[str, str]:
    return {"pretrained_model": str(tiny.pretrained_model), "global_mapper": str(tiny.global_mapper),
            "local_mapper": str(tiny.local_mapper)}


@pytest.fixture(scope="module")
def catalog(prefect_harness: None, tiny_models: TinyModels, concepts_dir: Path, s3_server: MotoS3,
            s3_env: dict[str, str]) -> dict[str, str]:
    """Three concepts encoded (thread runner) into a table on S3, and a prompt file: 10 images to make."""
    from flows.encode import encode_concepts

    root = f"s3://{s3_server.bucket}/ray-{uuid.uuid4().hex}"
    source = open_store(f"{root}/catalog")
    for name in CONCEPTS:
        source.put(f"{name}.jpg", concepts_dir / f"{name}.jpg")
        source.put(f"{name}_bg.png", concepts_dir / f"{name}_bg.png")
    open_store(root).put("prompts.jsonl", PROMPTS.encode())
    encoded = encode_concepts(f"{root}/catalog", f"{root}/embeddings", vision_model=str(tiny_models.vision_model),
                              **_models(tiny_models))
    assert encoded["failed"] == 0
    return {"root": root, "store": f"{root}/embeddings", "prompts": f"{root}/prompts.jsonl",
            "encoder_id": encoded["encoder_id"]}


def _generate(catalog: dict[str, str], tiny: TinyModels, out: str, **kwargs: Any) -> dict[str, Any]:
    from flows.generate import generate_images

    result: dict[str, Any] = generate_images(catalog["store"], catalog["prompts"], out, **_models(tiny),
                                             encoder_id=catalog["encoder_id"], steps=2, height=64, width=64,
                                             batch_size=1, **kwargs)
    return result


def _images(out: ObjectStore) -> dict[str, str]:
    return {i.key: sha256_bytes(out.get(i.key)) for i in out.list() if i.key.endswith(".png")}


def _manifest(out: ObjectStore) -> pa.Table:
    [key] = [i.key for i in out.list("_runs/") if i.key.endswith(".parquet") and "failures" not in i.key]
    return pq.read_table(io.BytesIO(out.get(key)))


def _comparable(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.drop_columns(list(PLACEMENT)).to_pylist()
    return sorted(rows, key=lambda row: row["output_key"])


def _check_exactly_once(out: ObjectStore, run: dict[str, Any]) -> pa.Table:
    """Every image written has one manifest row, every row its image, with the image's hash; no batch files left."""
    manifest = _manifest(out)
    images = _images(out)
    keys = manifest.column("output_key").to_pylist()
    assert len(keys) == len(set(keys)) == run["generated"]
    assert {row["output_key"]: row["sha256"] for row in manifest.to_pylist()} == images
    assert not [i.key for i in out.list("_runs/") if "/batch-" in i.key]
    return manifest


def _ray_worker_pids(task_name: str) -> list[int]:
    """Processes whose title says they run `task_name` now (Ray titles a busy worker `ray::<task name>`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{task_name}"):
                pids.append(int(entry.name))
    return pids


def test_ray_runner_makes_the_same_images_and_survives_a_killed_worker(
        ray_cluster: Cluster, catalog: dict[str, str], tiny_models: TinyModels) -> None:
    threads_out = f"{catalog['root']}/images-threads"
    # A CPU batch on Ray asks for 1 CPU, and Ray runs it with 1 thread (OMP_NUM_THREADS=1): torch's CPU kernels
    # sum in another order with another thread count, so the reference run uses 1 thread too
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        by_threads = _generate(catalog, tiny_models, threads_out, devices=["cpu"])
    finally:
        torch.set_num_threads(saved)
    assert (by_threads["generated"], by_threads["failed"]) == (IMAGES, 0)

    ray_out = f"{catalog['root']}/images-ray"
    by_ray = _generate(catalog, tiny_models, ray_out, runner="ray", ray_address=ray_cluster.address)
    assert (by_ray["generated"], by_ray["failed"], by_ray["devices"]) == (IMAGES, 0, ["ray:auto"])
    threads_manifest = _check_exactly_once(open_store(threads_out), by_threads)
    ray_manifest = _check_exactly_once(open_store(ray_out), by_ray)
    assert _images(open_store(ray_out)) == _images(open_store(threads_out))  # byte for byte
    assert _comparable(ray_manifest) == _comparable(threads_manifest)
    assert set(ray_manifest.column("device").to_pylist()) == {"cpu"}
    # 2 worker processes: each loads the pipeline once and keeps it, so no more than 2 ever ran batches
    assert ray_manifest.column("batch_size").to_pylist() == [1] * IMAGES

    # a worker process SIGKILLed in the middle of a batch: Ray runs that batch again on another worker
    killed: list[int] = []

    def kill_first_busy_worker() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            for pid in _ray_worker_pids("generate_batch_task"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_busy_worker, daemon=True)
    killer.start()
    killed_out = f"{catalog['root']}/images-killed"
    after_kill = _generate(catalog, tiny_models, killed_out, runner="ray", ray_address=ray_cluster.address)
    killer.join(timeout=5)
    assert killed, "no Ray worker was seen running a batch"
    assert (after_kill["generated"], after_kill["failed"]) == (IMAGES, 0)
    _check_exactly_once(open_store(killed_out), after_kill)
    assert _images(open_store(killed_out)) == _images(open_store(threads_out))


def test_a_lost_host_ends_the_run_with_failures_and_a_rerun_finishes(
        s3_env: dict[str, str], catalog: dict[str, str], tiny_models: TinyModels) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out_uri = f"{catalog['root']}/images-lost"
    out = open_store(out_uri)
    try:
        def lose_the_host_after_three_images() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and len([i for i in out.list() if i.key.endswith(".png")]) < 3:
                time.sleep(0.05)
            cluster.remove_node(node)  # the only node with CPUs: no batch can be placed any more

        loser = threading.Thread(target=lose_the_host_after_three_images, daemon=True)
        loser.start()
        run = _generate(catalog, tiny_models, out_uri, runner="ray", ray_address=cluster.address,
                        ray_stall_timeout=20)
        loser.join(timeout=30)
        assert 0 < run["generated"] < IMAGES
        assert run["generated"] + run["failed"] == IMAGES  # nothing lost: made, or a failure row
        reasons = {f["reason"] for f in run["failures"]}
        assert all("BatchNotFinished" in r and "no Ray worker finished a batch for 20 s" in r for r in reasons)
        failures = pq.read_table(io.BytesIO(out.get(run["failures_uri"].split(f"{out_uri}/", 1)[1])))
        assert failures.num_rows == run["failed"]
        # every row has its image; an image without a row is one of a batch cut off between its PNG and its rows
        # (a failure row here; the rerun makes it again, same bytes, with its row)
        manifest = _manifest(out)
        images = _images(out)
        assert all(images[row["output_key"]] == row["sha256"] for row in manifest.to_pylist())
        unrecorded = set(images) - set(manifest.column("output_key").to_pylist())
        assert unrecorded <= {uri.split(f"{out_uri}/", 1)[1] for uri in failures.column("uri").to_pylist()}

        # the host comes back (or another joins): a rerun makes what is missing, nothing twice
        ray.shutdown()
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rerun = _generate(catalog, tiny_models, out_uri, runner="ray", ray_address=cluster.address)
        assert (rerun["generated"], rerun["skipped"], rerun["failed"]) == (run["failed"], run["generated"], 0)
        assert len(_images(out)) == IMAGES
        runs = [i.key for i in out.list("_runs/") if i.key.endswith(".parquet") and "failures" not in i.key]
        rows = pa.concat_tables([pq.read_table(io.BytesIO(out.get(key))) for key in runs]).to_pylist()
        assert sorted(row["output_key"] for row in rows) == sorted(_images(out))  # each image once, in one run
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_settings_are_checked_before_any_work(prefect_harness: None, catalog: dict[str, str],
                                                  tiny_models: TinyModels) -> None:
    with pytest.raises(InputError, match="runner must be one of threads, ray"):
        _generate(catalog, tiny_models, f"{catalog['root']}/none", runner="dask")
    with pytest.raises(InputError, match="ray_stall_timeout"):
        _generate(catalog, tiny_models, f"{catalog['root']}/none", runner="ray", ray_stall_timeout=0)
    with pytest.raises(InputError, match="all 'cpu' or all 'cuda"):
        _generate(catalog, tiny_models, f"{catalog['root']}/none", runner="ray", devices=["cpu", "cuda:0"])
    assert not list(open_store(f"{catalog['root']}/none").list())


def test_workers_get_the_api_url_and_no_secrets() -> None:
    from flows._ray import batch_resources, check_api_reachable, worker_env

    env = worker_env("http://prefect.internal:4200/api", {
        "ELITE_S3_ENDPOINT_URL": "http://minio:9000", "ELITE_S3_SECRET_ACCESS_KEY": "s", "ELITE_S3_ACCESS_KEY_ID": "a",
        "ELITE_S3_SESSION_TOKEN": "t", "ELITE_PRETRAINED_MODEL": "/models/sd", "AWS_SECRET_ACCESS_KEY": "s",
        "PREFECT_API_KEY": "k", "DO_NOT_TRACK": "1", "HOME": "/root"})
    assert env == {"ELITE_S3_ENDPOINT_URL": "http://minio:9000", "ELITE_PRETRAINED_MODEL": "/models/sd",
                   "DO_NOT_TRACK": "1", "PREFECT_API_URL": "http://prefect.internal:4200/api",
                   "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.1"}  # sent before Ray stops the workers
    # an ephemeral (loopback) API is fine while every node is this host, refused once one is not
    check_api_reachable("http://127.0.0.1:8123/api", ["10.0.0.5"], ["10.0.0.5", "127.0.0.1"])
    with pytest.raises(InputError, match=r"10\.0\.0\.9.*cannot reach.*PREFECT_API_URL"):
        check_api_reachable("http://127.0.0.1:8123/api", ["10.0.0.5", "10.0.0.9"], ["10.0.0.5", "127.0.0.1"])
    check_api_reachable("http://prefect.internal:4200/api", ["10.0.0.9"], ["10.0.0.5"])
    # one GPU per batch where the cluster has GPUs; the CPU otherwise, or when asked
    assert batch_resources("auto", {"CPU": 32.0, "GPU": 8.0}) == {"num_gpus": 1}
    assert batch_resources("auto", {"CPU": 2.0}) == {"num_cpus": 1}
    assert batch_resources("cpu", {"CPU": 32.0, "GPU": 8.0}) == {"num_cpus": 1}
    with pytest.raises(InputError, match="no GPU"):
        batch_resources("cuda", {"CPU": 2.0})


def test_personalize_from_the_cli_with_both_steps_on_ray(ray_cluster: Cluster, prefect_harness: None,
                                                         tiny_models: TinyModels, concepts_dir: Path,
                                                         tmp_path: Path) -> None:
    """`elite personalize --runner ray`: the encode batches (the encoder loaded on the workers, its id asked from
    them) and the generation batches run on the cluster; the stored embeddings equal a thread-runner encode's."""
    from elite.data.storage import embedding_store
    from elite_cli.main import main
    from flows.encode import encode_concepts

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for name in CONCEPTS:
        (catalog / f"{name}.jpg").write_bytes((concepts_dir / f"{name}.jpg").read_bytes())
        (catalog / f"{name}_bg.png").write_bytes((concepts_dir / f"{name}_bg.png").read_bytes())
    (tmp_path / "prompts.txt").write_text("a photo of a S\n")
    models = [f"--{name.replace('_', '-')}={value}" for name, value in _models(tiny_models).items()]
    code = main(["personalize", "--concepts", str(catalog), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                 str(tmp_path / "out"), *models, f"--vision-model={tiny_models.vision_model}", "--steps", "2",
                 "--height", "64", "--width", "64", "--encode-batch-size", "1", "--runner", "ray",
                 "--ray-address", ray_cluster.address])
    assert code == 0
    assert len(list((tmp_path / "out" / "images").glob("*/*.png"))) == len(CONCEPTS)
    on_ray = {c.concept_id: c for c in embedding_store(str(tmp_path / "out" / "embeddings")).read_embeddings()}

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray CPU batch
    try:
        encode_concepts(str(catalog), str(tmp_path / "threads"), vision_model=str(tiny_models.vision_model),
                        **_models(tiny_models))
    finally:
        torch.set_num_threads(saved)
    by_threads = {c.concept_id: c for c in embedding_store(str(tmp_path / "threads")).read_embeddings()}
    assert sorted(on_ray) == sorted(by_threads) == sorted(CONCEPTS)
    for cid, concept in on_ray.items():
        torch.testing.assert_close(concept.words, by_threads[cid].words, rtol=0, atol=1e-6)
        # stored as float16: a float32 difference of one in a million may round to the neighbouring half
        torch.testing.assert_close(concept.local_tokens, by_threads[cid].local_tokens, rtol=2 ** -10, atol=1e-6)


def test_the_cli_refuses_bad_ray_settings_before_prefect_starts(tmp_path: Path) -> None:
    from elite_cli.main import main

    (tmp_path / "catalog").mkdir()
    with pytest.raises(SystemExit):  # argparse: exit 2 with its usage line
        main(["personalize", "--concepts", str(tmp_path / "catalog"), "--out", str(tmp_path / "out"),
              "--runner", "ray", "--ray-stall-timeout", "0"])
    assert not (tmp_path / "out").exists()


DRIVER = """
import json, sys
from flows.generate import generate_images
print("REPORT " + json.dumps(generate_images(**json.loads(sys.argv[1])), default=str))
"""


def test_a_killed_driver_is_finished_by_a_rerun(ray_cluster: Cluster, catalog: dict[str, str],
                                                tiny_models: TinyModels, tmp_path: Path) -> None:
    """The flow run's own process (the Ray driver) SIGKILLed midway: Ray stops its batches; a rerun makes what is
    missing, and across both runs every image has exactly one manifest row."""
    import subprocess
    import sys

    from flows._ray import prefect_api_url

    out_uri = f"{catalog['root']}/images-driver-killed"
    out = open_store(out_uri)
    arguments = {"store_uri": catalog["store"], "prompts_uri": catalog["prompts"], "out_uri": out_uri,
                 **_models(tiny_models), "encoder_id": catalog["encoder_id"], "steps": 2, "height": 64, "width": 64,
                 "batch_size": 1, "runner": "ray", "ray_address": ray_cluster.address}
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url()}  # this session's test server
    log = tmp_path / "driver.log"
    with log.open("wb") as output:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(arguments)], env=env, stdout=output,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while len([i for i in out.list() if i.key.endswith(".png")]) < 3:
                assert driver.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "the driver made no 3 images in 300 s"
                time.sleep(0.05)
        finally:
            driver.kill()
            driver.wait(60)
    made = len([i for i in out.list() if i.key.endswith(".png")])
    assert 3 <= made < IMAGES
    assert not [i.key for i in out.list("_runs/") if i.key.endswith(".parquet") and "/" not in i.key[6:]]

    rerun = _generate(catalog, tiny_models, out_uri, runner="ray", ray_address=ray_cluster.address)
    assert rerun["failed"] == 0 and rerun["generated"] + rerun["skipped"] == IMAGES
    images = _images(out)
    assert len(images) == IMAGES
    keys = [i.key for i in out.list("_runs/") if i.key.endswith(".parquet") and "failures" not in i.key]
    rows = pa.concat_tables([pq.read_table(io.BytesIO(out.get(key))) for key in keys]).to_pylist()
    assert sorted(row["output_key"] for row in rows) == sorted(images)  # each image once: a batch file or a run's
    assert all(images[row["output_key"]] == row["sha256"] for row in rows)


def test_a_worker_given_another_gpu_than_its_models_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reused Ray worker keeps its CUDA context: handed a batch for another GPU, it exits (Ray reruns the batch
    on a fresh worker) instead of running it on the GPU its models sit on."""
    import flows._ray as ray_runner

    given: list[list[int]] = [[3]]
    exits: list[int] = []
    monkeypatch.setattr(ray_runner, "_BOUND_GPUS", [])
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: given[0])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(os, "_exit", exits.append)
    assert ray_runner.worker_devices() == ["cuda:0"]  # CUDA_VISIBLE_DEVICES names only GPU 3: cuda:0 here
    assert ray_runner.worker_devices() == ["cuda:0"] and not exits
    given[0] = [5]
    ray_runner.worker_devices()
    assert exits == [75]
    given[0] = []
    assert ray_runner.worker_devices() == ["cpu"]
