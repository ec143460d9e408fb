"""The evaluation's tables: per-image metrics and aggregates (columns: docs/evaluation.md), and how aggregates are
computed from the per-image rows."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from elite.evaluation import METRICS

# manifest columns copied to every metrics row: what made the image, for comparing settings
SETTING_COLUMNS = ("pretrained_model", "global_mapper", "local_mapper", "encoder_id", "steps", "guidance_scale",
                   "lambda_local", "height", "width", "dtype", "scheduler")
_SETTING_TYPES = {"steps": pa.int64(), "guidance_scale": pa.float64(), "lambda_local": pa.float64(),
                  "height": pa.int64(), "width": pa.int64()}
METRICS_SCHEMA = pa.schema([
    pa.field("concept_id", pa.string()), pa.field("prompt", pa.string()), pa.field("placeholder", pa.string()),
    pa.field("index", pa.int64()), pa.field("seed", pa.int64()), pa.field("output_key", pa.string()),
    pa.field("output_uri", pa.string()), pa.field("sha256", pa.string()),
    pa.field("class_word", pa.string()),  # the word that replaced the placeholder in `text`
    pa.field("text", pa.string()),  # the CLIP-T text
    pa.field("source_uri", pa.string()),  # the image CLIP-I and DINO-I compare with (null: none found)
    pa.field("clip_t", pa.float64()), pa.field("clip_i", pa.float64()), pa.field("dino_i", pa.float64()),
    pa.field("clip_model", pa.string()), pa.field("dino_model", pa.string()), pa.field("manifest_uri", pa.string()),
    *(pa.field(name, _SETTING_TYPES.get(name, pa.string())) for name in SETTING_COLUMNS),
    pa.field("evaluated_at", pa.timestamp("us", tz="UTC")),
])
AGGREGATE_SCHEMA = pa.schema([
    pa.field("level", pa.string()),  # overall, concept or prompt
    pa.field("key", pa.string()),  # the concept id or prompt ("" for overall)
    pa.field("images", pa.int64()),
    *(pa.field(name, pa.float64()) for name in METRICS),  # means over the images with a value
    *(pa.field(f"{name}_std", pa.float64()) for name in METRICS),  # population standard deviation
])

def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """AGGREGATE_SCHEMA rows: overall, then per concept, then per prompt (each sorted by key); means and population
    standard deviations over the images that have the metric (a metric no image has is null)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[("overall", "")].append(row)
        groups[("concept", row["concept_id"])].append(row)
        groups[("prompt", row["prompt"])].append(row)
    order = {"overall": 0, "concept": 1, "prompt": 2}
    out = []
    for (level, key), members in sorted(groups.items(), key=lambda g: (order[g[0][0]], g[0][1])):
        entry: dict[str, Any] = {"level": level, "key": key, "images": len(members)}
        for name in METRICS:
            values = [row[name] for row in members if row[name] is not None and math.isfinite(row[name])]
            entry[name] = statistics.fmean(values) if values else None
            entry[f"{name}_std"] = statistics.pstdev(values) if values else None
        out.append(entry)
    return out


def shared_settings(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The run's settings as text, for the report: each SETTING_COLUMNS value, or "mixed" where images differ."""
    settings = {}
    for name in SETTING_COLUMNS:
        values = {row.get(name) for row in rows}
        settings[name] = "mixed" if len(values) > 1 else str(next(iter(values))) if values else ""
    return settings
