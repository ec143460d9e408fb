"""docs/store-queries.md, run: every code block not marked `<!-- not run: ... -->` runs against a small embedding
table written by `EmbeddingStore`, and its results are checked.

Each block is marked in the doc by the HTML comment before it: `<!-- test: NAME -->` (run; `after OTHER` runs
that block's code first) or `<!-- not run: REASON -->`. Python blocks run as they are, each in a subprocess in a
folder holding the table at `embeddings/` (a subprocess: deltalake can abort the interpreter at exit, and a
process that used it must not be forked). SQL blocks are DuckDB: `duckdb-offline` and `duckdb-delta` make the
view `embeddings`, and every other SQL block is a query run on each of them. Blocks that use DuckDB's `delta`
extension run only where it is installed (it is downloaded from DuckDB's own server, which the test machines
cannot reach); the S3 block runs against moto's S3 server. Placeholders (the `delta_scan` path, the S3 URI,
endpoint and keys) are replaced by the test's own.

The table: four concepts of one encoder (version 1), one of them re-encoded from another image (version 2), and
that one also under a second encoder, with a metadata column the others lack (version 3).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable

from elite.data.store import EmbeddingStore
from elite.data.store_format import EmbeddingRecord
from elite.fileio import sha256_bytes

if TYPE_CHECKING:
    from s3_server import MotoS3  # only for types: see s3_server's docstring

pytest_plugins = ["s3_server"]

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "store-queries.md"
ENCODER = "onnx-3c9d2f7a"  # the doc's encoder id
OTHER_ENCODER = "torch-5e17b0c4"
TEXT_DIM, GRID = 8, 4
IDS = [f"sku-{n:06d}" for n in range(4)]
TENSORS = {"words", "local_tokens", "mask_grid"}
# the blocks the doc does not run, by their reason: exactly these (a new one must be added here on purpose)
NOT_RUN = {
    "needs the DuckDB delta and httpfs extensions and an S3 endpoint",
    "needs Spark with delta-spark",
    "needs Spark or Databricks",
}
DELTA_SCAN_PATH = "/data/embeddings"  # in the doc's delta_scan('file:///data/embeddings')
S3_PLACEHOLDERS = ("s3://my-bucket/embeddings/", "http://minio.internal:9000", "<access key id>",
                   "<secret access key>")
SETUPS = ("duckdb-offline", "duckdb-delta")  # the blocks that make the view `embeddings`
BLOCK_TIMEOUT_S = 120


# ---- the doc's blocks ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    name: str | None  # None: not run
    after: str | None
    not_run: str | None  # the reason

    @property
    def needs_delta_extension(self) -> bool:
        return "delta_scan(" in self.code or "LOAD delta" in self.code


FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*(?:test:\s*(?P<name>[\w-]+)(?:\s+after\s+(?P<after>[\w-]+))?|not run:\s*(?P<why>.+?))"
                    r"\s*-->")


def parse_blocks(text: str) -> list[Block]:
    blocks = []
    for fence in FENCE.finditer(text):
        line = text.count("\n", 0, fence.start()) + 1
        before = text[:fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        if marker is None:
            raise AssertionError(f"{DOC.name}:{line}: a code block without a marker: put `<!-- test: NAME -->` (and a "
                                 f"check in {Path(__file__).name}) or `<!-- not run: REASON -->` before it")
        blocks.append(Block(line, fence.group(1), fence.group(2), marker.group("name"), marker.group("after"),
                            marker.group("why")))
    return blocks


BLOCKS = parse_blocks(DOC.read_text())
BY_NAME = {block.name: block for block in BLOCKS if block.name is not None}


@dataclass(frozen=True)
class Run:
    """One test case: a block, or a SQL query on the view one setup block made."""

    block: Block
    setup: str | None  # for a SQL query: the block that made the view

    @property
    def id(self) -> str:
        assert self.block.name is not None
        return self.block.name if self.setup is None else f"{self.block.name}[{self.setup}]"

    @property
    def program(self) -> str:
        """The subprocess that runs it: a setup's runs all the queries on its view, one after another."""
        return self.setup or self.id

    @property
    def needs_delta_extension(self) -> bool:
        return self.block.needs_delta_extension or self.setup == "duckdb-delta"


