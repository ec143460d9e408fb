"""Manifest defects and settings that used to fail a whole batch, or to give a silent wrong result with exit 0:
each is now the item's failure row, a column fixed once per manifest with a warning, or one clear error before any
work, through the CLI and through the flows."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from elite.data.store import EmbeddingStore
from elite.errors import InputError
from elite.model.tiny import TinyModels
from elite_cli.main import main


def _models(tiny: TinyModels, vision: bool = True) -> list[str]:
    args = ["--pretrained-model", str(tiny.pretrained_model), "--global-mapper", str(tiny.global_mapper),
            "--local-mapper", str(tiny.local_mapper), "--device", "cpu"]
    return args + (["--vision-model", str(tiny.vision_model)] if vision else [])


@pytest.fixture
def catalog(tmp_path: Path, concepts_dir: Path) -> Path:
    folder = tmp_path / "catalog"
    folder.mkdir()
    for name in ("1", "2", "3"):
        shutil.copy(concepts_dir / f"{name}.jpg", folder / f"{name}.jpg")
    rows = [{"concept_id": "a", "image": "1.jpg", "sku": 1, "price": 10},
            {"concept_id": "b", "image": "2.jpg", "sku": "B-2", "price": 10.5},
            {"concept_id": "c", "image": "3.jpg", "sku": 3},
            {"concept_id": "web", "image": "http://example.invalid/x.jpg"},  # a scheme no store serves
            {"concept_id": "x" * 230, "image": "1.jpg"}]
    (folder / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "m.csv").write_text("concept_id,image,shop,\na,1.jpg,s1,\nb,2.jpg,s2,\n")  # a trailing comma
    (folder / "clash.csv").write_text("concept_id,image,source_uri\na,1.jpg,x\n")
    return folder


def _check_manifest_run(failures: list[dict[str, Any]], store: Path) -> None:
    reasons = {row["concept_id"] or row["uri"].rpartition(":")[2]: row["reason"] for row in failures}
    assert set(reasons) == {"web", "5"}, reasons  # the http:// row, and line 5 (the id too long)
    assert "unsupported storage scheme 'http'" in reasons["web"] and "bytes long" in reasons["5"]
    info = {row["concept_id"]: row for row in EmbeddingStore(store).read_info().to_pylist()}
    assert sorted(info) == ["a", "b", "c"]  # one batch, mixed column types and all: encoded
    assert [info[c]["sku"] for c in "abc"] == ["1", "B-2", "3"] and info["a"]["price"] == 10.0


def test_manifest_defects_through_the_cli(catalog: Path, tiny_models: TinyModels, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert main(["encode", str(catalog), "--store", str(store), "--manifest", "m.jsonl", *_models(tiny_models)]) == 1
    err = capsys.readouterr().err
    assert "column 'sku' holds int and str values; all are kept as text" in err
    import pyarrow.parquet as pq

    [table] = (store / "_runs").glob("encode-*-failures.parquet")
    _check_manifest_run(pq.read_table(table).to_pylist(), store)
    csv_store = tmp_path / "csv-store"
    assert main(["encode", str(catalog), "--store", str(csv_store), "--manifest", "m.csv",
                 *_models(tiny_models)]) == 0
    assert "a column without a name is ignored" in capsys.readouterr().err
    names = EmbeddingStore(csv_store).read_info().column_names
    assert "shop" in names and "" not in names  # the column without a name was dropped, the others kept
    assert main(["encode", str(catalog), "--store", str(tmp_path / "s3"), "--manifest", "clash.csv",
                 *_models(tiny_models)]) == 1
    assert "column 'source_uri' has the name of a column the embedding store keeps" in capsys.readouterr().err
    assert not (tmp_path / "s3").exists()


def test_manifest_defects_through_the_flow(prefect_harness: None, catalog: Path, tiny_models: TinyModels,
                                           tmp_path: Path) -> None:
    from flows.encode import encode_concepts

    store = tmp_path / "store"
    report = encode_concepts(str(catalog), str(store), manifest="m.jsonl", vision_model=str(tiny_models.vision_model),
                             global_mapper=str(tiny_models.global_mapper), local_mapper=str(tiny_models.local_mapper),
                             pretrained_model=str(tiny_models.pretrained_model), device="cpu")
    _check_manifest_run(report["failures"], store)


BAD_GENERATE = {
    "lambda nan": (["--lambda-local", "nan"], "lambda_local must be a finite number"),
    "guidance nan": (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    "steps -3": (["--steps", "-3"], "steps must be an integer from 1 to 1000"),
    "steps 0": (["--steps", "0"], "steps must be an integer from 1 to 1000"),
    "images 0": (["--images-per-prompt", "0"], "images must be an integer from 1 to 1000"),
    "images -1": (["--images-per-prompt", "-1"], "images must be an integer from 1 to 1000"),
    "images 1e8": (["--images-per-prompt", "100000000"], "images must be an integer from 1 to 1000"),
    "empty prompts": (["--prompts", "{tmp}/empty.txt"], "no prompts in the file"),
    "comments only": (["--prompts", "{tmp}/comments.txt"], "no prompts in the file"),
    "unknown encoder": (["--encoder-id", "torch-0000"], "is stored under encoder 'torch-0000'"),
    "compile backend": (["--compile", "nope"], "compile_backend must be one of torch.compile's backends"),
}


@pytest.fixture(scope="module")
def one_concept_store(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels, concepts_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("one")
    shutil.copy(concepts_dir / "1.jpg", folder / "1.jpg")
    store = folder / "store"
    assert main(["encode", str(folder), "--store", str(store), *_models(tiny_models)]) == 0
    return store


@pytest.mark.parametrize("case", sorted(BAD_GENERATE))
def test_bad_generation_settings_are_one_error_before_any_work(case: str, one_concept_store: Path,
                                                               tiny_models: TinyModels, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "comments.txt").write_text("# only\n\n   # comments\n")
    extra, expected = BAD_GENERATE[case]
    prompt = [] if "--prompts" in extra else ["--prompt", "a photo of S"]
    out = tmp_path / "out"
    code = main(["generate", "--store", str(one_concept_store), "--out", str(out), "--height", "64", "--width",
                 "64", *prompt, *(arg.format(tmp=tmp_path) for arg in extra), *_models(tiny_models, vision=False)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("elite: error: ") and expected in err[-1], err
    assert not out.exists()


def test_generate_compiles_the_unet_when_asked(one_concept_store: Path, tiny_models: TinyModels,
                                               tmp_path: Path) -> None:
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    for out, extra in ((plain, ["--no-channels-last"]), (compiled, ["--compile", "eager", "--channels-last"])):
        code = main(["generate", "--store", str(one_concept_store), "--out", str(out), "--height", "64", "--width",
                     "64", "--steps", "2", "--prompt", "a photo of S", *extra, *_models(tiny_models, vision=False)])
        assert code == 0
    [a], [b] = (sorted(folder.rglob("*.png")) for folder in (plain, compiled))
    difference = np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16))
    assert difference.max() <= 1  # the same image, up to rounding of a value in 255


def test_a_batch_that_runs_out_of_gpu_memory_is_split_and_gives_the_same_images(
        one_concept_store: Path, tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from elite.model.pipeline import ElitePipeline

    def run(out: Path) -> dict[str, np.ndarray]:
        code = main(["generate", "--store", str(one_concept_store), "--out", str(out), "--height", "64", "--width",
                     "64", "--steps", "2", "--prompt", "a photo of S", "--images-per-prompt", "5", "--batch-size",
                     "5", "--channels-last", *_models(tiny_models, vision=False)])  # its own cached pipeline
        assert code == 0
        return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.rglob("*.png"))}

    whole = run(tmp_path / "whole")
    calls: list[int] = []
    real_call = ElitePipeline.__call__

    def small_memory(self: ElitePipeline, prompt: Any, concepts: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["seed"]))
        if len(kwargs["seed"]) > 2:  # what a GPU says when the batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, prompt, concepts, **kwargs)

    monkeypatch.setattr(ElitePipeline, "__call__", small_memory)
    caplog.set_level(logging.WARNING, logger="elite")
    split = run(tmp_path / "split")
    assert split.keys() == whole.keys() and len(whole) == 5
    assert all(np.abs(split[name] - whole[name]).max() <= 1 for name in whole)  # batch-size rounding at most
    assert calls == [5, 3, 2, 1, 2] and "did not fit in the memory of cpu" in caplog.text


def test_the_generate_flow_refuses_bad_settings_before_any_work(prefect_harness: None, one_concept_store: Path,
                                                                tiny_models: TinyModels, tmp_path: Path) -> None:
    from flows.generate import generate_images

    (tmp_path / "p.txt").write_text("a photo of S\n")
    for bad in ({"lambda_local": math.nan}, {"guidance_scale": math.inf}, {"steps": 0}, {"compile_backend": "x"}):
        state = generate_images(str(one_concept_store), str(tmp_path / "p.txt"), str(tmp_path / "out"),
                                str(tiny_models.pretrained_model), str(tiny_models.global_mapper),
                                str(tiny_models.local_mapper), height=64, width=64, return_state=True, **bad)
        assert state.is_failed()
        with pytest.raises(InputError, match="must be"):
            state.result()
    assert not (tmp_path / "out").exists()
