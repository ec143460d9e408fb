"""The evaluation report's PNG summary: overall values against the paper's, a bar chart per metric and a strip of
the first concepts, drawn with Pillow alone.

    png = render_summary_png(run, other)       # the ReportRun objects of elite.evaluation.report
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from elite.evaluation import METRIC_LABELS, METRICS, PAPER_TABLE1
from elite.evaluation.report import (
    COLOURS,
    PAPER,
    REFERENCE_COLOUR,
    ReportConcept,
    ReportRun,
    as_number,
    axis_range,
    count_noun,
    format_value,
)
from elite.model.preprocessing import to_rgb

_WIDTH, _MARGIN, _CELL = 1200, 32, 150  # the summary's width, margin and strip thumbnail size, in pixels
_STRIP_CONCEPTS, _STRIP_IMAGES = 4, 5


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """`text` shortened with "..." to fit `width` pixels (the summary's font has no glyph for "…")."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_summary_png(run: ReportRun, compare: ReportRun | None = None) -> bytes:
    """One picture of the run for a glance or a chat message: overall values against the paper's, a bar chart per
    metric (both runs with `compare`) and a strip of the first concepts' source and generations."""
    runs = [run] if compare is None else [run, compare]
    strips = run.concepts[:_STRIP_CONCEPTS]
    chart_top, chart_height, strip_height = 150, 260, _CELL + 100
    height = chart_top + chart_height + 30 + strip_height * len(strips) + _MARGIN
    canvas = Image.new("RGB", (_WIDTH, height), "#f5f6f8")
    draw = ImageDraw.Draw(canvas)
    _summary_header(draw, runs)
    panel = (_WIDTH - 2 * _MARGIN - 2 * 24) // len(METRICS)
    for n, metric in enumerate(METRICS):
        box = (_MARGIN + n * (panel + 24), chart_top, _MARGIN + n * (panel + 24) + panel, chart_top + chart_height)
        _summary_chart(draw, box, metric, runs)
    top = chart_top + chart_height + 30
    for concept in strips:
        _summary_strip(canvas, draw, concept, top)
        top += strip_height
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _summary_header(draw: ImageDraw.ImageDraw, runs: list[ReportRun]) -> None:
    run, width = runs[0], _WIDTH - 2 * _MARGIN
    title = "ELITE evaluation: " + " vs ".join(r.label for r in runs)
    draw.text((_MARGIN, 24), _fit(draw, title, _font(28), width), fill="#1d232b", font=_font(28))
    failures = f", {count_noun(len(run.failures), 'failure')}" if run.failures else ""
    facts = (f"{run.uri}  |  {run.evaluated} images evaluated, {len(run.concepts)} of {run.concepts_total} "
             f"concepts shown{failures}  |  " + ", ".join(run.models.values()))
    draw.text((_MARGIN, 64), _fit(draw, facts, _font(15), width), fill="#5b6573", font=_font(15))
    for n, r in enumerate(runs):
        values = "    ".join(f"{METRIC_LABELS[m]} {format_value(r.overall.get(m), '-')} (paper {PAPER_TABLE1[m]:.3f})"
                           for m in METRICS)
        draw.rectangle((_MARGIN, 96 + n * 24, _MARGIN + 14, 110 + n * 24), fill=COLOURS[n])
        draw.text((_MARGIN + 22, 93 + n * 24), _fit(draw, f"{r.label}:  {values}", _font(17), width - 22),
                  fill="#1d232b", font=_font(17))


def _summary_chart(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], metric: str,
                   runs: list[ReportRun]) -> None:
    """Vertical bars of the runs' overall means with the paper's value as a dashed line, on the HTML's scale. The
    values sit at the foot of the bars and the line's label beside the title, where the line cannot cross them."""
    left, top, right, bottom = box
    draw.rectangle(box, fill="white", outline="#dde1e7")
    draw.text((left + 12, top + 8), METRIC_LABELS[metric], fill="#1d232b", font=_font(18))
    reference = PAPER_TABLE1[metric]
    _dashed(draw, (right - 170, top + 19), right - 146)
    draw.text((right - 140, top + 19), f"{PAPER} {reference:.3f}", fill=REFERENCE_COLOUR, font=_font(13), anchor="lm")
    lo, hi = axis_range([reference, *(r.overall.get(metric) for r in runs)])
    plot_left, plot_top, plot_bottom, plot_right = left + 48, top + 48, bottom - 30, right - 16

    def y(value: float) -> float:
        return plot_bottom - (plot_bottom - plot_top) * (value - lo) / (hi - lo)

    for step in range(round((hi - lo) * 10) + 1):
        tick = lo + step / 10
        draw.line((plot_left, y(tick), plot_right, y(tick)), fill="#e3e6ea")
        draw.text((plot_left - 8, y(tick)), f"{tick:.1f}", fill="#5b6573", font=_font(12), anchor="rm")
    slot = (plot_right - plot_left) / len(runs)
    for n, r in enumerate(runs):
        centre, value = plot_left + slot * (n + 0.5), as_number(r.overall.get(metric))
        if value is not None:
            draw.rectangle((centre - 32, y(max(value, 0.0)), centre + 32, y(min(value, 0.0))), fill=COLOURS[n])
        inside = value is not None and y(0.0) - y(value) > 28  # room for the text in the bar
        label_y = y(0.0) - 8 if inside else y(max(value or 0.0, 0.0)) - 4
        draw.text((centre, label_y), format_value(value, "-"), fill="white" if inside else "#1d232b", font=_font(15),
                  anchor="md")
        draw.text((centre, plot_bottom + 6), _fit(draw, r.label, _font(12), slot - 8), fill="#5b6573",
                  font=_font(12), anchor="ma")
    _dashed(draw, (plot_left, round(y(reference))), plot_right)


