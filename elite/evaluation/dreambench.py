"""DreamBench: the prompt sets and subjects of the DreamBooth dataset (github.com/google/dreambooth), packaged.

    PROMPT_SETS                        "object", "live", "all"
    prompt_file(name)                  the packaged prompt file of a set (elite/evaluation/dreambench_data/)
    subjects()                         the 30 subjects: folder name, class word, live (a cat or a dog) or not
    dreambench_prompts(name, images)   the PromptSpecs of a set, `images` per prompt and subject
    manifest_csv(dataset_dir, image)   a concept manifest (concept_id,image,class_word) for a local copy of the dataset

    python -m elite.evaluation.dreambench manifest DATASET_DIR [--image 00.jpg]   writes DATASET_DIR/dreambench.csv
    python -m elite.evaluation.dreambench prompts {object,live,all}               prints the packaged file's path

"object" and "live" are the dataset's 25 prompts each, for every concept. "all" (all.csv) holds the object prompts
once per object class word and the live prompts for "cat" and "dog", each scoped by `class_word`: one run over a
manifest of all 30 subjects (class words as in subjects.csv, which `manifest_csv` writes) gives every subject its own
25. Wherever a prompt file is read, the sets are also found by name (`--prompts dreambench`, `dreambench:object`;
elite.data.prompts.PACKAGED_PROMPTS). Guide: docs/dreambench.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from elite.data.prompts import PromptSpec, load_prompts, packaged_prompts
from elite.errors import EliteError, InputError
from elite.fileio import write_bytes_atomic

__all__ = ["MANIFEST_NAME", "PROMPT_SETS", "Subject", "dreambench_prompts", "manifest_csv", "prompt_file", "subjects"]

PROMPT_SETS = ("object", "live", "all")
MANIFEST_NAME = "dreambench.csv"  # what `python -m elite.evaluation.dreambench manifest` writes into the dataset folder


@dataclass(frozen=True)
class Subject:
    """One DreamBench subject: its folder under dataset/, its class word (prompts_and_classes.txt), and whether it
    takes the live-subject prompts."""

    subject: str  # e.g. "backpack_dog"; also the concept id in a manifest
    class_word: str  # e.g. "backpack"
    live: bool  # cats and dogs


def _packaged_name(name: str) -> str:
    """The name elite.data.prompts knows set `name` by ("live" -> "dreambench:live")."""
    if name not in PROMPT_SETS:
        raise InputError(f"unknown DreamBench prompt set {name!r}; expected one of {', '.join(PROMPT_SETS)}")
    return f"dreambench:{name}"


def prompt_file(name: str) -> Path:
    """The packaged prompt file of set `name` ("object", "live" or "all"), a file on disk."""
    resource = packaged_prompts(_packaged_name(name))
    if not isinstance(resource, Path):  # only a zipped install would do this; pip installs wheels unpacked
        raise EliteError(f"{resource}: the package data is not a file on disk; install elite unzipped")
    return resource


def subjects() -> list[Subject]:
    """The 30 subjects, in the dataset's (alphabetical) order."""
    text = (resources.files("elite.evaluation") / "dreambench_data" / "subjects.csv").read_text("utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return [Subject(row["subject"], row["class_word"], row["live"] == "true") for row in rows]


def dreambench_prompts(name: str, images: int = 1) -> list[PromptSpec]:
    """The PromptSpecs of set `name`, `images` images per prompt and concept it applies to: "object" and "live"
    apply to every concept, "all" to the concepts of the class words it names (see the module's docstring)."""
    return load_prompts(_packaged_name(name), images)[0]  # the same reading as `--prompts dreambench:<name>`


def manifest_csv(dataset_dir: str | Path, image: str = "00.jpg") -> str:
    """The text of a concept manifest (docs/inputs.md) for the DreamBench subjects found in `dataset_dir`, the
    dataset/ folder of a clone of github.com/google/dreambooth: one row per subject folder there, with its image
    `image` (a path relative to `dataset_dir`) and its class word. Subjects without a folder are left out; a
    subject folder without `image`, or a folder with no subject at all, is an InputError naming it."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if not image or Path(image).name != image or image in (".", ".."):
        raise InputError(f"image {image!r} must be a file name in each subject's folder, such as 00.jpg")
    found = [s for s in subjects() if (root / s.subject).is_dir()]
    if not found:
        raise InputError(f"{root}: holds none of the 30 DreamBench subject folders (backpack, cat, dog, ...); give the "
                         "dataset/ folder of a clone of github.com/google/dreambooth")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["concept_id", "image", "class_word"])
    for subject in found:
        if not (root / subject.subject / image).is_file():
            raise InputError(f"{root / subject.subject}: subject {subject.subject!r} has no {image}")
        writer.writerow([subject.subject, f"{subject.subject}/{image}", subject.class_word])
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elite.evaluation.dreambench",
                                     description="DreamBench inputs: a concept manifest for a copy of the dataset, "
                                                 "and the packaged prompt files (docs/dreambench.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("manifest", help=f"write DATASET_DIR/{MANIFEST_NAME} (concept_id,image,class_word)")
    p.add_argument("dataset_dir", help="the dataset/ folder of a clone of github.com/google/dreambooth")
    p.add_argument("--image", default="00.jpg", help="each subject's image to encode (default: %(default)s)")
    p = sub.add_parser("prompts", help="print the path of a packaged prompt file")
    p.add_argument("name", choices=PROMPT_SETS, help="object, live, or all (each subject its own 25)")
    args = parser.parse_args(argv)
    try:
        if args.command == "manifest":
            path = Path(args.dataset_dir) / MANIFEST_NAME
            write_bytes_atomic(path, manifest_csv(args.dataset_dir, args.image).encode("utf-8"))
            print(path)
        else:
            print(prompt_file(args.name))
            if args.name == "all":
                print("(no copy needed: `--prompts dreambench` loads this set by name)", file=sys.stderr)
    except EliteError as err:
        print(f"dreambench: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