def plan() -> list[Run]:
    runs = []
    for block in BLOCKS:
        if block.name is None:
            continue
        if block.lang == "sql" and block.name not in SETUPS:  # a query: on each view (delta_scan: the delta one)
            runs += [Run(block, setup) for setup in SETUPS
                     if setup == "duckdb-delta" or not block.needs_delta_extension]
        else:
            runs.append(Run(block, None))
    return runs


RUNS = plan()


# ---- the table -------------------------------------------------------------------------------------------------

def record(n: int, version: int = 0, encoder_id: str = ENCODER, **metadata: Any) -> EmbeddingRecord:
    """Random arrays; `version` is a re-encode from other image bytes (other values too)."""
    rng = np.random.default_rng(100 * n + version + (1000 if encoder_id != ENCODER else 0))
    mask_grid = (rng.random((GRID, GRID)) > 0.4).astype(np.uint8)  # (grid, grid)
    local_tokens = rng.standard_normal((GRID * GRID, TEXT_DIM), dtype=np.float32) * mask_grid.reshape(-1, 1)
    return EmbeddingRecord(
        concept_id=IDS[n], source_uri=f"s3://catalog/{n}.jpg",
        image_sha256=sha256_bytes(f"image {n} v{version}".encode()),
        mask_sha256=sha256_bytes(f"mask {n}".encode()) if n % 2 == 0 else None, encoder_id=encoder_id,
        words=rng.standard_normal((5, TEXT_DIM), dtype=np.float32), local_tokens=local_tokens,
        mask_grid=mask_grid, metadata=metadata)


@dataclass(frozen=True)
class Table:
    folder: Path  # holds the table at embeddings/
    current: dict[tuple[str, str], EmbeddingRecord]  # (concept id, encoder id) -> the current row's record
    version_1: dict[str, EmbeddingRecord]  # concept id -> its record at version 1 (all of ENCODER)

    @property
    def keys(self) -> list[tuple[str, str]]:
        return sorted(self.current)

    def of(self, concept_id: str, encoder_id: str = ENCODER) -> EmbeddingRecord:
        return self.current[(concept_id, encoder_id)]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Table:
    folder = tmp_path_factory.mktemp("store-queries")
    store = EmbeddingStore(folder / "embeddings", row_group_rows=2)
    first = [record(n, class_word="shoe" if n < 2 else "bag") for n in range(4)]
    reencoded = record(1, version=1, class_word="shoe")
    other = record(1, encoder_id=OTHER_ENCODER, class_word="shoe", sku="SKU-1")  # the id the doc queries
    assert store.append(first).version == 1
    assert store.append([reencoded]).version == 2  # replaces sku-000001's row: the old one stays in version 1
    assert store.append([other]).version == 3  # adds the column `sku` (null in the other rows)
    current = {(r.concept_id, r.encoder_id): r for r in [*first, reencoded, other]}
    return Table(folder, current, {r.concept_id: r for r in first})


# ---- running the blocks ----------------------------------------------------------------------------------------

def substituted(code: str, substitutions: dict[str, str]) -> str:
    for placeholder, value in substitutions.items():
        code = code.replace(placeholder, value)
    return code


def python_chain(block: Block) -> str:
    """The block's code after the code of the blocks it runs after."""
    if block.after is None:
        return block.code
    return python_chain(BY_NAME[block.after]) + "\n" + block.code


def sql_setup(block: Block) -> str:
    """Python that leaves the DuckDB connection `con` with the view `embeddings` made by a setup block."""
    if block.lang == "python":
        return python_chain(block)
    return f"import duckdb\ncon = duckdb.connect()\ncon.execute({block.code!r})\n"


