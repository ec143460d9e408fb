"""The evaluation report: a run's already-computed metrics as one self-contained HTML page (its PNG summary:
elite.evaluation.summary).

    page = render_html(run)                    # header, charts with the paper's values, contact sheets, failures
    page = render_html(run, compare=other)     # ... and the two runs side by side (id "comparison")
    data = thumbnail(image_or_bytes, 192)      # the JPEG thumbnails the report objects carry

The page refers to nothing outside itself (inline CSS, SVG charts, images as data: URIs), so it can be stored
beside the run, mailed or opened offline, and it reads without JavaScript. Concept ids, prompts, URIs and reasons
come from users: every string from the data is escaped. This module only lays out; the evaluate job
(elite.jobs.evaluate) computes the metrics, the aggregates and the thumbnails.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from html import escape
from typing import Any, TypeVar

from PIL import Image, ImageOps

from elite.errors import InputError
from elite.evaluation import METRIC_LABELS, METRICS, PAPER_TABLE1
from elite.model.preprocessing import to_rgb

PAPER = "paper (ELITE)"
MAX_BARS = 60  # concepts per chart: more bars than this no longer read as bars
COLOURS = ("#3566a8", "#e0882b")  # the run, the compared run (charts and the PNG)
REFERENCE_COLOUR = "#c0392b"
NO_VALUE = "—"
_Key = TypeVar("_Key", bound=Hashable)


@dataclass(frozen=True)
class ReportImage:
    output_key: str  # unique within a run, e.g. "dog1/0a1b2c3d4e-i0-s123.png"
    prompt: str  # the template with its placeholder, e.g. "a photo of a S on the beach"
    text: str  # the CLIP-T text, e.g. "a photo of a dog on the beach"
    index: int
    seed: int
    clip_t: float | None
    clip_i: float | None
    dino_i: float | None
    thumbnail: bytes | None  # JPEG or PNG bytes; None: the image could not be read
    failure: str | None = None  # why the image could not be evaluated (its metrics are then None)


@dataclass(frozen=True)
class ReportConcept:
    concept_id: str
    class_word: str
    source: bytes | None  # thumbnail of the concept's source image; None: unreadable
    mask: bytes | None  # thumbnail of its object mask; None: no mask
    images: list[ReportImage]


@dataclass(frozen=True)
class ReportRun:
    label: str  # short name shown on the page, e.g. "generate-20261203T101010123456Z"
    uri: str  # what was evaluated: a manifest URI or a folder
    settings: dict[str, str]  # generation settings as text ("mixed" where the images differ)
    models: dict[str, str]  # metric models, e.g. {"clip": "openai/clip-vit-base-patch32", ...}
    overall: dict[str, float | None]  # mean of each metric over the run's images
    evaluated: int  # images evaluated
    concepts: list[ReportConcept]  # the concepts shown (may be fewer than the run has)
    concepts_total: int  # concepts in the run
    aggregates: list[dict[str, Any]]  # {level: "overall"|"concept"|"prompt", key, images, clip_t, clip_i, dino_i}
    failures: list[dict[str, str]]  # {concept_id, uri, stage, reason}


def thumbnail(data: bytes | Image.Image, size: int = 192) -> bytes:
    """A JPEG of at most `size` pixels a side, aspect kept, so a page of hundreds of images stays a few MB. Any
    mode is accepted (RGBA, palette, 16-bit masks: `to_rgb`); bytes PIL cannot decode raise PIL's own error, for
    the caller to record as a failure."""
    if isinstance(data, bytes):
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            rgb = to_rgb(ImageOps.exif_transpose(opened))
    else:
        rgb = to_rgb(data)
    rgb.thumbnail((size, size), Image.Resampling.LANCZOS)  # in place: to_rgb returned a new image
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------- values

def as_number(value: Any) -> float | None:
    """A metric as a float, None when missing or not finite (a NaN mean of no images)."""
    return float(value) if value is not None and math.isfinite(value) else None


def format_value(value: Any, none: str = NO_VALUE) -> str:
    number = as_number(value)
    return none if number is None else f"{number:.3f}"


def _delta(a: Any, b: Any, none: str = NO_VALUE) -> str:
    x, y = as_number(a), as_number(b)
    return none if x is None or y is None else f"{x - y:+.3f}"


def axis_range(values: Iterable[Any]) -> tuple[float, float]:
    """A chart's range in steps of 0.1, holding every value and the paper's: CLIP-T (about 0.25) gets a readable
    bar rather than a sliver of 0..1; bars still start at 0, and a (rare) negative cosine stays on the chart."""
    known = [v for v in map(as_number, values) if v is not None]
    lo = min(0.0, math.floor(round(min(known, default=0.0) * 10, 6)) / 10)
    hi = max(lo + 0.1, math.ceil(round(max(known, default=1.0) * 10, 6)) / 10)
    return lo, hi


def _levels(run: ReportRun, level: str) -> dict[str, dict[str, Any]]:
    return {str(row["key"]): row for row in run.aggregates if row.get("level") == level}


def _union(*key_lists: Iterable[_Key]) -> list[_Key]:
    """The keys of all lists, each once, in order of first appearance."""
    return list(dict.fromkeys(key for keys in key_lists for key in keys))


def _metric_line(image: ReportImage, none: str = NO_VALUE) -> str:
    return "  ".join(f"{METRIC_LABELS[m]} {format_value(getattr(image, m), none)}" for m in METRICS)


def count_noun(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    raise InputError("a report thumbnail must be JPEG or PNG bytes (made by elite.evaluation.report.thumbnail)")


def _data_uri(data: bytes) -> str:
    return f"data:{_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


# ------------------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{margin:0;background:#f5f6f8;color:#1d232b;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif}
main{max-width:1400px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:24px;margin:0 0 8px}h2{font-size:19px;margin:32px 0 12px}h3{font-size:16px;margin:0 0 10px}
small,.note{color:#5b6573}code{font-size:13px;word-break:break-all}
section.card,header{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:16px 20px;margin-top:16px}
section.card>h2:first-child{margin-top:0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:8px 0 0}dt{color:#5b6573}dd{margin:0}
.overall{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.metric{border:1px solid #dde1e7;border-radius:8px;padding:8px 16px;min-width:170px}
.metric .value{font-size:26px;font-weight:600}.metric .paper{color:#5b6573;font-size:13px}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 10px;border-bottom:1px solid #e5e8ec;text-align:left}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.bar{background:linear-gradient(90deg,var(--c) var(--v),transparent var(--v))}
td.bar.a{--c:#d7e3f4}td.bar.b{--c:#f7dfc4}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:16px}
.charts figure{margin:0}.charts figcaption{font-weight:600;margin-bottom:4px}svg.chart{max-width:100%;height:auto}
.legend span{display:inline-block;width:12px;height:12px;border-radius:2px;margin:0 4px 0 12px;vertical-align:-1px}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(176px,1fr));gap:12px}
figure.image{margin:0;background:#fafbfc;border:1px solid #e5e8ec;border-radius:6px;padding:6px}
figure.image img,.placeholder{display:block;width:100%;height:164px;object-fit:contain;background:#eef0f3;
border-radius:4px}
.placeholder{box-sizing:border-box;display:flex;align-items:center;justify-content:center;text-align:center;
padding:8px;border:2px dashed #b9c0ca;color:#7a4a4a;font-size:12px;overflow:hidden;word-break:break-word}
figcaption{font-size:12px;margin-top:4px}figcaption q{display:block;font-style:italic}
.values{font-variant-numeric:tabular-nums;color:#3a4350}
section.concept{border-top:1px solid #e5e8ec;padding-top:14px;margin-top:14px}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.pair{display:grid;grid-template-columns:1fr 1fr 118px;gap:8px;align-items:start;border:1px solid #e5e8ec;
border-radius:6px;padding:6px}.pair figure:nth-child(1){border-top:3px solid #3566a8}
.pair figure:nth-child(2){border-top:3px solid #e0882b}
.deltas{font-size:12px;white-space:nowrap;font-variant-numeric:tabular-nums}.pos{color:#1e7b34}.neg{color:#b03a2e}
"""


