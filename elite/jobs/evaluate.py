"""The evaluate job: a generation run's images -> CLIP-T, CLIP-I and DINO-I per image, aggregates, a report.

    evaluate_run("s3://shop/personalized/images/_runs/generate-20261203T101010123456Z.parquet")
    evaluate_run("outputs/catalog/images", compare="outputs/catalog-lambda06/images")

RUN is one results manifest (`<images>/_runs/generate-<stamp>.parquet`) or an images folder (every image with a
manifest row under it, the newest row per image). The concepts' source images and class words come from the
embedding store the run read (the manifest's `store_uri` column, else `store_uri` here, else the `embeddings`
folder beside the images folder, as `elite personalize` lays it out). Written beside the manifest, in
`<images>/_runs/`, named after the run (`generate-<stamp>`, or `evaluate-<stamp>` for a folder):

- `<name>-metrics.parquet`: one row per image evaluated (METRICS_SCHEMA): the three metrics, the CLIP-T text, the
  source image, the metric models and the run's generation settings;
- `<name>-aggregates.parquet`: mean and standard deviation per concept, per prompt and overall (AGGREGATE_SCHEMA);
- `<name>-evaluate-failures.parquet`: images missing, corrupt or changed since the run, unreadable sources (only
  when something failed; the other images are evaluated);
- `<name>-report.html` (self-contained: contact sheets, charts with the paper's values, the comparison) and
  `<name>-report.png` (a summary). Both doors, `elite evaluate` and the evaluate flow, run this job.
"""

from __future__ import annotations

import datetime
import logging
import posixpath
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from elite.data.objects import ObjectStore
from elite.data.sources import MASK_SUFFIX
from elite.data.storage import AnyEmbeddingStore, embedding_store
from elite.errors import EliteError, Failure, InputError, TransientStorageError, check_integer
from elite.evaluation import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, METRICS
from elite.evaluation.metrics import MetricModels, clip_t_text, cosine
from elite.evaluation.report import ReportConcept, ReportImage, ReportRun, render_html, thumbnail
from elite.evaluation.summary import render_summary_png
from elite.evaluation.tables import AGGREGATE_SCHEMA, METRICS_SCHEMA, SETTING_COLUMNS, aggregate, shared_settings
from elite.fileio import sha256_bytes
from elite.jobs.common import (
    BatchRunner,
    Locations,
    PerProcess,
    Stopwatch,
    put_failures,
    put_table,
    run_sequentially,
)
from elite.jobs.generate import MANIFESTS
from elite.jobs.runs import RunRows, read_run
from elite.model.preprocessing import open_image, to_rgb

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class EvaluationSettings:
    """The metric models and where they run."""

    clip_model: str = DEFAULT_CLIP_MODEL
    dino_model: str = DEFAULT_DINO_MODEL
    device: str = "auto"  # the GPU when torch sees one, else the CPU
    dtype: str = "auto"  # float16 on CUDA, float32 on the CPU
    class_word: str = "object"  # CLIP-T's word for concepts stored without a class_word
    thumbnail_size: int = 192  # pixels, the long side of the report's images

    def __post_init__(self) -> None:
        if not self.class_word.strip():
            raise InputError("class_word must be a non-empty word")
        if isinstance(self.thumbnail_size, bool) or not 16 <= self.thumbnail_size <= 1024:
            raise InputError(f"thumbnail_size must be 16 to 1024 pixels, got {self.thumbnail_size!r}")


@dataclass(frozen=True)
class EvalItem:
    """One generated image to score, with what it is compared to."""

    concept_id: str
    prompt: str
    placeholder: str
    index: int
    seed: int
    output_key: str  # within the run's images folder
    sha256: str | None  # as the manifest recorded it
    class_word: str
    source_uri: str | None  # None: the concept is not in the embedding store
    manifest_uri: str
    settings: dict[str, Any]  # SETTING_COLUMNS of its manifest row


@dataclass(frozen=True)
class EvalBatch:
    number: int
    items: list[EvalItem]
    thumbnails: frozenset[str]  # concepts shown in the report: their images and sources get thumbnails