def program(runs: list[Run], substitutions: dict[str, str]) -> str:
    """One script for the runs of one program: its results (or a query's error) by run id, pickled."""
    first = runs[0]
    if first.program not in SETUPS:
        code = python_chain(first.block) + f"\n_results = {{{first.id!r}: {PROBES[first.id]}}}\n"
    else:
        setup = BY_NAME[first.program]
        code = sql_setup(setup) + f"\n_results = {{{setup.name!r}: {PROBES[first.program]}}}\n"
        code += "\nimport traceback as _traceback\n"
        for run in runs:
            if run.setup is not None:
                code += (f"try:\n    _relation = con.sql({run.block.code!r})\n"
                         f"    _results[{run.id!r}] = {{'columns': _relation.columns, 'rows': _relation.fetchall()}}\n"
                         f"except Exception:\n    _results[{run.id!r}] = {{'error': _traceback.format_exc()}}\n")
    return (substituted(code, substitutions) + "\nimport os as _os\nimport pickle as _pickle\n"
            "with open(_os.environ['ELITE_DOC_RESULT'], 'wb') as _out:\n    _pickle.dump(_results, _out)\n")


@dataclass(frozen=True)
class Outcome:
    returncode: int
    output: str
    results: dict[str, Any]  # by run id


def execute(name: str, code: str, folder: Path, scratch: Path) -> Outcome:
    script = scratch / f"doc-{name}.py"  # not importable: a block named `polars` must not shadow polars
    script.write_text(code)
    result_file = scratch / f"doc-{name}.pkl"
    env = {**os.environ, "ELITE_DOC_RESULT": str(result_file)}
    done = subprocess.run([sys.executable, "-W", "error", str(script)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT_S)
    results = {}
    if done.returncode == 0:
        with result_file.open("rb") as f:
            results = pickle.load(f)
    return Outcome(done.returncode, done.stdout + done.stderr, results)


def delta_extension_error() -> str | None:
    """None where DuckDB's delta extension loads; else why not (looked up without downloading anything)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        con.execute("LOAD delta")
    except duckdb.Error as err:
        return str(err).splitlines()[0]
    finally:
        con.close()
    return None


@pytest.fixture(scope="module")
def delta_extension() -> str | None:
    return delta_extension_error()


@pytest.fixture(scope="module")
def outcomes(table: Table, s3_server: MotoS3, delta_extension: str | None,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every run of the plan that can run here, at once (each is a subprocess of about a second)."""
    prefix = f"store-queries/{uuid.uuid4().hex}/embeddings"
    files = [p for p in (table.folder / "embeddings").rglob("*") if p.is_file()]
    s3_server.seed((f"{prefix}/{p.relative_to(table.folder / 'embeddings').as_posix()}", p.read_bytes()) for p in files)
    substitutions = {
        DELTA_SCAN_PATH: (table.folder / "embeddings").as_posix(),
        "s3://my-bucket/embeddings/": f"s3://{s3_server.bucket}/{prefix}/",
        "http://minio.internal:9000": s3_server.endpoint,
        "<access key id>": "testing",
        "<secret access key>": "testing",
    }
    scratch = tmp_path_factory.mktemp("store-queries-programs")
    programs: dict[str, list[Run]] = {}
    for run in RUNS:
        if delta_extension is None or not run.needs_delta_extension:
            programs.setdefault(run.program, []).append(run)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(execute, name, program(runs, substitutions), table.folder, scratch)
                   for name, runs in programs.items()}
        return {name: future.result() for name, future in futures.items()}


# ---- what each block must give ---------------------------------------------------------------------------------

