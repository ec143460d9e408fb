"""The evaluation report as a reader gets it: the page opened in a real browser (tests/browser.py) with every image
loaded, nothing fetched from outside and nothing from the data run as markup; the comparison, the paper's reference
lines on the bars' scale, the PNG summary and the thumbnails. Negative controls show the browser checks can fail."""

from __future__ import annotations

import io
import re
import statistics
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import check_page, not_blank
from PIL import Image, UnidentifiedImageError

from elite.evaluation import METRICS, PAPER_TABLE1
from elite.evaluation.report import (
    ReportConcept,
    ReportImage,
    ReportRun,
    render_html,
    thumbnail,
)
from elite.evaluation.summary import render_summary_png

HOSTILE_ID = "<img src=x onerror=alert(1)>"  # a concept id a user could give
HOSTILE_PROMPT = 'a S </section><script>alert(2)</script> & "friends"'
PROMPTS = ("a photo of a S on the beach", HOSTILE_PROMPT)
FAILURE = "corrupt or truncated image: <b>broken</b> data stream"


def _generation(seed: int) -> Image.Image:
    """A stand-in for a generated image: a colour gradient with noise, different per seed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:80, 0:96]
    base = np.stack([xs * 2.5, ys * 3.0, (xs + ys) * 1.4], axis=-1) + rng.integers(0, 255, size=3)
    pixels = (base + rng.normal(0, 12, size=base.shape)) % 256
    return Image.fromarray(pixels.astype(np.uint8))


def _image(concept_id: str, class_word: str, prompt: str, index: int, shift: float, broken: str | None) -> ReportImage:
    seed = 100 + index + 10 * PROMPTS.index(prompt)
    key = f"{concept_id}/{PROMPTS.index(prompt)}-i{index}-s{seed}.png"
    text = prompt.replace(" S ", f" {class_word} ")
    if broken is not None:  # "unreadable": no thumbnail; "failed": the evaluation failed too
        failure = FAILURE if broken == "failed" else None
        return ReportImage(key, prompt, text, index, seed, None, None, None, None, failure)
    return ReportImage(key, prompt, text, index, seed, 0.24 + shift + 0.01 * index, 0.70 + shift, 0.60 - shift,
                       thumbnail(_generation(seed + int(shift * 1000))))


def _aggregates(concepts: list[ReportConcept]) -> list[dict[str, Any]]:
    """Means per concept, per prompt and overall, as the evaluate job writes them."""
    groups: dict[tuple[str, str], list[ReportImage]] = {}
    for concept in concepts:
        for image in concept.images:
            for group in (("overall", ""), ("concept", concept.concept_id), ("prompt", image.prompt)):
                groups.setdefault(group, []).append(image)
    rows = []
    for (level, key), images in groups.items():
        row: dict[str, Any] = {"level": level, "key": key, "images": len(images)}
        for m in METRICS:
            values = [getattr(i, m) for i in images if getattr(i, m) is not None]
            row[m] = statistics.fmean(values) if values else None
        rows.append(row)
    return rows


def _run(concepts_dir: Path, label: str, lambda_local: str, shift: float) -> ReportRun:
    """Two concepts of the shared images (one with a hostile id and no mask), four images each, one not readable
    and one failed; the compared run (shift != 0) lacks one image."""
    concepts = []
    for concept_id, name, word in (("dog1", "10", "dog"), (HOSTILE_ID, "11", "toy")):
        broken = {(HOSTILE_PROMPT, 0): "failed", (HOSTILE_PROMPT, 1): "unreadable"} if name == "11" else {}
        images = [_image(concept_id, word, prompt, index, shift, broken.get((prompt, index)))
                  for prompt in PROMPTS for index in range(2) if not (shift and name == "10" and index == 1)]
        mask = thumbnail((concepts_dir / f"{name}_bg.png").read_bytes()) if name == "10" else None
        concepts.append(ReportConcept(concept_id, word, thumbnail((concepts_dir / f"{name}.jpg").read_bytes()), mask,
                                      images))
    aggregates = _aggregates(concepts)
    overall = next(row for row in aggregates if row["level"] == "overall")
    settings = {"steps": "25", "guidance_scale": "5.0", "lambda_local": lambda_local, "scheduler": "LMSDiscrete",
                "pretrained_model": "CompVis/stable-diffusion-v1-4", "global_mapper": "<b>mappers/global.pt</b>"}
    return ReportRun(label, f"s3://shop/images/_runs/{label}.parquet", settings,
                     {"clip": "openai/clip-vit-base-patch32", "dino": "facebook/dino-vits16"},
                     {m: overall[m] for m in METRICS}, 6, concepts, 3, aggregates,
                     [{"concept_id": HOSTILE_ID, "uri": f"s3://shop/images/{HOSTILE_ID}/1-i0.png", "stage": "read",
                       "reason": FAILURE}])


@pytest.fixture(scope="module")
def runs(concepts_dir: Path) -> tuple[ReportRun, ReportRun]:
    return (_run(concepts_dir, "generate-lambda08", "0.8", 0.0),
            _run(concepts_dir, "generate-lambda06", "0.6", 0.03))


def _section(page: str, section_id: str) -> str:
    match = re.search(rf'<section class="card" id="{section_id}">(.*?)</section>(?=\n|<section class="card")', page,
                      re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def test_page_in_a_browser(runs: tuple[ReportRun, ReportRun], tmp_path: Path) -> None:
    run = runs[0]
    page = render_html(run)
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    check = check_page(tmp_path / "report.html", tmp_path / "report.png")
    # sources (2), the one mask and every generation with a thumbnail: no <img> made from the hostile id
    shown = 2 + 1 + sum(i.thumbnail is not None and i.failure is None for c in run.concepts for i in c.images)
    assert (check.images, check.broken, check.external_requests, check.dialogs) == (shown, [], [], [])
    assert run.label in check.title and check.screenshot.stat().st_size > 0
    assert not_blank(check.element_png)
    assert escape(HOSTILE_ID) in page and "<img src=x" not in page and "<script>" not in page
    assert "<b>" not in page  # settings and failure reasons are text too
    # self-contained: every src and href inline or on the page, and no web URL at all (not even a namespace)
    assert not re.search(r'(src|href)="(?!data:image/(jpeg|png);base64,|#)', page) and not re.search("https?:", page)
    assert "2 of 3 concepts shown" in page
    sheets = _section(page, "contact-sheets")
    assert sheets.count('class="placeholder"') == 3  # the failed image, the unreadable one, "no mask"
    assert escape(f"not evaluated: {FAILURE}") in sheets and "image could not be read" in sheets
    assert 'title="dog1/0-i0-s100.png' in sheets and "seed 100" in sheets and "CLIP-T 0.240" in sheets
    assert escape(FAILURE) in _section(page, "failures")


def test_browser_checks_can_fail(tmp_path: Path) -> None:
    bad = ('<!DOCTYPE html><title>bad</title><div id="contact-sheets" style="height:50px;background:#fff">'
           '<img src="data:image/png;base64,AAAA" alt="corrupt"><img src="https://example.invalid/x.png" alt="far">'
           "</div><script>alert('ran')</script>")
    (tmp_path / "bad.html").write_text(bad, encoding="utf-8")
    check = check_page(tmp_path / "bad.html", tmp_path / "bad.png")
    assert check.broken == ["corrupt", "far"]
    assert check.external_requests == ["https://example.invalid/x.png"] and check.dialogs == ["ran"]
    for flat in (Image.new("RGB", (300, 200), "white"), Image.new("RGB", (300, 200), (200, 200, 200))):
        out = io.BytesIO()
        flat.save(out, format="PNG")
        assert not not_blank(out.getvalue())


def test_comparison(runs: tuple[ReportRun, ReportRun], tmp_path: Path) -> None:
    run, compare = runs
    assert 'id="comparison"' not in render_html(run)
    page = render_html(run, compare)
    (tmp_path / "compare.html").write_text(page, encoding="utf-8")
    check = check_page(tmp_path / "compare.html", tmp_path / "compare.png", selector="#comparison")
    assert (check.broken, check.external_requests, check.dialogs) == ([], [], [])
    assert not_blank(check.element_png)
    section = _section(page, "comparison")
    assert run.label in section and compare.label in section
    assert re.search(r"<tr><th>lambda_local</th><td>0\.8</td><td>0\.6</td></tr>", section)
    assert "steps</th>" not in section  # equal settings are not listed
    assert section.count('class="pair"') == 6 and section.count("only in generate-lambda08") == 2
    assert "CLIP-T <span class=\"neg\">Δ -0.030</span>" in section


def test_reference_lines_on_the_bars_scale() -> None:
    """A concept whose mean is the paper's value: its bar ends on the dashed line, which is labelled."""
    aggregates = [{"level": "concept", "key": "at-paper", "images": 1, **PAPER_TABLE1},
                  {"level": "concept", "key": "low", "images": 1, **dict.fromkeys(METRICS, 0.1)}]
    run = ReportRun("scale", "outputs/x", {}, {}, dict(PAPER_TABLE1), 2, [], 2, aggregates, [])
    charts = _section(render_html(run), "charts")
    assert charts.count("<svg") == 3
    for m, svg in zip(METRICS, charts.split("<svg")[1:], strict=True):
        assert f"paper (ELITE) {PAPER_TABLE1[m]:.3f}" in svg
        line = re.search(r'<line x1="([\d.]+)"[^>]*stroke-dasharray', svg)
        bar = re.search(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', svg)
        assert line and bar
        assert float(bar.group(1)) + float(bar.group(2)) == pytest.approx(float(line.group(1)), abs=0.15)
        assert f">{PAPER_TABLE1[m]:.3f}</text>" in svg  # the bar's value, written


def test_summary_png(runs: tuple[ReportRun, ReportRun]) -> None:
    for compare in (None, runs[1]):
        with Image.open(io.BytesIO(render_summary_png(runs[0], compare))) as summary:
            assert summary.format == "PNG" and summary.width >= 1000
            summary.load()
            out = io.BytesIO()
            summary.save(out, format="PNG")
        assert not_blank(out.getvalue())


def test_thumbnail_modes_and_errors() -> None:
    rgba = Image.new("RGBA", (400, 200), (255, 0, 0, 0))
    mask16 = Image.fromarray((np.arange(300 * 100).reshape(100, 300) % 2 * 65535).astype(np.uint16))
    for source in (rgba, mask16, Image.new("P", (50, 80))):
        data = thumbnail(source, 64)
        with Image.open(io.BytesIO(data)) as small:
            assert (small.format, small.mode, max(small.size)) == ("JPEG", "RGB", 64)
            assert abs(small.width / small.height - source.width / source.height) < 0.05
    with Image.open(io.BytesIO(thumbnail(rgba))) as composited:  # transparent red on white: white
        assert composited.getpixel((10, 10)) == pytest.approx((255, 255, 255), abs=3)
    with pytest.raises(UnidentifiedImageError):
        thumbnail(b"not an image")