@dataclass(frozen=True)
class EvalBatchResult:
    rows: list[dict[str, Any]]  # METRICS_SCHEMA rows
    failures: list[Failure]
    thumbnails: dict[str, bytes]  # output_key -> JPEG thumbnail
    sources: dict[str, tuple[bytes | None, bytes | None]]  # concept -> (source, mask) thumbnails
    seconds: dict[str, float] = field(default_factory=dict)


# ---- planning ----------------------------------------------------------------------------------------

def _sibling_store(root: ObjectStore) -> str | None:
    """`<out>/embeddings` for a run at `<out>/images`: the layout of `elite personalize`."""
    uri = root.uri()
    return posixpath.join(posixpath.dirname(uri), "embeddings") if posixpath.basename(uri) == "images" else None


def plan_items(run: RunRows, store_uri: str | None, class_word: str) -> tuple[list[EvalItem], list[Failure]]:
    """One EvalItem per manifest row, with its concept's source image and class word from the embedding store."""
    stores: dict[str, AnyEmbeddingStore] = {}
    info: dict[tuple[str, str, str | None], tuple[str, str | None]] = {}  # (store, concept, encoder) -> source, word
    failures: list[Failure] = []

    def store_of(row: dict[str, Any]) -> str:
        found = store_uri or row.get("store_uri") or _sibling_store(run.root)
        if found is None:
            raise InputError(f"{row['manifest_uri']}: the manifest does not name its embedding store (written before "
                             "elite recorded it); give the store (--store / store_uri) to find the source images")
        return str(found)

    by_store: dict[tuple[str, str | None], set[str]] = defaultdict(set)
    for row in run.rows:
        by_store[(store_of(row), row.get("encoder_id"))].add(row["concept_id"])
    for (uri, encoder_id), concept_ids in by_store.items():
        if uri not in stores:
            stores[uri] = embedding_store(uri)
            if stores[uri].is_empty():
                raise InputError(f"the embedding store at {uri} holds no concepts: give the store the run read "
                                 "(--store / store_uri)")
        table = stores[uri].read_info(sorted(concept_ids), encoder_id)
        words = table.column("class_word").to_pylist() if "class_word" in table.column_names else [None] * len(table)
        for cid, source, word in zip(table.column("concept_id").to_pylist(), table.column("source_uri").to_pylist(),
                                     words, strict=True):
            info[(uri, cid, encoder_id)] = (source, None if word is None or not str(word).strip() else str(word))
    items: list[EvalItem] = []
    unknown: set[str] = set()
    fallback: set[str] = set()
    for row in run.rows:
        uri = store_of(row)
        source, word = info.get((uri, row["concept_id"], row.get("encoder_id")), (None, None))
        if source is None and row["concept_id"] not in unknown:
            unknown.add(row["concept_id"])
            failures.append(Failure(row["concept_id"], uri, "evaluate", f"concept {row['concept_id']!r} is not in "
                                    f"the embedding store at {uri}: no source image, CLIP-I and DINO-I left empty"))
        if word is None:
            fallback.add(row["concept_id"])
        items.append(EvalItem(row["concept_id"], row["prompt"], row.get("placeholder") or "S", row["index"],
                              row["seed"], row["output_key"], row.get("sha256"), word or class_word, source,
                              row["manifest_uri"], {name: row.get(name) for name in SETTING_COLUMNS}))
    if fallback:
        logger.warning("%d concept(s) have no class_word in the embedding store; CLIP-T uses %r for them (a "
                       "manifest's class_word column sets it)", len(fallback), class_word)
    return items, failures


def batch_items(items: Sequence[EvalItem], batch_size: int, shown: frozenset[str]) -> list[EvalBatch]:
    check_integer("batch_size", batch_size, 1)
    return [EvalBatch(n, list(items[start:start + batch_size]), shown)
            for n, start in enumerate(range(0, len(items), batch_size))]


# ---- scoring -----------------------------------------------------------------------------------------

_MODELS: PerProcess[tuple[str, str, str, str], MetricModels] = PerProcess()