def render_html(run: ReportRun, compare: ReportRun | None = None) -> str:
    """The report page: header with the paper's values, settings, charts, per-prompt means, the comparison (with
    `compare`), the contact sheets and the failures."""
    runs = [run] if compare is None else [run, compare]
    title = run.label if compare is None else f"{run.label} vs {compare.label}"
    body = [
        _header(run),
        _settings(run),
        _charts(runs),
        _prompt_table(runs),
        "" if compare is None else _comparison(run, compare),
        _contact_sheets(run),
        _failures(runs),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>ELITE evaluation: {escape(title)}</title><style>{_CSS}</style></head>\n"
            "<body><main>\n" + "\n".join(part for part in body if part) + "\n</main></body></html>\n")


def _header(run: ReportRun) -> str:
    models = ", ".join(f"{name}: {model}" for name, model in run.models.items()) or NO_VALUE
    shown = f"{len(run.concepts)} of {run.concepts_total} concepts shown"
    failed = f' · <a href="#failures">{count_noun(len(run.failures), "failure")}</a>' if run.failures else ""
    cards = "".join(
        f'<div class="metric"><div>{METRIC_LABELS[m]}</div><div class="value">{format_value(run.overall.get(m))}</div>'
        f'<div class="paper">{PAPER} {PAPER_TABLE1[m]:.3f} · Δ {_delta(run.overall.get(m), PAPER_TABLE1[m])}</div>'
        "</div>" for m in METRICS)
    return (f"<header><h1>ELITE evaluation: {escape(run.label)}</h1><dl class=\"facts\">"
            f"<dt>evaluated</dt><dd><code>{escape(run.uri)}</code></dd>"
            f"<dt>images</dt><dd>{run.evaluated} evaluated · {shown}{failed}</dd>"
            f"<dt>metric models</dt><dd>{escape(models)}</dd></dl>"
            f'<div class="overall">{cards}</div><p class="note">Overall means over the images evaluated; the paper\'s '
            "values are its Table 1 (DreamBench, CLIP ViT-B/32, DINO ViT-S/16).</p></header>")