# python expressions evaluated after a block, in its namespace: what the check gets (plain Python and numpy only)
# (a SQL query's result is its columns and rows; a setup's probe runs before its queries)
PROBES: dict[str, str] = {
    "duckdb-offline": "con.sql('SELECT concept_id, encoder_id FROM embeddings ORDER BY ALL').fetchall()",
    "duckdb-delta": "con.sql('SELECT concept_id, encoder_id FROM embeddings ORDER BY ALL').fetchall()",
    "duckdb-offline-version": "old_image",
    "polars": ("{'info': info.to_dicts(), 'schema': {k: str(v) for k, v in info.schema.items()}, "
               "'w0': primary_words.rows(), 'version_1': sorted(version_1.rows())}"),
    "pandas": ("{'info': info.to_dict('records'), 'dtypes': {k: str(v) for k, v in info.dtypes.items()}, "
               "'version_1': sorted(version_1[['concept_id', 'encoder_id', 'image_sha256']]"
               ".itertuples(index=False, name=None))}"),
    "decode": "{'words': words, 'local_tokens': local_tokens, 'mask_grid': mask_grid}",
    "decode-all": ("{'ids': frame['concept_id'].to_list(), 'words': all_words, 'local_tokens': all_tokens, "
                   "'mask_grid': all_masks}"),
    "s3": ("{'rows': s3_rows, 'version_1': sorted(s3_version_1.rows()), "
           "'pandas': sorted(s3_info.itertuples(index=False, name=None))}"),
}


def check_setup(result: Any, table: Table) -> None:
    assert result == table.keys  # one row per concept and encoder: the replaced row of sku-000001 is not there


def check_overview(result: Any, table: Table) -> None:
    assert result["columns"] == ["concept_id", "class_word", "image_sha256", "created_at", "words", "text_dim",
                                 "patches"]
    assert [row[0] for row in result["rows"]] == IDS  # one row each, the other encoder's left out
    for concept_id, class_word, image, created_at, words, text_dim, patches in result["rows"]:
        stored = table.of(concept_id)
        assert (class_word, image) == (stored.metadata["class_word"], stored.image_sha256)
        assert created_at.tzinfo is not None  # TIMESTAMP WITH TIME ZONE
        assert (words, text_dim, patches) == (5, TEXT_DIM, GRID * GRID)


def check_without_tensors(result: Any, table: Table) -> None:
    assert result["columns"] == ["concept_id", "source_uri", "image_sha256", "mask_sha256", "encoder_id",
                                 "created_at", "schema_version", "class_word", "sku"]
    rows = {(row[0], row[4]): dict(zip(result["columns"], row, strict=True)) for row in result["rows"]}
    assert sorted(rows) == table.keys and len(result["rows"]) == len(table.keys)
    for key, row in rows.items():
        stored = table.current[key]
        assert (row["image_sha256"], row["mask_sha256"], row["source_uri"]) == (
            stored.image_sha256, stored.mask_sha256, stored.source_uri)
        assert row["schema_version"] == 2 and row["sku"] == stored.metadata.get("sku")


