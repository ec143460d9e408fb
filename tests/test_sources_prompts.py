from __future__ import annotations

import json
from pathlib import Path

import pytest

from elite.data.prompts import PromptSpec, batch_work, derive_seed, load_prompts, plan_work, read_prompts
from elite.data.sources import ConceptRef, list_concepts, read_manifest
from elite.data.storage import open_store
from elite.errors import InputError

# ---- folder convention ---------------------------------------------------------------------------

def test_list_concepts_on_the_shared_folder(concepts_dir: Path) -> None:
    refs = list_concepts(open_store(str(concepts_dir)))
    assert sorted(r.concept_id for r in refs) == sorted(["1", "2", "3", "4", "7", "10", "11", "15", "16", "17", "20"])
    by_id = {r.concept_id: r for r in refs}
    assert by_id["4"].image == "4.png" and by_id["1"].image == "1.jpg"
    assert all(r.mask == f"{r.concept_id}_bg.png" for r in refs)  # every release concept has its mask
    assert all(r.class_word is None and r.metadata == {} for r in refs)


def test_list_concepts_under_a_prefix_skips_deeper_and_other_files(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    for key in ("set/a.JPG", "set/a_bg.png", "set/b.webp", "set/notes.txt", "set/deeper/c.jpg", "other.jpg"):
        store.put(key, b"x")
    refs = list_concepts(store, "set")
    assert refs == [ConceptRef("a", "set/a.JPG", "set/a_bg.png"), ConceptRef("b", "set/b.webp", None)]
    assert list_concepts(store, "set/") == refs


def test_list_concepts_refuses_two_images_of_one_name(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put("a.jpg", b"x")
    store.put("a.png", b"x")
    with pytest.raises(InputError, match=r"a\.jpg.*a\.png"):
        list_concepts(store)


# ---- manifests -----------------------------------------------------------------------------------

def test_csv_manifest_resolves_paths_and_keeps_metadata_as_strings(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put("jobs/m.csv", b"concept_id,image,mask,class_word,owner,score\n"
                            b"dog1,img/dog.jpg,img/dog_bg.png,dog,ann,0.9\n"
                            b"\n"
                            b"cat1,/shared/cat.png,,cat,bob,1\n"
                            b"x,s3://bucket/x.jpg,,,,\n")
    refs = read_manifest(store, "jobs/m.csv")
    assert refs == [
        ConceptRef("dog1", "jobs/img/dog.jpg", "jobs/img/dog_bg.png", "dog", {"owner": "ann", "score": "0.9"}),
        ConceptRef("cat1", "shared/cat.png", None, "cat", {"owner": "bob", "score": "1"}),
        ConceptRef("x", "s3://bucket/x.jpg", None, None, {"owner": "", "score": ""}),
    ]


def test_jsonl_manifest_keeps_json_scalars(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    lines = [{"concept_id": "a", "image": "a.jpg", "mask": None, "score": 0.5, "ok": True, "n": 3, "note": None},
             {"concept_id": "b", "image": "../b.jpg", "class_word": "toy"}]
    store.put("m/list.jsonl", "\n".join(json.dumps(line) for line in lines).encode() + b"\n\n")
    assert read_manifest(store, "m/list.jsonl") == [
        ConceptRef("a", "m/a.jpg", None, None, {"score": 0.5, "ok": True, "n": 3, "note": None}),
        ConceptRef("b", "b.jpg", None, "toy", {}),
    ]


@pytest.mark.parametrize(("text", "line", "reason"), [
    ('{"concept_id": "a", "image": "a.jpg"}\n{"concept_id": "a", "image": "b.jpg"}\n', 2, "already given on line 1"),
    ('{"concept_id": "a"}\n', 1, "image is missing"),
    ('{"concept_id": "a", "image": "a.jpg", "tags": ["x"]}\n', 1, "must be scalars"),
    ('\n\n{"concept_id": "a", "image": \n', 3, "not valid JSON"),
    ('{"concept_id": "a/b", "image": "a.jpg"}\n', 1, "single key segment"),
    ('{"concept_id": "a", "image": "../../a.jpg"}\n', 1, "outside the store"),
])
def test_bad_jsonl_rows_are_named_by_line(tmp_path: Path, text: str, line: int, reason: str) -> None:
    store = open_store(str(tmp_path))
    store.put("m.jsonl", text.encode())
    with pytest.raises(InputError, match=rf"m\.jsonl line {line}: .*{reason}"):
        read_manifest(store, "m.jsonl")


def test_non_strict_manifest_collects_failures_and_carries_on(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put("m.csv", b"concept_id,image\na,a.jpg\n,b.jpg\nc,c.jpg,extra\na,d.jpg\ne,e.jpg\n")
    refs, failures = read_manifest(store, "m.csv", strict=False)
    assert [r.concept_id for r in refs] == ["a", "e"]
    assert [(f.uri.rpartition('/')[2], f.stage) for f in failures] == [("m.csv:3", "manifest"), ("m.csv:4", "manifest"),
                                                     ("m.csv:5", "manifest")]
    assert "concept_id is missing" in failures[0].reason
    assert "3 fields" in failures[1].reason
    assert "already given on line 2" in failures[2].reason


def test_manifest_without_required_columns_or_suffix_always_raises(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put("m.csv", b"id,image\na,a.jpg\n")
    store.put("m.json", b"[]")
    with pytest.raises(InputError, match="lacks column"):
        read_manifest(store, "m.csv", strict=False)
    with pytest.raises(InputError, match=r"\.csv or \.jsonl"):
        read_manifest(store, "m.json")


# ---- prompt files --------------------------------------------------------------------------------

def test_prompt_files_in_all_three_formats(tmp_path: Path) -> None:
    txt = b"# holiday set\na photo of a S on the beach\n\n  S in the snow  \n"
    assert read_prompts(txt, "p.txt") == [PromptSpec("a photo of a S on the beach"), PromptSpec("S in the snow")]

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a S dog", "images": 2, "class_word": "dog", "seeds": [7, 8]}\n'
                     '{"template": "a S at night", "concept_id": "3"}\n')
    assert read_prompts(jsonl) == [PromptSpec("a S dog", 2, class_word="dog", seeds=(7, 8)),
                                   PromptSpec("a S at night", concept_id="3")]

    csv = b'prompt,images,concept_id,class_word,seeds\na S dog,2,,dog,"7,8"\na S at night,,3,,\nS,3,,,1 2 3\n'
    assert read_prompts(csv, "p.csv") == [PromptSpec("a S dog", 2, class_word="dog", seeds=(7, 8)),
                                          PromptSpec("a S at night", concept_id="3"),
                                          PromptSpec("S", 3, seeds=(1, 2, 3))]


def test_prompts_without_the_placeholder_are_named_by_line() -> None:
    with pytest.raises(InputError, match=r"p\.txt line 3: .*'Sunset on the beach'.*placeholder 'S'"):
        read_prompts(b"# c\na S\nSunset on the beach\n", "p.txt")
    specs, failures = read_prompts(b'{"prompt": "a S"}\n{"prompt": "a dog"}\n{"prompt": "S", "image": 2}\n'
                                   b'{"prompt": "S", "images": 2, "seeds": [1]}\n', "p.jsonl", strict=False)
    assert specs == [PromptSpec("a S")]
    assert [f.uri for f in failures] == ["p.jsonl:2", "p.jsonl:3", "p.jsonl:4"]
    assert "unknown field(s) image" in failures[1].reason
    assert "1 seeds for 2 images" in failures[2].reason


# ---- planning ------------------------------------------------------------------------------------

CONCEPTS = [ConceptRef("a", "a.jpg", class_word="dog"), ConceptRef("b", "b.jpg", class_word="cat"),
            ConceptRef("c", "c.jpg", class_word="dog")]


def test_plan_work_expands_scopes_and_images() -> None:
    prompts = [PromptSpec("a photo of S", 3), PromptSpec("S running", 2, class_word="dog"),
               PromptSpec("S asleep", 1, concept_id="b"), PromptSpec("S flying", concept_id="nobody")]
    items = plan_work(CONCEPTS, prompts, base_seed=5)
    assert len(items) == 3 * 3 + 2 * 2 + 1  # global x concepts x images + per-class + per-concept
    assert [(i.concept_id, i.prompt) for i in items if i.prompt != "a photo of S"] == [
        ("a", "S running"), ("a", "S running"), ("b", "S asleep"), ("c", "S running"), ("c", "S running")]
    assert items[0].seed == derive_seed("a", "a photo of S", 0, 5)
    assert len({i.output_key for i in items}) == len(items)
    assert all(i.output_key.startswith(f"{i.concept_id}/") and i.output_key.endswith(f"-i{i.index}-s{i.seed}.png")
               for i in items)


def test_plan_work_is_deterministic_and_honours_explicit_seeds() -> None:
    prompts = [PromptSpec("a photo of S", 2), PromptSpec("S again", 2, seeds=(11, 12))]
    first, second = plan_work(CONCEPTS, prompts), plan_work(CONCEPTS, prompts)
    assert first == second
    assert plan_work(CONCEPTS, prompts, base_seed=1) != first
    assert [i.seed for i in first if i.prompt == "S again"] == [11, 12] * 3
    assert len({i.output_key for i in first}) == len(first)


def test_plan_work_refuses_a_prompt_applied_twice_with_the_same_seeds() -> None:
    with pytest.raises(InputError, match=r"'S run' \(class:dog\) and \(all\)"):
        plan_work(CONCEPTS, [PromptSpec("S run"), PromptSpec("S run", class_word="dog")])


def test_batch_work_keeps_concepts_together() -> None:
    prompts = [PromptSpec("a photo of S", 3), PromptSpec("S running", 2, class_word="dog")]
    items = plan_work(CONCEPTS, prompts)
    shuffled = items[::-1]
    batches = batch_work(shuffled, 4)
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat, key=items.index) == items
    assert [i.concept_id for i in flat] == ["c"] * 5 + ["b"] * 3 + ["a"] * 5  # first-seen order of the input
    assert [i.index for i in flat[:5]] == [1, 0, 2, 1, 0]  # reversed input: order within a group is kept
    with pytest.raises(InputError, match="batch_size"):
        batch_work(items, 0)


def test_images_per_prompt_applies_to_every_prompt_of_a_file(tmp_path: Path) -> None:
    """`--images-per-prompt` / `images_per_prompt` with a prompt file (it was silently ignored there)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a S"}\n{"prompt": "a S in the snow", "images": 3}\n')
    assert [s.images for s in load_prompts(str(path))[0]] == [1, 3]  # each line's own count
    assert [s.images for s in load_prompts(str(path), 2)[0]] == [2, 2]
    assert [s.images for s in load_prompts("dreambench:object", 4)[0]] == [4] * 25
    path.write_text('{"prompt": "a S", "images": 2, "seeds": [1, 2]}\n')
    with pytest.raises(InputError, match="2 seeds for 3 images"):
        load_prompts(str(path), 3)
