from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from elite.data.sources import find_concepts
from elite.data.store import EmbeddingStore
from elite.data.store_format import EmbeddingRecord
from elite.fileio import sha256_file
from elite.model.concepts import ConceptEmbedding
from elite.model.onnx_encoder import OnnxConceptEncoder
from elite.model.tiny import TinyModels
from elite_cli.main import main


def _model_args(tiny: TinyModels, vision: bool = True) -> list[str]:
    args = ["--pretrained-model", str(tiny.pretrained_model), "--global-mapper", str(tiny.global_mapper),
            "--local-mapper", str(tiny.local_mapper), "--device", "cpu"]
    return args + (["--vision-model", str(tiny.vision_model)] if vision else [])


def _manifests(out: Path) -> list[Path]:
    return sorted(p for p in (out / "_runs").glob("generate-*.parquet") if not p.name.endswith("-failures.parquet"))


def test_encode_then_generate_every_shared_concept(tiny_models: TinyModels, concepts_dir: Path,
                                                   tmp_path: Path) -> None:
    sources = find_concepts(concepts_dir)
    assert len(sources) >= 11 and all(s.mask is not None for s in sources)
    store = tmp_path / "store"
    assert main(["encode", str(concepts_dir), "--store", str(store), *_model_args(tiny_models)]) == 0
    concepts = EmbeddingStore(store).read_embeddings()
    assert [c.concept_id for c in concepts] == sorted(s.concept_id for s in sources)
    assert all(c.words.shape == (5, 32) and c.local_tokens.shape == (256, 32) for c in concepts)
    for c in concepts:  # background patches carry no local token
        background = c.mask_grid.flatten() == 0
        assert c.local_tokens[background].abs().sum() == 0 and c.local_tokens[~background].abs().sum() > 0

    out = tmp_path / "images"
    args = ["generate", "--store", str(store), "--out", str(out), "--prompt", "a photo of S on the beach",
            "--prompt", "a painting of S", "--steps", "2", "--height", "64", "--width", "48",
            "--batch-size", "8", *_model_args(tiny_models, vision=False)]
    assert main(args) == 0
    [manifest] = _manifests(out)  # the flows' layout: <concept>/<prompt hash>-i<n>-s<seed>.png + Parquet manifest
    rows = pq.read_table(manifest).to_pylist()
    assert len(rows) == 2 * len(concepts) and {r["concept_id"] for r in rows} == {c.concept_id for c in concepts}
    for row in rows:
        path = out / row["output_key"]
        assert row["output_key"].startswith(f"{row['concept_id']}/") and row["sha256"] == sha256_file(path)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (48, 64)
    assert not list(out.rglob(".*.tmp")) and not list((out / "_runs").glob("*-failures.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(args) == 0  # rerun: nothing regenerated, and no empty report file
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()) and _manifests(out) == [manifest]


def test_encode_records_bad_items_and_keeps_the_rest(tiny_models: TinyModels, concepts_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("1.jpg", "1_bg.png", "2.jpg", "2_bg.png"):
        shutil.copy(concepts_dir / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (30, 30), "red").save(folder / "nomask.png")
    Image.new("RGB", (30, 30), "red").save(folder / "badmask.png")
    Image.new("L", (10, 10), 255).save(folder / "badmask_bg.png")
    store = tmp_path / "store"
    assert main(["encode", str(folder), "--store", str(store), "--batch-size", "3", *_model_args(tiny_models)]) == 1
    err = capsys.readouterr().err
    assert f"FAILED broken (read) {(folder / 'broken.jpg').as_uri()}: " in err and "not an image" in err
    assert "FAILED empty (read)" in err and "empty file" in err
    assert "FAILED badmask (preprocess)" in err and "mask size 10x10 differs" in err
    assert EmbeddingStore(store).concept_ids() == ["1", "2", "nomask"]
    [table] = (store / "_runs").glob("encode-*-failures.parquet")
    assert sorted(pq.read_table(table).column("concept_id").to_pylist()) == ["badmask", "broken", "empty"]


def test_onnx_engine_into_the_store_is_incremental(tiny_models: TinyModels, exported: dict[str, Path],
                                                   concepts_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "concepts"
    folder.mkdir()
    for name in ("1.jpg", "1_bg.png", "2.jpg", "2_bg.png", "3.jpg", "3_bg.png"):
        shutil.copy(concepts_dir / name, folder / name)
    store = tmp_path / "store"
    encode = ["encode", str(folder), "--store", str(store), "--engine", "onnx", "--onnx", str(exported["int8"])]
    assert main(encode) == 0
    assert "encoded 3 concepts (0 already stored, 0 failed)" in capsys.readouterr().out
    assert main(encode) == 0  # rerun: nothing new
    assert "encoded 0 concepts (3 already stored, 0 failed)" in capsys.readouterr().out
    shutil.copy(concepts_dir / "7.jpg", folder / "7.jpg")  # a new concept without a mask
    assert main(encode) == 0
    assert "encoded 1 concepts (3 already stored, 0 failed)" in capsys.readouterr().out
    # the torch engine is another encoder: everything is encoded again under its own id
    assert main(["encode", str(folder), "--store", str(store), *_model_args(tiny_models)]) == 0
    assert "encoded 4 concepts (0 already stored" in capsys.readouterr().out
    onnx_id = OnnxConceptEncoder(exported["int8"], device="cpu").encoder_id
    out = tmp_path / "images"
    assert main(["generate", "--store", str(store), "--encoder-id", onnx_id, "--concept", "7", "--concept", "1",
                 "--out", str(out), "--prompt", "a photo of S", "--steps", "2", "--height", "64", "--width", "64",
                 *_model_args(tiny_models, vision=False)]) == 0
    assert sorted(p.parent.name for p in out.rglob("*.png")) == ["1", "7"]
    assert main(["generate", "--store", str(store), "--out", str(out), *_model_args(tiny_models, vision=False)]) == 1
    assert "encoder" in capsys.readouterr().err  # two encoders stored: the choice must be explicit


def test_personalize_command_runs_the_catalog_job_offline(prefect_harness: None, concepts_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main command, on a copy of 3 shared concepts plus one corrupt image."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for name in ("1", "7"):
        shutil.copy(concepts_dir / f"{name}.jpg", catalog)
        shutil.copy(concepts_dir / f"{name}_bg.png", catalog)
    (catalog / "bad.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    command = ["personalize", "--concepts", str(catalog), "--out", str(out), "--tiny", "--tiny-dir",
               str(tmp_path / "tiny"), "--steps", "2"]
    assert main(command) == 1  # the corrupt image is a failure; the rest is done
    printed = capsys.readouterr()
    assert "FAILED bad (read)" in printed.err and "not an image" in printed.err
    assert "2 concepts encoded" in printed.out and "4 images generated" in printed.out
    pngs = sorted(p.relative_to(out / "images").parts[0] for p in (out / "images").rglob("*.png"))
    assert pngs == ["1", "1", "7", "7"]  # 2 default prompts each
    for png in (out / "images").rglob("*.png"):
        with Image.open(png) as image:
            assert image.size == (64, 64)
    (catalog / "bad.jpg").unlink()
    assert main(command) == 0  # fixed: nothing left to do, nothing failed
    assert "0 concepts encoded (2 already stored), 0 images generated (4 already there), 0 failed" in \
        capsys.readouterr().out
    # a mistyped folder is an error, an empty one says so
    assert main([*command[:2], str(tmp_path / "no-such-folder"), *command[3:]]) == 1
    assert "no-such-folder: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*command[:2], str(tmp_path / "empty"), *command[3:]]) == 1
    assert "no concepts found in" in capsys.readouterr().err
    (tmp_path / "all-bad").mkdir()  # every concept fails: reported, and no generation run over nothing
    (tmp_path / "all-bad" / "bad.jpg").write_bytes(b"not an image")
    assert main([*command[:2], str(tmp_path / "all-bad"), *command[3:]]) == 1
    assert "FAILED bad (read)" in capsys.readouterr().err
    assert len(list((out / "_runs").glob("personalize-*-failures.parquet"))) == 2  # the first run's and this one


def test_help_is_there_with_a_line_and_a_default_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    from elite_cli.parser import build_parser

    parser = build_parser(["a photo of a S"])
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"personalize", "encode", "generate", "evaluate", "train", "export", "export-onnx",
                                "convert-checkpoint", "make-tiny-models", "store"}
    [store] = [a for a in sub.choices["store"]._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(store.choices) == {"history", "optimize", "vacuum", "migrate"}
    commands = [([name], command) for name, command in sub.choices.items() if name != "store"]
    commands += [(["store", name], command) for name, command in store.choices.items()]
    for words, command in commands:
        for action in command._actions:
            assert action.help, f"elite {' '.join(words)} {action.option_strings or action.dest}: no help text"
        with pytest.raises(SystemExit) as info:
            main([*words, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "usage: elite" in text and ("(default:" in text or words[-1] in ("convert-checkpoint", "migrate"))


def test_concept_ids_that_cannot_name_a_folder_are_failures(tiny_models: TinyModels, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    store = EmbeddingStore(tmp_path / "store")
    good = ConceptEmbedding("good", torch.zeros(5, 32), torch.zeros(256, 32), torch.ones(16, 16))
    evil = ConceptEmbedding("../evil", torch.zeros(5, 32), torch.zeros(256, 32), torch.ones(16, 16))
    store.append([EmbeddingRecord.from_embedding(c, source_uri=f"file:///{n}.jpg", image_sha256=f"{n}" * 64,
                                                 mask_sha256=None, encoder_id="enc") for n, c in (("a", good),
                                                                                                  ("b", evil))])
    out = tmp_path / "out" / "images"
    code = main(["generate", "--store", str(tmp_path / "store"), "--out", str(out), "--prompt", "a S", "--steps", "1",
                 "--height", "64", "--width", "64", *_model_args(tiny_models, vision=False)])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED ../evil (generate)" in err and "single key segment" in err
    assert not (tmp_path / "out" / "evil").exists() and len(list(out.glob("good/*.png"))) == 1


def test_two_images_for_one_concept_id_are_refused(tmp_path: Path) -> None:
    from elite.errors import InputError

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match=r"concept 'a' has two images: .*a\.jpg and .*a\.png"):
        find_concepts(tmp_path)


def test_personalize_names_missing_models_before_starting(concepts_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("PRETRAINED_MODEL", "VISION_MODEL", "GLOBAL_MAPPER", "LOCAL_MAPPER"):
        monkeypatch.delenv(f"ELITE_{name}", raising=False)
    assert main(["personalize", "--concepts", str(concepts_dir), "--out", str(tmp_path / "out")]) == 1
    assert "missing pretrained-model (or $ELITE_PRETRAINED_MODEL)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, no flow run started