def _settings(run: ReportRun) -> str:
    rows = "".join(f"<tr><th>{escape(key)}</th><td>{escape(value)}</td></tr>" for key, value in run.settings.items())
    return f'<section class="card" id="settings"><h2>Generation settings</h2><table>{rows}</table></section>'


def _legend(runs: list[ReportRun], reference: bool = True) -> str:
    if len(runs) == 1:
        return ""
    keys = "".join(f'<span style="background:{colour}"></span>{escape(r.label)}'
                   for r, colour in zip(runs, COLOURS, strict=False))
    paper = f'<span style="background:{REFERENCE_COLOUR}"></span>{PAPER} (dashed)' if reference else ""
    return f'<p class="legend">{keys}{paper}</p>'


def _charts(runs: list[ReportRun]) -> str:
    """One chart per metric of the per-concept means, each run a colour, the paper's value a dashed line."""
    means = [_levels(r, "concept") for r in runs]
    keys = _union(*means)
    note = f'<p class="note">The first {MAX_BARS} of {len(keys)} concepts.</p>' if len(keys) > MAX_BARS else ""
    figures = "".join(
        f"<figure><figcaption>{METRIC_LABELS[m]}</figcaption>"
        + _svg_bars(m, [(key, [as_number(level.get(key, {}).get(m)) for level in means]) for key in keys[:MAX_BARS]],
                    [r.label for r in runs])
        + "</figure>" for m in METRICS)
    return (f'<section class="card" id="charts"><h2>Per-concept means</h2>{_legend(runs)}{note}'
            f'<div class="charts">{figures}</div></section>')


