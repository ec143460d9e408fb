"""The packaged DreamBench prompt sets and subjects (elite.evaluation.dreambench), checked against the data files
themselves: sizes, shared prompts, the per-subject "all" plan, loading by name, the manifest and its command."""

from __future__ import annotations

import csv
import fnmatch
import re
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from elite.data.objects import LocalStore
from elite.data.prompts import load_prompts, plan_work
from elite.data.sources import ConceptRef, read_manifest
from elite.errors import InputError
from elite.evaluation.dreambench import PROMPT_SETS, dreambench_prompts, manifest_csv, prompt_file, subjects

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "elite" / "evaluation" / "dreambench_data"
PROPERTY_PROMPTS = ["a red S", "a purple S", "a shiny S", "a wet S", "a cube shaped S"]  # DreamBench's 5


def _templates(name: str) -> list[str]:
    """The prompt lines of a packaged .txt, read here without the library."""
    lines = (DATA / name).read_text("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", ["object", "live"])
def test_each_set_has_25_distinct_prompts_with_the_placeholder_once(name: str) -> None:
    specs = dreambench_prompts(name)
    templates = [spec.template for spec in specs]
    assert templates == _templates(f"{name}.txt")
    assert len(templates) == 25 and len(set(templates)) == 25
    for template in templates:
        assert len(re.findall(r"(?<!\w)S(?!\w)", template)) == 1, template
        assert "{" not in template and "sks" not in template, template  # DreamBooth's token and class are gone
    assert all(spec.scope == "all" and spec.images == 1 and spec.placeholder == "S" for spec in specs)
    header = (DATA / f"{name}.txt").read_text("utf-8").splitlines()[0]
    assert header.startswith("# DreamBench") and "github.com/google/dreambooth" in (DATA / f"{name}.txt").read_text()


def test_object_and_live_share_10_backgrounds_and_5_properties() -> None:
    obj, live = _templates("object.txt"), _templates("live.txt")
    shared = [t for t in obj if t in live]
    assert shared == obj[:10] + obj[20:] == live[:10] + live[20:]
    assert obj[20:] == PROPERTY_PROMPTS
    assert all(t.startswith("a S ") for t in obj[:20]) and all(t.startswith("a S ") for t in live[:20])
    assert "a S floating in an ocean of milk" in obj and "a S floating in an ocean of milk" not in live
    assert "a S wearing a santa hat" in live and "a S wearing a santa hat" not in obj


def test_subjects() -> None:
    found = subjects()
    assert len(found) == 30 and len({s.subject for s in found}) == 30
    assert [s.subject for s in found] == sorted(s.subject for s in found)
    live = [s for s in found if s.live]
    assert len(live) == 9 and {s.class_word for s in live} == {"cat", "dog"}
    assert not {"cat", "dog"} & {s.class_word for s in found if not s.live}
    words = {s.subject: s.class_word for s in found}
    assert (words["backpack_dog"], words["bear_plushie"], words["pink_sunglasses"]) == (
        "backpack", "stuffed animal", "glasses")


def test_all_plan_gives_every_subject_its_own_25() -> None:
    concepts = [ConceptRef(s.subject, f"{s.subject}/00.jpg", class_word=s.class_word) for s in subjects()]
    live = {s.subject for s in subjects() if s.live}
    per_concept: dict[str, list[str]] = defaultdict(list)
    for item in plan_work(concepts, dreambench_prompts("all")):
        per_concept[item.concept_id].append(item.prompt)
    assert set(per_concept) == {c.concept_id for c in concepts}
    for concept_id, prompts in per_concept.items():
        assert prompts == _templates("live.txt" if concept_id in live else "object.txt"), concept_id
    assert "a S wearing a santa hat" in per_concept["dog8"] and "a S floating in an ocean of milk" in per_concept["can"]
    # the image count carries through to the plan: 4 per prompt, 100 distinct seeds per subject
    items = plan_work(concepts[:1], dreambench_prompts("all", images=4))
    assert len(items) == 100 and len({i.seed for i in items}) == 100


