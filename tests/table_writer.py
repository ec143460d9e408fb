"""A writer process for tests/test_table_faults.py: appends planned batches to an embedding table, so a test can
kill it at any moment or run several at once. Run as `python tests/table_writer.py SPEC_JSON`.

Every record is a function of its concept id and image hash alone (`record`), so a reader can check any stored
row without knowing which writer, batch or try wrote it. A plan is a list of batches of (concept id, image
generation); the generation picks the image bytes, so a higher one is the concept re-encoded from a new image.

Output (stdout, one flushed line each): `ready` once imported and the table opened; after `go {JSON}` on stdin
(when the spec asks to wait; "start", "end": the batches to append, by default the whole plan; "create_race":
wall-clock times, one per new table `LOCATION-race-N` to create at that moment with one record of this writer),
`start I` before appending batch I and `done I VERSION MERGES SECONDS` after it (VERSION the version
committed or `-`, MERGES the merge attempts so far: more than the batches means conflicts redone, SECONDS the
append's); `finished` at the end.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import numpy as np

from elite.data.store_format import EmbeddingRecord
from elite.fileio import sha256_bytes

ENCODER = "enc-fault"
TEXT_DIM = 8
GRID = 3
Batch = list[tuple[str, int]]  # (concept id, image generation)


def image_sha256(concept_id: str, generation: int) -> str:
    return sha256_bytes(f"{concept_id} image {generation}".encode())


def record(concept_id: str, image_hash: str) -> EmbeddingRecord:
    """The record a writer stores for this concept and image: tensors seeded by the image hash."""
    rng = np.random.default_rng(int(image_hash[:16], 16))
    mask_grid = (rng.random((GRID, GRID)) > 0.4).astype(np.uint8)  # (grid, grid)
    local_tokens = rng.standard_normal((GRID * GRID, TEXT_DIM), dtype=np.float32) * mask_grid.reshape(-1, 1)
    words = rng.standard_normal((5, TEXT_DIM), dtype=np.float32)  # (5, text_dim)
    return EmbeddingRecord(concept_id, f"file:///images/{concept_id}.jpg", image_hash, None, ENCODER, words,
                           local_tokens, mask_grid)


def kill_plan(seed: int, batches: int, size: int = 8, reencoded: int = 3) -> list[Batch]:
    """Batches of `size`: the first all new concepts, every later one `size - reencoded` new concepts and
    `reencoded` earlier ones with a new image each."""
    rng = random.Random(seed)
    generation: dict[str, int] = {}
    plan = []
    for number in range(batches):
        old = rng.sample(sorted(generation), reencoded) if number else []
        for cid in old:
            generation[cid] += 1
        new = [f"c{len(generation) + n:04d}" for n in range(size - len(old))]
        generation.update(dict.fromkeys(new, 0))
        plan.append([(cid, generation[cid]) for cid in [*new, *old]])
    return plan


def concurrent_plan(writer: int, batches: int) -> list[Batch]:
    """Writer `writer`'s batches of 8: 3 new concepts of its own plus one of its earlier ones re-encoded (4 new
    in the first), 2 shared with every writer and stored identically by each (`same-`), 2 shared with every
    writer but each writing another image (`race-`)."""
    plan = []
    for b in range(batches):
        own = [(f"w{writer}-{b}-{j}", 0) for j in range(3 if b else 4)]
        if b:
            own.append((f"w{writer}-{b - 1}-0", 1))
        plan.append([*own, *[(f"same-{b}-{j}", 0) for j in range(2)],
                     *[(f"race-{b}-{j}", writer + 1) for j in range(2)]])
    return plan


def apply(plan: list[Batch]) -> dict[str, str]:
    """concept id -> image hash after appending `plan` in order."""
    return {cid: image_sha256(cid, generation) for batch in plan for cid, generation in batch}


def _open(location: str, spec: dict[str, Any]) -> Any:
    """The table as the jobs open it (`embedding_table`); a local one in kill and concurrent mode directly, which
    spares every writer process the import of boto3."""
    if not spec.get("endpoint"):
        from elite.data.store import EmbeddingStore

        return EmbeddingStore(location)
    from elite.data.s3 import StorageSettings
    from elite.data.storage import embedding_table

    settings = None
    if spec.get("endpoint"):
        settings = StorageSettings(endpoint_url=spec["endpoint"], region="us-east-1", access_key_id="testing",
                                   secret_access_key="testing", max_attempts=3)
    return embedding_table(location, settings)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(spec: dict[str, Any]) -> int:
    if spec["mode"] == "kill":
        plan = kill_plan(spec["seed"], spec["batches"])
    else:
        plan = concurrent_plan(spec["writer"], spec["batches"])
    store = _open(spec["location"], spec)
    merges = 0
    merge = store._merge

    def counting(*args: Any) -> Any:
        nonlocal merges
        merges += 1
        return merge(*args)

    store._merge = counting  # counts tries: a conflicting commit is redone by append
    store.version()  # open the table (None while it does not exist yet)
    _say("ready")
    go: dict[str, Any] = {}
    if spec.get("wait"):
        line = sys.stdin.readline()
        if not line.startswith("go "):
            return 3
        go = json.loads(line[3:])
    for number, at in enumerate(go.get("create_race", [])):
        # a new table each round, created by whichever writer gets there first: every writer appends at the
        # same wall-clock moment `at`
        time.sleep(max(0.0, at - time.time()))
        cid = f"w{spec['writer']}"
        _open(f"{spec['location']}-race-{number}", spec).append([record(cid, image_sha256(cid, 0))])
    for number in range(go.get("start", 0), go.get("end") or len(plan)):
        _say(f"start {number}")
        began = time.perf_counter()
        result = store.append([record(cid, image_sha256(cid, generation)) for cid, generation in plan[number]])
        took = time.perf_counter() - began
        _say(f"done {number} {'-' if result.version is None else result.version} {merges} {took:.4f}")
    _say("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