def _svg_bars(metric: str, rows: list[tuple[str, list[float | None]]], labels: list[str]) -> str:
    """Horizontal bars on one scale with the paper's Table 1 value as a dashed line; every value also as text."""
    reference = PAPER_TABLE1[metric]
    lo, hi = axis_range([reference, *(v for _, values in rows for v in values)])
    left, plot, top, bar, gap = 118, 220, 24, 14, 8
    width, group = left + plot + 48, bar * len(labels) + gap
    bottom = top + group * max(len(rows), 1)
    height = bottom + 22

    def x(value: float) -> float:
        return left + plot * (value - lo) / (hi - lo)

    svg = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-size="11" '
           f'font-family="sans-serif" role="img" aria-label="{METRIC_LABELS[metric]} per concept">']
    for step in range(round((hi - lo) * 10) + 1):
        tick = lo + step / 10
        svg.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{bottom}" stroke="#e3e6ea"/>'
                   f'<text x="{x(tick):.1f}" y="{bottom + 15}" text-anchor="middle" fill="#5b6573">{tick:.1f}</text>')
    for row, (key, values) in enumerate(rows):
        y = top + row * group
        short = key if len(key) <= 18 else key[:17] + "…"
        svg.append(f'<text x="{left - 6}" y="{y + group / 2 + 1:.1f}" text-anchor="end" dominant-baseline="middle">'
                   f"<title>{escape(key)}</title>{escape(short)}</text>")
        for series, value in enumerate(values):
            svg.append(_svg_bar(x, value, y + series * bar, bar - 2, COLOURS[series], f"{key}, {labels[series]}")
                       + f'<text x="{left + plot + 6}" y="{y + series * bar + bar - 4}">{format_value(value)}</text>')
    ref_x = x(reference)
    svg.append(f'<line x1="{ref_x:.1f}" x2="{ref_x:.1f}" y1="{top - 6}" y2="{bottom}" stroke="{REFERENCE_COLOUR}" '
               f'stroke-width="1.5" stroke-dasharray="5 3"/><text x="{ref_x:.1f}" y="{top - 10}" '
               f'text-anchor="middle" fill="{REFERENCE_COLOUR}">{PAPER} {reference:.3f}</text></svg>')
    return "".join(svg)


def _svg_bar(x: Any, value: float | None, y: float, height: int, colour: str, name: str) -> str:
    if value is None:
        return ""
    start, end = x(min(value, 0.0)), x(max(value, 0.0))
    return (f'<rect x="{start:.1f}" y="{y}" width="{end - start:.1f}" height="{height}" fill="{colour}">'
            f"<title>{escape(name)}: {value:.3f}</title></rect>")


def _prompt_table(runs: list[ReportRun]) -> str:
    """Per-prompt means as a table, each value over a bar on its metric's scale (the charts' scale rule)."""
    means = [_levels(r, "prompt") for r in runs]
    keys = _union(*means)
    if not keys:
        return ""
    scales = {m: axis_range([PAPER_TABLE1[m], *(level[k].get(m) for level in means for k in level)]) for m in METRICS}
    names = "".join(f"<th>{escape(r.label)}</th>" for r in runs) + ("<th>Δ</th>" if len(runs) == 2 else "")
    head = ("<tr><th rowspan=\"2\">prompt</th><th rowspan=\"2\">images</th>"
            + "".join(f'<th colspan="{len(runs) + (len(runs) == 2)}">{METRIC_LABELS[m]} '
                      f"<small>(paper {PAPER_TABLE1[m]:.3f})</small></th>" for m in METRICS)
            + f"</tr><tr>{names * len(METRICS)}</tr>")
    body = []
    for key in keys:
        rows = [level.get(key, {}) for level in means]
        counts = " / ".join(str(row.get("images", NO_VALUE)) for row in rows)
        cells = [f'<td>{escape(key)}</td><td class="num">{counts}</td>']
        for m in METRICS:
            lo, hi = scales[m]
            for row, css in zip(rows, "ab", strict=False):
                value = as_number(row.get(m))
                share = 0.0 if value is None else 100 * (value - lo) / (hi - lo)
                cells.append(f'<td class="num bar {css}" style="--v:{share:.0f}%">{format_value(value)}</td>')
            if len(rows) == 2:
                cells.append(f'<td class="num">{_delta(rows[0].get(m), rows[1].get(m))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<section class="card" id="prompts"><h2>Per-prompt means</h2><table>{head}{"".join(body)}</table>'
            "</section>")