def load_metric_models(settings: EvaluationSettings) -> MetricModels:
    """The metric models of `settings`, loaded once per process."""
    return _MODELS.get((settings.clip_model, settings.dino_model, settings.device, settings.dtype),
                       lambda: MetricModels.from_pretrained(settings.clip_model, settings.dino_model, settings.device,
                                                            settings.dtype))


def _read_generated(root: ObjectStore, item: EvalItem) -> Image.Image:
    data = root.get(item.output_key)
    if item.sha256 and sha256_bytes(data) != item.sha256:
        raise InputError(f"{root.uri(item.output_key)}: changed since the run wrote it (sha256 differs from its "
                         "manifest row)")
    return to_rgb(open_image(data, root.uri(item.output_key)))


def _read_source(locations: Locations, uri: str) -> Image.Image:
    return to_rgb(open_image(locations.get(uri), uri))


def _read_mask(locations: Locations, source_uri: str) -> Image.Image:
    """The mask beside a source image by the release's naming (`<name>_bg.png`), for the report."""
    folder, name = posixpath.split(source_uri)
    uri = posixpath.join(folder, posixpath.splitext(name)[0] + MASK_SUFFIX)
    grey = open_image(locations.get(uri), uri).convert("L")  # none there: a StorageError, no mask shown
    return grey.point(lambda value: 255 if value else 0)  # non-zero is object: a 0/1 mask shows too


def _guarded(read: Callable[..., Image.Image], *args: Any) -> Image.Image | InputError:
    """`read(*args)`, or the error that makes its item a failure. A transient storage error propagates: the batch
    is retried as a whole."""
    try:
        return read(*args)
    except TransientStorageError:
        raise
    except EliteError as err:
        return err if isinstance(err, InputError) else InputError(str(err))


def evaluate_batch(root: ObjectStore, settings: EvaluationSettings, batch: EvalBatch) -> EvalBatchResult:
    """Score one batch: read and check its images (a missing, corrupt or changed image is a failure row, the rest
    go on), then one CLIP and one DINO forward pass over its images and their concepts' sources."""
    clock = Stopwatch()
    locations = Locations(root)
    failures: list[Failure] = []
    with clock.time("io"):
        generated = {item.output_key: _guarded(_read_generated, root, item) for item in batch.items}
        source_uris = sorted({item.source_uri for item in batch.items if item.source_uri})
        sources = {uri: _guarded(_read_source, locations, uri) for uri in source_uris}
    for item in batch.items:
        if isinstance(error := generated[item.output_key], InputError):
            failures.append(Failure(item.concept_id, root.uri(item.output_key), "read", str(error)))
    for uri in source_uris:
        if isinstance(error := sources[uri], InputError):
            concept = next(item.concept_id for item in batch.items if item.source_uri == uri)
            failures.append(Failure(concept, uri, "read", f"source image: {error}; CLIP-I and DINO-I left empty "
                                    "for its images"))
    texts: dict[str, str] = {}  # output_key -> CLIP-T text
    for item in batch.items:
        if isinstance(generated[item.output_key], Image.Image):
            try:
                texts[item.output_key] = clip_t_text(item.prompt, item.class_word, item.placeholder)
            except InputError as err:
                failures.append(Failure(item.concept_id, root.uri(item.output_key), "evaluate", str(err)))
    good = [item for item in batch.items if item.output_key in texts]
    usable = [uri for uri in source_uris if isinstance(sources[uri], Image.Image)]
    rows: list[dict[str, Any]] = []
    if good:
        with clock.time("model"):
            models = load_metric_models(settings)
            pictures = [generated[item.output_key] for item in good] + [sources[uri] for uri in usable]
            clip, dino = models.image_features([p for p in pictures if isinstance(p, Image.Image)])
            unique_texts = sorted(set(texts.values()))
            text_features = models.text_features(unique_texts)
        source_row = {uri: len(good) + n for n, uri in enumerate(usable)}
        text_row = {text: n for n, text in enumerate(unique_texts)}
        clip_t = cosine(clip[:len(good)], text_features[[text_row[texts[item.output_key]] for item in good]])
        now = datetime.datetime.now(datetime.UTC)
        for n, item in enumerate(good):
            at = source_row.get(item.source_uri) if item.source_uri else None
            rows.append({"concept_id": item.concept_id, "prompt": item.prompt, "placeholder": item.placeholder,
                         "index": item.index, "seed": item.seed, "output_key": item.output_key,
                         "output_uri": root.uri(item.output_key), "sha256": item.sha256,
                         "class_word": item.class_word, "text": texts[item.output_key], "source_uri": item.source_uri,
                         "clip_t": float(clip_t[n]),
                         "clip_i": None if at is None else float(cosine(clip[n:n + 1], clip[at:at + 1])[0]),
                         "dino_i": None if at is None else float(cosine(dino[n:n + 1], dino[at:at + 1])[0]),
                         "clip_model": models.clip_id, "dino_model": models.dino_id,
                         "manifest_uri": item.manifest_uri, **item.settings, "evaluated_at": now})
    with clock.time("io"):
        thumbs, source_thumbs = _thumbnails(batch, settings, locations, generated, sources)
    return EvalBatchResult(rows, failures, thumbs, source_thumbs, clock.seconds)