def check_rows_per_encoder(result: Any, table: Table) -> None:
    assert result["rows"] == [(ENCODER, 4, 4), (OTHER_ENCODER, 1, 1)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_nearest(result: Any, table: Table) -> None:
    assert result["columns"] == ["concept_id", "class_word", "similarity"]
    rows = result["rows"]
    assert rows[0][0] == "sku-000001" and rows[0][2] == pytest.approx(1.0, abs=1e-6)  # the concept itself
    assert sorted(row[0] for row in rows) == IDS  # each once, this encoder's only
    assert [row[2] for row in rows] == sorted((row[2] for row in rows), reverse=True)
    query = table.of("sku-000001").words[0]  # its current (re-encoded) primary word
    for concept_id, class_word, similarity in rows:
        assert class_word == table.of(concept_id).metadata["class_word"]
        assert similarity == pytest.approx(cosine(table.of(concept_id).words[0], query), abs=1e-5)


def check_delta_version(result: Any, table: Table) -> None:
    assert result["rows"] == [("sku-000001", table.version_1["sku-000001"].image_sha256)]


def check_offline_version(result: Any, table: Table) -> None:
    assert result == table.version_1["sku-000001"].image_sha256 != table.of("sku-000001").image_sha256


def check_polars(result: Any, table: Table) -> None:
    assert [row["concept_id"] for row in result["info"]] == IDS
    assert not TENSORS & set(result["schema"])
    assert result["schema"]["concept_id"] == "String" and result["schema"]["schema_version"] == "Int32"
    assert result["schema"]["created_at"] == "Datetime(time_unit='us', time_zone='UTC')"
    for row in result["info"]:
        stored = table.of(row["concept_id"])
        assert (row["image_sha256"], row["class_word"], row["sku"]) == (
            stored.image_sha256, stored.metadata["class_word"], None)
    assert [cid for cid, _ in result["w0"]] == IDS
    for concept_id, w0 in result["w0"]:
        assert np.array_equal(np.asarray(w0, np.float32), table.of(concept_id).words[0])
    assert result["version_1"] == sorted((r.concept_id, ENCODER, r.image_sha256) for r in table.version_1.values())


def check_pandas(result: Any, table: Table) -> None:
    assert [row["concept_id"] for row in result["info"]] == IDS
    assert result["dtypes"]["created_at"] == "datetime64[us, UTC]"
    for row in result["info"]:
        stored = table.of(row["concept_id"])
        assert (row["image_sha256"], row["class_word"]) == (stored.image_sha256, stored.metadata["class_word"])
    assert result["version_1"] == sorted((r.concept_id, ENCODER, r.image_sha256) for r in table.version_1.values())


def check_decode(result: Any, table: Table) -> None:
    stored = table.of("sku-000001")
    assert result["words"].dtype == np.float32 and result["words"].tobytes() == stored.words.tobytes()
    assert result["local_tokens"].dtype == np.float16 and result["local_tokens"].shape == (GRID * GRID, TEXT_DIM)
    assert result["local_tokens"].tobytes() == stored.local_tokens.tobytes()  # bit for bit
    assert result["mask_grid"].dtype == np.uint8 and np.array_equal(result["mask_grid"], stored.mask_grid)


def check_decode_all(result: Any, table: Table) -> None:
    assert result["ids"] == IDS
    stored = [table.of(concept_id) for concept_id in IDS]
    assert result["words"].shape == (4, 5, TEXT_DIM)
    assert result["words"].tobytes() == np.stack([r.words for r in stored]).tobytes()
    assert result["local_tokens"].tobytes() == np.stack([r.local_tokens for r in stored]).tobytes()
    assert np.array_equal(result["mask_grid"], np.stack([r.mask_grid for r in stored]))


def check_s3(result: Any, table: Table) -> None:
    assert result["rows"] == table.keys
    assert result["version_1"] == sorted((r.concept_id, r.image_sha256) for r in table.version_1.values())
    assert result["pandas"] == sorted((*key, r.image_sha256) for key, r in table.current.items())


CHECKS: dict[str, Callable[[Any, Table], None]] = {
    "duckdb-delta": check_setup,
    "duckdb-offline": check_setup,
    "overview": check_overview,
    "without-tensors": check_without_tensors,
    "rows-per-encoder": check_rows_per_encoder,
    "nearest": check_nearest,
    "duckdb-delta-version": check_delta_version,
    "duckdb-offline-version": check_offline_version,
    "polars": check_polars,
    "pandas": check_pandas,
    "decode": check_decode,
    "decode-all": check_decode_all,
    "s3": check_s3,
}


# ---- the tests -------------------------------------------------------------------------------------------------

def test_every_block_is_run_or_marked_not_run() -> None:
    names = [block.name for block in BLOCKS if block.name is not None]
    assert len(names) == len(set(names)), f"block names repeat: {names}"
    assert set(names) == set(CHECKS), "every run block has a check here, and every check a block"
    assert set(SETUPS) <= set(names)
    for block in BLOCKS:
        assert block.lang in {"python", "sql"}, f"{DOC.name}:{block.line}: a {block.lang!r} block cannot be run"
        if block.after is not None:
            before = BY_NAME.get(block.after)
            assert before is not None and before.lang == "python" and before.line < block.line, (
                f"{DOC.name}:{block.line}: runs after {block.after!r}, which is no python block above it")
    # the blocks that are not run are exactly the ones marked so, for the reasons expected
    run_lines = {run.block.line for run in RUNS}
    not_run = [block.not_run for block in BLOCKS if block.line not in run_lines]
    assert sorted(str(reason) for reason in not_run) == sorted(NOT_RUN)
    assert len(not_run) == sum(block.not_run is not None for block in BLOCKS)
    # and the ones needing DuckDB's delta extension are those that use it
    assert {run.id for run in RUNS if run.needs_delta_extension} == {
        "duckdb-delta", "duckdb-delta-version[duckdb-delta]",
        *(f"{name}[duckdb-delta]" for name in ("overview", "without-tensors", "rows-per-encoder", "nearest"))}


def test_placeholders_are_in_the_blocks_that_use_them() -> None:
    """The substitutions take effect: a doc edit that renames a placeholder fails here, not silently."""
    for placeholder in S3_PLACEHOLDERS:
        assert placeholder in BY_NAME["s3"].code, placeholder
    for name in ("duckdb-delta", "duckdb-delta-version"):
        assert f"'file://{DELTA_SCAN_PATH}'" in BY_NAME[name].code, name
    assert all("embeddings/" in BY_NAME[name].code for name in ("duckdb-offline", "polars", "pandas", "decode"))


@pytest.mark.parametrize("run", RUNS, ids=[run.id for run in RUNS])
def test_block(run: Run, outcomes: dict[str, Outcome], table: Table, delta_extension: str | None) -> None:
    if run.program not in outcomes:
        assert run.needs_delta_extension and delta_extension is not None
        pytest.skip(f"DuckDB's delta extension is not installed here ({delta_extension}); "
                    f"`INSTALL delta` downloads it from DuckDB's extension server")
    outcome = outcomes[run.program]
    where = f"{DOC.name}:{run.block.line} ({run.id})"
    assert outcome.returncode == 0, f"{where}: its program ({run.program}) exited with {outcome.returncode}:\n" \
                                    f"{outcome.output}"
    result = outcome.results[run.id]
    assert not (isinstance(result, dict) and "error" in result), f"{where} failed:\n{result['error']}"
    assert run.block.name is not None
    CHECKS[run.block.name](result, table)


def test_string_filters_in_pyarrow_still_fail(table: Table) -> None:
    """The first caveat in the doc: if this starts passing (a deltalake or pyarrow release fixed it), update the
    doc's "Caveats" and simplify its DuckDB helper."""
    path = str(table.folder / "embeddings")
    dataset = DeltaTable(path).to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(path, pafs.LocalFileSystem()))
    assert dataset.schema.field("concept_id").type == pa.string()
    with pytest.raises(pa.ArrowNotImplementedError, match="string_view"):
        dataset.to_table(filter=pc.field("concept_id") == "sku-000001", use_threads=False)


def test_a_parquet_glob_sees_replaced_rows(table: Table) -> None:
    """Why the doc reads the table through its log: the folder still holds the row sku-000001 had at version 1."""
    glob = (table.folder / "embeddings" / "*.parquet").as_posix()
    rows = duckdb.sql(f"SELECT image_sha256 FROM read_parquet('{glob}', union_by_name = true) "
                      f"WHERE concept_id = 'sku-000001' AND encoder_id = '{ENCODER}'").fetchall()
    assert sorted(rows) == sorted([(table.version_1["sku-000001"].image_sha256,),
                                   (table.of("sku-000001").image_sha256,)])


def test_table_has_the_versions_the_doc_reads(table: Table) -> None:
    history = EmbeddingStore(table.folder / "embeddings").history()
    assert [entry["version"] for entry in history] == [3, 2, 1, 0]