def _placeholder(reason: str, tooltip: str = "") -> str:
    return f'<div class="placeholder" role="img" title="{escape(tooltip or reason)}">{escape(reason)}</div>'


def _picture(data: bytes | None, missing: str, alt: str, tooltip: str) -> str:
    if data is None:
        return _placeholder(missing, tooltip)
    return f'<img src="{_data_uri(data)}" alt="{escape(alt)}" title="{escape(tooltip)}">'


def _image_figure(image: ReportImage) -> str:
    """One generation: the thumbnail (or a box saying why there is none), its CLIP-T text, seed and metrics."""
    about = f"seed {image.seed} · image {image.index}"
    tooltip = f"{image.output_key}\n{image.text}\n{about}\n{_metric_line(image)}"
    if image.failure is not None:
        visual = _placeholder(f"not evaluated: {image.failure}", tooltip)
    else:
        visual = _picture(image.thumbnail, "image could not be read", image.text, tooltip)
    return (f'<figure class="image">{visual}<figcaption><q>{escape(image.text)}</q>{about}'
            f'<div class="values">{escape(_metric_line(image))}</div></figcaption></figure>')


def _contact_sheets(run: ReportRun) -> str:
    means = _levels(run, "concept")
    note = (f'<p class="note">{len(run.concepts)} of {run.concepts_total} concepts shown.</p>'
            if run.concepts_total > len(run.concepts) else "")
    sections = []
    for concept in run.concepts:
        row = means.get(concept.concept_id, {})
        summary = "  ".join(f"{METRIC_LABELS[m]} {format_value(row.get(m))}" for m in METRICS)
        cid = escape(concept.concept_id)
        sections.append(
            f'<section class="concept"><h3>{cid} <small>{escape(concept.class_word)} · {len(concept.images)} '
            f"images · {summary}</small></h3><div class=\"sheet\">"
            f'<figure class="image">{_picture(concept.source, "source unreadable", "source", concept.concept_id)}'
            "<figcaption>source image</figcaption></figure>"
            f'<figure class="image">{_picture(concept.mask, "no mask", "mask", concept.concept_id)}'
            "<figcaption>object mask</figcaption></figure>"
            + "".join(_image_figure(image) for image in concept.images) + "</div></section>")
    return f'<section class="card" id="contact-sheets"><h2>Contact sheets</h2>{note}{"".join(sections)}</section>'


def _comparison(run: ReportRun, compare: ReportRun) -> str:
    """The two runs side by side: overall means, the settings that differ, and images paired by concept, prompt
    and index, with the deltas (this run minus the compared one)."""
    a, b = escape(run.label), escape(compare.label)
    overall = "".join(
        f"<tr><th>{METRIC_LABELS[m]}</th><td class=\"num\">{format_value(run.overall.get(m))}</td>"
        f"<td class=\"num\">{format_value(compare.overall.get(m))}</td>"
        f"<td class=\"num\">{_delta(run.overall.get(m), compare.overall.get(m))}</td>"
        f"<td class=\"num\">{PAPER_TABLE1[m]:.3f}</td></tr>" for m in METRICS)
    overall = (f"<table><tr><th></th><th>{a}</th><th>{b}</th><th>Δ</th><th>{PAPER}</th></tr>{overall}"
               f"<tr><th>images</th><td class=\"num\">{run.evaluated}</td><td class=\"num\">{compare.evaluated}</td>"
               "<td></td><td></td></tr></table>")
    return (f'<section class="card" id="comparison"><h2>Comparison: {a} vs {b}</h2>'
            f'<p class="note">Δ is {a} minus {b}.</p>{overall}<h3 style="margin-top:16px">Settings that differ</h3>'
            f"{_settings_diff(run, compare)}<h3 style=\"margin-top:16px\">Images side by side</h3>"
            f"{_legend([run, compare], reference=False)}"
            '<p class="note">Matched by concept, prompt and image index, among the concepts each report shows.</p>'
            f"{_pairs(run, compare)}</section>")