def _thumbnails(batch: EvalBatch, settings: EvaluationSettings, locations: Locations,
                generated: dict[str, Image.Image | InputError], sources: dict[str, Image.Image | InputError],
                ) -> tuple[dict[str, bytes], dict[str, tuple[bytes | None, bytes | None]]]:
    """Report thumbnails of the batch's images and sources (with masks) of the concepts the report shows."""
    size = settings.thumbnail_size
    images: dict[str, bytes] = {}
    concepts: dict[str, tuple[bytes | None, bytes | None]] = {}
    for item in batch.items:
        if item.concept_id not in batch.thumbnails:
            continue
        if isinstance(picture := generated[item.output_key], Image.Image):
            images[item.output_key] = thumbnail(picture, size)
        if item.concept_id not in concepts:
            source = sources.get(item.source_uri) if item.source_uri else None
            mask = _guarded(_read_mask, locations, item.source_uri) if item.source_uri else None
            concepts[item.concept_id] = (thumbnail(source, size) if isinstance(source, Image.Image) else None,
                                         thumbnail(mask, size) if isinstance(mask, Image.Image) else None)
    return images, concepts


# ---- tables and the report ---------------------------------------------------------------------------

def report_run(run: RunRows, items: Sequence[EvalItem], rows: Sequence[dict[str, Any]],
               aggregates: Sequence[dict[str, Any]], failures: Sequence[Failure], thumbs: dict[str, bytes],
               sources: dict[str, tuple[bytes | None, bytes | None]], settings: EvaluationSettings,
               shown: frozenset[str]) -> ReportRun:
    scored = {row["output_key"]: row for row in rows}
    failed = {f.uri: f.reason for f in failures}
    concepts: dict[str, list[ReportImage]] = defaultdict(list)
    words: dict[str, str] = {}
    for item in items:
        if item.concept_id not in shown:
            continue
        row = scored.get(item.output_key, {})
        words[item.concept_id] = item.class_word
        concepts[item.concept_id].append(ReportImage(
            item.output_key, item.prompt, row.get("text", item.prompt), item.index, item.seed, row.get("clip_t"),
            row.get("clip_i"), row.get("dino_i"), thumbs.get(item.output_key),
            None if row else failed.get(run.root.uri(item.output_key), "not evaluated")))
    overall = next((a for a in aggregates if a["level"] == "overall"), {})
    return ReportRun(
        label=run.name, uri=run.root.uri() if not run.uri.endswith(".parquet") else run.uri,
        settings=shared_settings(rows or [dict(item.settings) for item in items]),
        models={"clip": settings.clip_model, "dino": settings.dino_model},
        overall={name: overall.get(name) for name in METRICS}, evaluated=len(rows),
        concepts=[ReportConcept(cid, words[cid], *sources.get(cid, (None, None)), images=concepts[cid])
                  for cid in sorted(concepts)],
        concepts_total=len({item.concept_id for item in items}), aggregates=list(aggregates),
        failures=[f.row() for f in failures])


