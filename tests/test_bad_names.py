"""Files a concept folder may hold that must never hang a run or stop it: FIFOs, devices, links out of the folder,
and names that cannot be concept ids (backslashes, control characters, bytes that are not UTF-8, too long). Each
is that item's failure row, through the CLI and through the flow; the good concept is encoded all the same."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from elite.data.store import EmbeddingStore
from elite.model.tiny import TinyModels

REPO = Path(__file__).resolve().parents[1]
LONG = "x" * 230
# file name (bytes) -> the id its failure row names and the reason it gives (the id as printable text)
CASES = {
    b"fifo.jpg": ("fifo", "not a regular file (a FIFO)"),
    b"zero.jpg": ("zero", "leads out of"),  # a link to /dev/zero
    b"outside.jpg": ("outside", "leads out of"),  # a link to a file outside the folder
    b"back\\slash.jpg": ("back\\slash", "backslash or a control character"),
    b"ctl\x01.jpg": ("ctl\\x01", "backslash or a control character"),
    b"latin\xe9.jpg": ("latin\\udce9", "not valid UTF-8"),
    LONG.encode() + b".jpg": (LONG, "bytes long"),
}


@pytest.fixture
def bad_folder(tmp_path: Path, concepts_dir: Path) -> Path:
    folder = tmp_path / "catalog"
    folder.mkdir()
    shutil.copy(concepts_dir / "1.jpg", folder / "good.jpg")
    image = (concepts_dir / "2.jpg").read_bytes()
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(image)
    root = os.fsencode(folder)
    for name in CASES:
        path = os.path.join(root, name)
        if name == b"fifo.jpg":
            os.mkfifo(path)
        elif name == b"zero.jpg":
            os.symlink(b"/dev/zero", path)
        elif name == b"outside.jpg":
            os.symlink(os.fsencode(outside), path)
        else:
            with open(path, "wb") as handle:
                handle.write(image)
    return folder


def _expect(failures: list[dict[str, str]]) -> None:
    by_id = {row["concept_id"]: row for row in failures}
    for concept_id, reason in CASES.values():
        assert concept_id in by_id, (concept_id, sorted(by_id))
        assert reason in by_id[concept_id]["reason"], by_id[concept_id]
    assert len(failures) == len(CASES)


def test_cli_records_each_bad_file_and_never_hangs(bad_folder: Path, tiny_models: TinyModels,
                                                   tmp_path: Path) -> None:
    store = tmp_path / "store"
    command = [sys.executable, "-m", "elite_cli", "encode", str(bad_folder), "--store", str(store),
               "--vision-model", str(tiny_models.vision_model), "--global-mapper", str(tiny_models.global_mapper),
               "--local-mapper", str(tiny_models.local_mapper), "--pretrained-model", str(tiny_models.pretrained_model),
               "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("FAILED ") == len(CASES)
    assert "\x01" not in result.stderr  # control characters are escaped, not sent to the terminal
    assert EmbeddingStore(store).concept_ids() == ["good"]
    [table] = (store / "_runs").glob("encode-*-failures.parquet")
    _expect(pq.read_table(table).to_pylist())


def test_flow_records_each_bad_file_and_never_hangs(prefect_harness: None, bad_folder: Path,
                                                    tiny_models: TinyModels, tmp_path: Path) -> None:
    from flows.encode import encode_concepts

    report = encode_concepts(str(bad_folder), str(tmp_path / "store"), vision_model=str(tiny_models.vision_model),
                             global_mapper=str(tiny_models.global_mapper),
                             local_mapper=str(tiny_models.local_mapper),
                             pretrained_model=str(tiny_models.pretrained_model), device="cpu")
    assert report["concept_ids"] == ["good"] and report["done"] == 1
    _expect(report["failures"])
    assert pq.read_table(report["failures_uri"].removeprefix("file://")).num_rows == len(CASES)