def _settings_diff(run: ReportRun, compare: ReportRun) -> str:
    mine = {**run.settings, **{f"metric model ({k})": v for k, v in run.models.items()}}
    theirs = {**compare.settings, **{f"metric model ({k})": v for k, v in compare.models.items()}}
    rows = "".join(f"<tr><th>{escape(key)}</th><td>{escape(mine.get(key, NO_VALUE))}</td>"
                   f"<td>{escape(theirs.get(key, NO_VALUE))}</td></tr>"
                   for key in _union(mine, theirs) if mine.get(key) != theirs.get(key))
    if not rows:
        return '<p class="note">None: both runs used the same settings and metric models.</p>'
    return f"<table><tr><th>setting</th><th>{escape(run.label)}</th><th>{escape(compare.label)}</th></tr>{rows}</table>"


def _pairs(run: ReportRun, compare: ReportRun) -> str:
    concepts = [{c.concept_id: c for c in r.concepts} for r in (run, compare)]
    sections = []
    for concept_id in _union(*concepts):
        images = [{(i.prompt, i.index): i for i in c[concept_id].images} if concept_id in c else {} for c in concepts]
        rows, alone = [], []
        for key in _union(*images):
            mine, theirs = images[0].get(key), images[1].get(key)
            if mine is not None and theirs is not None:
                rows.append(f'<div class="pair">{_image_figure(mine)}{_image_figure(theirs)}'
                            f"{_pair_deltas(mine, theirs)}</div>")
            else:
                label = run.label if mine is not None else compare.label
                alone.append(f"<li>{escape(key[0])}, image {key[1]}: only in {escape(label)}</li>")
        listed = f'<ul class="note">{"".join(alone)}</ul>' if alone else ""
        sections.append(f'<section class="concept"><h3>{escape(concept_id)}</h3><div class="pairs">{"".join(rows)}'
                        f"</div>{listed}</section>")
    return "".join(sections)


def _pair_deltas(mine: ReportImage, theirs: ReportImage) -> str:
    lines = []
    for m in METRICS:
        delta = _delta(getattr(mine, m), getattr(theirs, m))
        css = "pos" if delta.startswith("+") and delta != "+0.000" else "neg" if delta.startswith("-") else ""
        lines.append(f'{METRIC_LABELS[m]} <span class="{css}">Δ {delta}</span>')
    seeds = "same seed" if mine.seed == theirs.seed else f"seeds {mine.seed} / {theirs.seed}"
    return f'<div class="deltas">{"<br>".join(lines)}<br><small>{seeds}</small></div>'


def _failures(runs: list[ReportRun]) -> str:
    rows = [(r.label, f) for r in runs for f in r.failures]
    if not rows:
        return ""
    columns = ("concept_id", "uri", "stage", "reason")
    head = ("<th>run</th>" if len(runs) == 2 else "") + "".join(f"<th>{c}</th>" for c in columns)
    body = "".join("<tr>" + (f"<td>{escape(label)}</td>" if len(runs) == 2 else "")
                   + "".join(f"<td>{escape(str(failure.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for label, failure in rows)
    return (f'<section class="card" id="failures"><h2>Failures ({len(rows)})</h2>'
            f"<table><tr>{head}</tr>{body}</table></section>")
