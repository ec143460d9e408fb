"""Evaluation as in the paper: CLIP-T, CLIP-I and DINO-I of generated images, tables and a visual report.

    elite.evaluation.metrics     the metric models (CLIP ViT-B/32, DINO ViT-S/16 by default) and the scores
    elite.evaluation.report      the self-contained HTML report and its PNG summary
    elite.evaluation.dreambench  the DreamBench prompt sets and subjects
    elite.jobs.evaluate          the job behind `elite evaluate` and the evaluate flow
"""

from __future__ import annotations

METRICS = ("clip_t", "clip_i", "dino_i")
METRIC_LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I"}
# the paper's Table 1, ELITE row (DreamBench, CLIP ViT-B/32 and DINO ViT-S/16): reference lines in the report
PAPER_TABLE1 = {"clip_t": 0.255, "clip_i": 0.762, "dino_i": 0.652}
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # textual inversion's evaluator, which the paper used
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
