"""Prompt plans: which images to generate for which concepts, with reproducible seeds and output keys.

    read_prompts(data, name)                 PromptSpecs from a .txt, .jsonl or .csv prompt file
    load_prompts(uri)                        the same from a path or URI, bad lines as failures, or a packaged set
                                             by name (PACKAGED_PROMPTS: dreambench, dreambench:object, ...)
    plan_work(concepts, prompts, base_seed)  one WorkItem per (concept, prompt, image index) that applies
    batch_work(items, batch_size)            WorkItems in batches that keep a concept's images together

A seed is either given in the prompt file or derived from (concept id, template, index, base seed), and the
output key carries it, so a rerun of the same plan reproduces and overwrites exactly the same images.
Guide: docs/inputs.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, overload

from elite.data.sources import ConceptRef, csv_rows, jsonl_rows
from elite.data.storage import open_object
from elite.errors import Failure, InputError, check_integer
from elite.model.placeholders import placeholder_pattern

__all__ = ["DEFAULT_PROMPTS", "PACKAGED_PROMPTS", "PromptSpec", "WorkItem", "batch_work", "derive_seed",
           "load_prompts", "packaged_prompts", "plan_work", "read_prompts"]

# Images per prompt and concept: a plan is built up front, so 50,000,000 would exhaust memory minutes later
MAX_IMAGES = 1000
DEFAULT_PROMPTS = ("a photo of a S on the beach", "a painting of a S in the style of van gogh")
PROMPT_FIELDS = ("template", "prompt", "images", "concept_id", "class_word", "seeds")
# Prompt sets shipped in the package, named where a prompt file's path would go (docs/dreambench.md): the DreamBench
# sets, read by elite.evaluation.dreambench too. "dreambench" is "dreambench:all" (each subject's own 25 prompts).
PACKAGED_PROMPTS = {"dreambench": "all.csv", "dreambench:all": "all.csv", "dreambench:object": "object.txt",
                    "dreambench:live": "live.txt"}


@dataclass(frozen=True)
class PromptSpec:
    """One prompt template and how many images of it to make, for all concepts, one concept, or one class."""

    template: str  # e.g. "a photo of a S on the beach"
    images: int = 1  # images per concept it applies to
    concept_id: str | None = None  # only this concept
    class_word: str | None = None  # only concepts whose ConceptRef.class_word equals this
    seeds: tuple[int, ...] | None = None  # one per image; None: derived (derive_seed)
    placeholder: str = "S"  # paper / reference: "a photo of a S"

    def __post_init__(self) -> None:
        if not placeholder_pattern([self.placeholder]).search(self.template):  # "Sunset" has no "S"
            raise InputError(f"prompt {self.template!r} does not contain the placeholder {self.placeholder!r} "
                             "as a word")
        if isinstance(self.images, bool) or not isinstance(self.images, int) or not 1 <= self.images <= MAX_IMAGES:
            raise InputError(f"prompt {self.template!r}: images must be an integer from 1 to {MAX_IMAGES}, got "
                             f"{self.images!r}")
        if self.concept_id is not None and self.class_word is not None:
            raise InputError(f"prompt {self.template!r}: give concept_id or class_word, not both")
        if self.seeds is not None:
            if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in self.seeds):
                raise InputError(f"prompt {self.template!r}: seeds must be integers in [0, 2**63), got {self.seeds}")
            if len(self.seeds) != self.images:
                raise InputError(f"prompt {self.template!r}: {len(self.seeds)} seeds for {self.images} images")

    @property
    def scope(self) -> str:
        """'all', 'concept:<id>' or 'class:<word>', for logs and reports."""
        if self.concept_id is not None:
            return f"concept:{self.concept_id}"
        return "all" if self.class_word is None else f"class:{self.class_word}"

    def applies_to(self, concept: ConceptRef) -> bool:
        if self.concept_id is not None:
            return concept.concept_id == self.concept_id
        return self.class_word is None or concept.class_word == self.class_word


@dataclass(frozen=True)
class WorkItem:
    """One image to generate; `output_key` is unique within a plan and the same on every rerun."""

    concept_id: str
    prompt: str  # the template, placeholder still in it: the pipeline binds it to the concept
    index: int  # image number within (concept, prompt), from 0
    seed: int
    output_key: str  # <concept_id>/<sha1(template)[:10]>-i<index>-s<seed>.png
    placeholder: str = "S"  # the word of `prompt` bound to the concept


# ---- prompt files --------------------------------------------------------------------------------

@overload
def read_prompts(data: bytes | str | os.PathLike[str], name: str | None = None,
                 strict: Literal[True] = True) -> list[PromptSpec]: ...
@overload
def read_prompts(data: bytes | str | os.PathLike[str], name: str | None,
                 strict: Literal[False]) -> tuple[list[PromptSpec], list[Failure]]: ...


def read_prompts(data: bytes | str | os.PathLike[str], name: str | None = None,
                 strict: bool = True) -> list[PromptSpec] | tuple[list[PromptSpec], list[Failure]]:
    """PromptSpecs of a prompt file, in file order; the format comes from `name`'s suffix (.txt, .jsonl, .csv).

    `data` is a local path (then `name` defaults to it) or the file's bytes (e.g. `store.get(key)`, with the key
    as `name`). strict=True: the first bad line raises InputError naming it; strict=False: bad lines come back
    as `Failure("", uri="<name>:<line>", stage="prompts", reason)` next to the good specs.
    """
    if isinstance(data, bytes):
        if name is None:
            raise InputError("read_prompts: give the file's name (its suffix sets the format) along with its bytes")
        raw = data
    else:
        name = os.fspath(data) if name is None else name
        try:
            raw = Path(data).read_bytes()
        except OSError as err:
            raise InputError(f"{os.fspath(data)}: cannot read prompt file: {err.strerror}") from None
    suffix = posixpath.splitext(name)[1].lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InputError(f"{name}: prompt file must end in .txt, .jsonl or .csv, not {suffix or 'no suffix'!r}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = {".txt": _txt_rows, ".jsonl": lambda t, _: jsonl_rows(t), ".csv": _csv_rows}[suffix](text, name)
    specs: list[PromptSpec] = []
    failures: list[Failure] = []
    for line, row in rows:
        try:
            if isinstance(row, str):
                raise InputError(row)  # the line could not even be parsed
            specs.append(_prompt_spec(row))
        except InputError as err:
            if strict:
                raise InputError(f"{name} line {line}: {err}") from None
            failures.append(Failure("", f"{name}:{line}", "prompts", str(err)))
    return specs if strict else (specs, failures)


def _txt_rows(text: str, name: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        template = raw.strip()
        if template and not template.startswith("#"):  # blank lines and comments
            yield line, {"template": template}


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for line, row in csv_rows(text, name, "prompt file"):
        if isinstance(row, str):
            yield line, row
            continue
        values: dict[str, Any] = {k: v.strip() for k, v in row.items() if v.strip()}
        # CSV cells are text: convert the numeric columns here so the JSONL and CSV paths share the checks
        try:
            if "images" in values:
                values["images"] = int(values["images"])
            if "seeds" in values:  # "1 2 3", "1;2;3" or a quoted "1,2,3"
                values["seeds"] = [int(s) for s in re.split(r"[\s,;]+", values["seeds"]) if s]
        except ValueError as err:
            yield line, f"not an integer: {err}"
            continue
        yield line, values


def _prompt_spec(row: Mapping[str, Any]) -> PromptSpec:
    unknown = sorted(set(row) - set(PROMPT_FIELDS))
    if unknown:  # a typo such as "image" would otherwise silently fall back to one image
        raise InputError(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(PROMPT_FIELDS)}")
    if "template" in row and "prompt" in row and row["template"] != row["prompt"]:
        raise InputError("template and prompt are given and differ; give one")
    template = row.get("template", row.get("prompt"))
    if not isinstance(template, str) or not template.strip():
        raise InputError("prompt (or template) is missing or not a non-empty string")
    for text_field in ("concept_id", "class_word"):
        if row.get(text_field) is not None and not isinstance(row[text_field], str):
            raise InputError(f"{text_field} must be a string, got {json.dumps(row[text_field])}")
    seeds = row.get("seeds")
    if seeds is not None and not isinstance(seeds, list):
        raise InputError(f"seeds must be a list of integers, got {json.dumps(seeds)}")
    return PromptSpec(template.strip(), row.get("images", 1), row.get("concept_id") or None,
                      row.get("class_word") or None, None if seeds is None else tuple(seeds))


def packaged_prompts(name: str) -> Traversable:
    """The file of a packaged prompt set, e.g. 'dreambench:live' (PACKAGED_PROMPTS); another name is an InputError
    listing them."""
    if name not in PACKAGED_PROMPTS:
        raise InputError(f"unknown prompt set {name!r}; the packaged ones are {', '.join(PACKAGED_PROMPTS)}")
    return resources.files("elite") / "evaluation" / "dreambench_data" / PACKAGED_PROMPTS[name]


def load_prompts(uri: str | None, images: int | None = None) -> tuple[list[PromptSpec], list[Failure]]:
    """The prompt file at a path or URI (.txt, .jsonl, .csv; docs/inputs.md), bad lines as failures; None: the
    two default prompts. A file without a single usable prompt is an InputError: it would generate nothing.
    `images`: images per concept for every prompt, instead of each line's `images` (default 1); a line whose
    `seeds` do not number that many is an InputError naming it.

    `dreambench`, `dreambench:all`, `dreambench:object` and `dreambench:live` name the packaged DreamBench sets
    (PACKAGED_PROMPTS), so no file is needed; `dreambench:<other>` is an InputError. These names take precedence
    over a local file so named, an unlikely clash (a prompt file has a suffix): read a file `dreambench:x.txt` as
    `./dreambench:x.txt`.
    """
    failures: list[Failure] = []
    if uri is None:
        specs = [PromptSpec(p) for p in DEFAULT_PROMPTS]
    elif uri.partition(":")[0] == "dreambench":  # a packaged set, or a misspelt one
        resource = packaged_prompts(uri)
        specs = read_prompts(resource.read_bytes(), str(resource))
    else:
        store, key = open_object(uri)
        specs, failures = read_prompts(store.get(key), store.uri(key), strict=False)
        if not specs:
            why = f"; {len(failures)} bad line(s), the first: {failures[0].reason}" if failures else ""
            raise InputError(f"{store.uri(key)}: no prompts in the file (blank, or only comments){why}")
    if images is not None:
        specs = [dataclasses.replace(spec, images=images) for spec in specs]  # checked again: count, seeds
    return specs, failures


# ---- planning ------------------------------------------------------------------------------------

def plan_work(concepts: Sequence[ConceptRef], prompts: Sequence[PromptSpec], base_seed: int = 0) -> list[WorkItem]:
    """Every (concept, prompt, image index) that applies, in concept order, then prompt order, then index.

    Global prompts apply to every concept, per-concept prompts to that id, per-class prompts to the concepts of
    that class_word; a prompt whose concept or class is not among `concepts` yields nothing. The seed is the
    prompt's explicit one or `derive_seed(concept_id, template, index, base_seed)`. A prompt that applies to a
    concept twice with the same seeds (e.g. globally and for its class) would write the same images twice: it is
    an InputError naming both, rather than a silent de-duplication.
    """
    items: list[WorkItem] = []
    seen: dict[str, PromptSpec] = {}
    for concept in concepts:
        for spec in prompts:
            if not spec.applies_to(concept):
                continue
            digest = hashlib.sha1(spec.template.encode()).hexdigest()[:10]  # names files, not security
            for index in range(spec.images):
                seed = spec.seeds[index] if spec.seeds is not None else derive_seed(
                    concept.concept_id, spec.template, index, base_seed)
                key = f"{concept.concept_id}/{digest}-i{index}-s{seed}.png"
                if key in seen:
                    raise InputError(f"prompt {spec.template!r} ({spec.scope}) and ({seen[key].scope}) both make "
                                     f"image {index} of concept {concept.concept_id!r} with seed {seed}; "
                                     "drop one or give it other seeds")
                seen[key] = spec
                items.append(WorkItem(concept.concept_id, spec.template, index, seed, key, spec.placeholder))
    return items


def batch_work(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """`items` grouped by concept, then prompt (each in first-seen order), cut into batches of `batch_size`.

    Batches are full except the last: one concept's images stay together, and a batch spans two concepts
    only where a concept's images do not fill it, so the GPU never idles on a short batch mid-plan.
    """
    check_integer("batch_size", batch_size, 1)
    concept_rank: dict[str, int] = {}
    prompt_rank: dict[str, int] = {}
    for item in items:
        concept_rank.setdefault(item.concept_id, len(concept_rank))
        prompt_rank.setdefault(item.prompt, len(prompt_rank))
    # sorted() is stable, so each (concept, prompt) keeps its images in index order
    ordered = sorted(items, key=lambda i: (concept_rank[i.concept_id], prompt_rank[i.prompt]))
    return [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]


def derive_seed(concept_id: str, prompt: str, index: int, base: int = 0) -> int:
    """A deterministic seed per (concept, prompt, image index), so a rerun reproduces every image."""
    digest = hashlib.sha256(f"{base}\x1f{concept_id}\x1f{prompt}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: a valid torch seed