def _dashed(draw: ImageDraw.ImageDraw, start: tuple[int, int], end_x: int) -> None:
    """A horizontal dashed line (Pillow draws solid lines only)."""
    x, y = start
    for dash in range(x, end_x, 10):
        draw.line((dash, y, min(dash + 6, end_x), y), fill=REFERENCE_COLOUR, width=2)


def _summary_strip(canvas: Image.Image, draw: ImageDraw.ImageDraw, concept: ReportConcept, top: int) -> None:
    """A concept's source and first generations, each with its metrics below."""
    heading = f"{concept.concept_id} ({concept.class_word}), {len(concept.images)} images"
    draw.text((_MARGIN, top), _fit(draw, heading, _font(16), _WIDTH - 2 * _MARGIN), fill="#1d232b", font=_font(16))
    cells: list[tuple[bytes | None, str, list[str]]] = [(concept.source, "source unreadable", ["source image"])]
    for image in concept.images[:_STRIP_IMAGES]:
        missing = f"not evaluated: {image.failure}" if image.failure is not None else "image could not be read"
        lines = [f"{METRIC_LABELS[m]} {format_value(getattr(image, m), '-')}" for m in METRICS]
        cells.append((None if image.failure is not None else image.thumbnail, missing, [f"seed {image.seed}", *lines]))
    for n, (data, missing, lines) in enumerate(cells):
        left = _MARGIN + n * (_CELL + 24)
        _summary_cell(canvas, draw, data, missing, (left, top + 24))
        for k, line in enumerate(lines):
            draw.text((left, top + 28 + _CELL + k * 14), line, fill="#3a4350", font=_font(12))


def _summary_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, data: bytes | None, missing: str,
                  corner: tuple[int, int]) -> None:
    left, top = corner
    draw.rectangle((left, top, left + _CELL - 1, top + _CELL - 1), fill="#e6e9ed")
    if data is None:
        draw.rectangle((left, top, left + _CELL - 1, top + _CELL - 1), outline="#b9c0ca", width=2)
        draw.text((left + _CELL // 2, top + _CELL // 2), _fit(draw, missing, _font(12), _CELL - 12), fill="#7a4a4a",
                  font=_font(12), anchor="mm")
        return
    with Image.open(io.BytesIO(data)) as opened:
        picture = ImageOps.contain(to_rgb(opened), (_CELL, _CELL), Image.Resampling.LANCZOS)  # small ones grow
    canvas.paste(picture, (left + (_CELL - picture.width) // 2, top + (_CELL - picture.height) // 2))