def test_all_csv_names_exactly_the_subjects_class_words() -> None:
    rows = list(csv.DictReader((DATA / "all.csv").read_text("utf-8").splitlines()))
    words = {s.class_word for s in subjects()}
    assert {row["class_word"] for row in rows} == words  # a stray class word would match no subject, silently
    assert len(rows) == 25 * len(words)


def test_load_prompts_by_name() -> None:
    assert load_prompts("dreambench:live") == (dreambench_prompts("live"), [])
    assert load_prompts("dreambench:object") == (dreambench_prompts("object"), [])
    assert load_prompts("dreambench") == load_prompts("dreambench:all") == (dreambench_prompts("all"), [])
    with pytest.raises(InputError, match=r"unknown prompt set 'dreambench:nope'.*dreambench:live"):
        load_prompts("dreambench:nope")
    with pytest.raises(InputError, match="unknown DreamBench prompt set 'nope'"):
        dreambench_prompts("nope")
    with pytest.raises(InputError, match="images must be an integer"):
        dreambench_prompts("object", images=0)


def test_a_local_file_with_the_name_in_it_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "dreambench:mine.txt"
    path.write_text("a S on the moon\n")
    specs, failures = load_prompts(str(path))
    assert [s.template for s in specs] == ["a S on the moon"] and not failures


def _jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, "JPEG")


def _dataset(root: Path) -> Path:
    for subject in ("dog", "backpack", "pink_sunglasses"):
        _jpeg(root / subject / "00.jpg")
        _jpeg(root / subject / "01.jpg")
    _jpeg(root / "my_own_cat" / "00.jpg")  # not a DreamBench subject: no row
    (root / "README.md").write_text("not a subject")
    return root


def test_manifest_reads_back_through_the_manifest_reader(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "dataset")
    (root / "dreambench.csv").write_text(manifest_csv(root))
    refs = read_manifest(LocalStore(root), "dreambench.csv")
    assert [(r.concept_id, r.image, r.class_word) for r in refs] == [
        ("backpack", "backpack/00.jpg", "backpack"), ("dog", "dog/00.jpg", "dog"),
        ("pink_sunglasses", "pink_sunglasses/00.jpg", "glasses")]
    assert all(r.mask is None and (root / r.image).is_file() for r in refs)
    assert "dog/01.jpg" in manifest_csv(root, image="01.jpg")


def test_manifest_refuses_a_missing_image_or_an_empty_folder(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "dataset")
    (root / "dog" / "00.jpg").unlink()
    with pytest.raises(InputError, match=r"dog: subject 'dog' has no 00\.jpg"):
        manifest_csv(root)
    with pytest.raises(InputError, match="none of the 30 DreamBench subject folders"):
        manifest_csv(root / "my_own_cat")
    with pytest.raises(InputError, match="must be a file name"):
        manifest_csv(root, image="../00.jpg")
    with pytest.raises(InputError, match="not a folder"):
        manifest_csv(tmp_path / "nowhere")


def test_the_command_writes_the_manifest_and_prints_paths(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "dataset")
    module = [sys.executable, "-m", "elite.evaluation.dreambench"]
    done = subprocess.run([*module, "manifest", str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(root / "dreambench.csv")
    assert (root / "dreambench.csv").read_text() == manifest_csv(root)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    done = subprocess.run([*module, "manifest", str(root / "my_own_cat")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "dreambench: error:" in done.stderr and not done.stdout
    done = subprocess.run([*module, "prompts", "live"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(DATA / "live.txt")


def test_the_data_files_are_package_data() -> None:
    for name in PROMPT_SETS:
        path = prompt_file(name)
        assert path.is_file() and path.parent == DATA
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["elite"]
    files = [p.relative_to(REPO / "elite").as_posix() for p in DATA.iterdir() if p.is_file()]
    assert len(files) == 4  # object.txt, live.txt, all.csv, subjects.csv: data only, no __init__.py
    unpackaged = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not unpackaged, f"not in [tool.setuptools.package-data] elite: {unpackaged}"