@dataclass(frozen=True)
class EvaluateReport:
    run_uri: str
    name: str
    evaluated: int
    images: int  # images the run's manifests list
    failures: list[Failure]
    overall: dict[str, float | None]
    aggregates: list[dict[str, Any]]
    metrics_uri: str | None  # None when no image could be evaluated
    aggregates_uri: str | None
    failures_uri: str | None  # None when nothing failed
    report_uri: str
    summary_uri: str
    compare: EvaluateReport | None
    seconds: dict[str, float]
    report: ReportRun = field(repr=False)


def evaluate_run(run_uri: str, settings: EvaluationSettings | None = None, *, store_uri: str | None = None,
                 compare: str | None = None, batch_size: int = 32, report_concepts: int = 100,
                 run_batches: Callable[[ObjectStore], BatchRunner[EvalBatch, EvalBatchResult]] | None = None,
                 progress: Callable[[int], None] | None = None) -> EvaluateReport:
    """Evaluate every image of RUN (a results manifest or an images folder) and write the tables and the report
    beside its manifests; `compare`: another run, evaluated the same way and shown side by side in this run's
    report. `report_concepts`: contact sheets for at most this many concepts (the tables hold every image).
    `run_batches(images_folder)`: how a run's batches run (default: one after the other, here); a batch that ends
    in an exception becomes failure rows for its images. `progress(n)`: called with each finished batch's size."""
    settings = settings or EvaluationSettings()
    check_integer("report_concepts", report_concepts, 0)
    other = None
    if compare is not None:
        other = evaluate_run(compare, settings, store_uri=store_uri, batch_size=batch_size,
                             report_concepts=report_concepts, run_batches=run_batches, progress=progress)
    started = time.perf_counter()
    clock = Stopwatch()
    with clock.time("io"):
        run = read_run(run_uri)
        items, failures = plan_items(run, store_uri, settings.class_word)
    failures = [*run.failures, *failures]
    if items:  # a model that cannot load is one error now, not a failure row per image later
        with clock.time("model"):
            load_metric_models(settings)
    shown = frozenset(sorted({item.concept_id for item in items})[:report_concepts])
    batches = batch_items(items, batch_size, shown)

    def run_here(batch: EvalBatch) -> EvalBatchResult:
        return evaluate_batch(run.root, settings, batch)

    runner = run_batches(run.root) if run_batches else run_sequentially(run_here)
    rows: list[dict[str, Any]] = []
    thumbs: dict[str, bytes] = {}
    sources: dict[str, tuple[bytes | None, bytes | None]] = {}
    for batch, result in zip(batches, runner(batches), strict=True):
        if isinstance(result, Exception):
            failures += [Failure(item.concept_id, run.root.uri(item.output_key), "evaluate",
                                 f"{type(result).__name__}: {result}") for item in batch.items]
        else:
            rows += result.rows
            failures += result.failures
            thumbs |= result.thumbnails
            for concept, pair in result.sources.items():
                sources.setdefault(concept, pair)
            clock.add(result.seconds)
        if progress is not None:
            progress(len(batch.items))
    aggregates = aggregate(rows)
    report = report_run(run, items, rows, aggregates, failures, thumbs, sources, settings, shown)
    prefix = f"{MANIFESTS}{run.name}"
    with clock.time("io"):
        metrics_uri = put_table(run.root, f"{prefix}-metrics.parquet", rows, METRICS_SCHEMA)
        aggregates_uri = put_table(run.root, f"{prefix}-aggregates.parquet", aggregates, AGGREGATE_SCHEMA)
        failures_uri = put_failures(run.root, f"{prefix}-evaluate-failures.parquet", failures)
        compared = other.report if other is not None else None
        run.root.put(f"{prefix}-report.html", render_html(report, compared).encode("utf-8"))
        run.root.put(f"{prefix}-report.png", render_summary_png(report, compared))
    return EvaluateReport(run_uri, run.name, len(rows), len(items), failures, report.overall, aggregates,
                          metrics_uri, aggregates_uri, failures_uri, run.root.uri(f"{prefix}-report.html"),
                          run.root.uri(f"{prefix}-report.png"), other,
                          {**clock.seconds, "wall": time.perf_counter() - started}, report)
