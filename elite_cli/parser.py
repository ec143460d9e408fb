"""The `elite` command line's options: every one with a line of help, defaults shown by `--help`."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

from elite.data.export import DEFAULT_TOKEN_TEMPLATE, FORMATS
from elite.data.store import COMPACT_MIN_FILES
from elite.jobs.models import MODEL_ENV

Formatter = argparse.ArgumentDefaultsHelpFormatter
MODEL_HELP = {
    "pretrained_model": "Stable Diffusion 1.x repo id or folder (diffusers layout), e.g. CompVis/stable-diffusion-v1-4",
    "vision_model": "CLIP vision tower id or folder, e.g. openai/clip-vit-large-patch14",
    "global_mapper": "global_mapper.pt of the release, or its safetensors conversion",
    "local_mapper": "local_mapper.pt of the release, or its safetensors conversion",
    "onnx_path": "ONNX encoder file for --engine onnx (written by `elite export-onnx`)",
    "clip_model": "CLIP model of CLIP-T and CLIP-I (default: the paper's, openai/clip-vit-base-patch32)",
    "dino_model": "DINO model of DINO-I (default: the paper's, facebook/dino-vits16)",
}


def _models(parser: argparse.ArgumentParser, *names: str) -> None:
    group = parser.add_argument_group("models (hub ids or folders; the environment variables give defaults)")
    for name in names:
        flag = "--onnx" if name == "onnx_path" else f"--{name.replace('_', '-')}"
        group.add_argument(flag, dest=name, help=f"{MODEL_HELP[name]} [${MODEL_ENV[name]}]")


def _encoder(parser: argparse.ArgumentParser, flag: str) -> None:
    parser.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                        help="torch: the models themselves; onnx: an exported encoder on ONNX Runtime")
    parser.add_argument(flag, dest="encode_device", default="auto",
                        help="where concepts are encoded: auto (the GPU when there is one), cpu, cuda or cuda:N")


def _catalog(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--manifest", help=f"a CSV/JSONL manifest key inside {where}, instead of the folder listing")
    parser.add_argument("--replace-sources", action="store_true",
                        help="let a concept id stored from another source be replaced (default: a failure naming both)")


def _sampler(parser: argparse.ArgumentParser, tiny_defaults: bool = False) -> None:
    size = "512, 64 with --tiny" if tiny_defaults else "512"
    parser.add_argument("--steps", type=int, default=None if tiny_defaults else 100,
                        help="denoising steps (reference: 100" + ("; 4 with --tiny)" if tiny_defaults else ")"))
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (reference: 5)")
    parser.add_argument("--lambda-local", type=float, default=0.8, help="weight of the local branch (reference: 0.8)")
    parser.add_argument("--height", type=int, default=None if tiny_defaults else 512, help=f"image height ({size})")
    parser.add_argument("--width", type=int, default=None if tiny_defaults else 512, help=f"image width ({size})")
    parser.add_argument("--seed", type=int, default=0, help="base of the per-image seeds (each image's seed is "
                        "derived from it, the concept, the prompt and the image number)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="weights dtype: auto is float16 on CUDA, float32 on the CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="UNet and VAE in channels-last memory format (default: on CUDA; docs/gpu.md)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the UNet (backend: inductor unless named); the first batch of each "
                             "size compiles, the rest reuse it (docs/gpu.md)")


def build_parser(default_prompts: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elite", formatter_class=Formatter, description=(
        "ELITE: encode visual concepts into word embeddings and generate personalised images with Stable "
        "Diffusion 1.x. Locations are folders or s3://bucket/prefix URIs (S3 settings: docs/storage.md)."))
    parser.add_argument("--verbose", action="store_true",
                        help="keep diffusers'/transformers' logs and bars, and show tracebacks of Prefect failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prompts_help = ("prompt file (.txt, .jsonl or .csv; docs/inputs.md), a path or URI; default: "
                    + " | ".join(default_prompts))

    p = sub.add_parser("personalize", formatter_class=Formatter,
                       help="the catalog job: encode new concepts, generate missing images (Prefect flow)",
                       description="Run the personalize_catalog Prefect flow: encode the concepts of a folder or "
                                   "manifest that are not stored yet, then generate every image of the prompt file "
                                   "that is missing, under OUT/images, with the embedding store in OUT/embeddings. "
                                   "Inputs and models are checked before Prefect starts. Without PREFECT_API_URL, "
                                   "Prefect runs in ephemeral mode (no server; its database under PREFECT_HOME, "
                                   "default ~/.prefect). Exit status 1 when anything failed.")
    p.add_argument("--concepts", required=True, help="folder or s3:// prefix of concept images (N.jpg + N_bg.png)")
    _catalog(p, "--concepts")
    p.add_argument("--prompts", help=prompts_help)
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--store", help="embedding store location (default: OUT/embeddings)")
    p.add_argument("--tiny", action="store_true", help="offline: tiny random models (written to --tiny-dir)")
    p.add_argument("--tiny-dir", default="outputs/tiny-models", help="where --tiny writes its models")
    _encoder(p, "--encode-device")
    _sampler(p, tiny_defaults=True)
    _images_per_prompt(p)
    p.add_argument("--batch-size", type=positive, default=4, help="images per generation task")
    p.add_argument("--encode-batch-size", type=positive, default=8, help="concepts per encoding task")
    _compaction(p)
    p.add_argument("--devices", help="generation slots, e.g. cuda:0,cuda:1 (default: every GPU, else cpu); with "
                                     "--runner ray, cpu or cuda: what each batch asks Ray for")
    p.add_argument("--runner", choices=("threads", "ray"), default="threads",
                   help="threads: batches on this machine's devices; ray: on the Ray cluster at --ray-address "
                        "(docs/scale-out.md)")
    p.add_argument("--ray-address", help="the Ray cluster: ray://HEAD:10001, HEAD:6379 or auto (default: "
                                         "$RAY_ADDRESS, else a Ray started for this run)")
    p.add_argument("--ray-stall-timeout", type=positive_float, default=900.0,
                   help="seconds with no batch finished on Ray before the unfinished ones become failures")
    p.add_argument("--timeout", type=float, help="fail the flow run after this many seconds (default: no limit)")
    p.add_argument("--evaluate", action="store_true", help="then evaluate the run's images (CLIP-T, CLIP-I, "
                   "DINO-I) and write its report (docs/evaluation.md)")
    _models(p, "pretrained_model", "vision_model", "global_mapper", "local_mapper", "onnx_path", "clip_model",
            "dino_model")

    p = sub.add_parser("encode", formatter_class=Formatter, help="encode concept images into the embedding store",
                       description="Encode every concept of a folder or S3 prefix (N.jpg with an optional mask "
                                   "N_bg.png, non-zero = object), or of a manifest, into five words and 256 local "
                                   "tokens each, merged into the embedding table (one row per concept). Concepts "
                                   "stored already with the same image and mask bytes are skipped; the same job as the "
                                   "encode flow.")
    p.add_argument("concepts", help="folder or s3:// prefix of concept images")
    p.add_argument("--store", required=True, help="embedding table folder or s3:// prefix to write to")
    _catalog(p, "CONCEPTS")
    p.add_argument("--batch-size", type=positive, default=8, help="concepts per encoder call")
    _compaction(p)
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="encoder dtype: auto is float16 on CUDA, float32 on the CPU")
    _encoder(p, "--device")
    _models(p, "vision_model", "global_mapper", "local_mapper", "pretrained_model", "onnx_path")

    p = sub.add_parser("generate", formatter_class=Formatter, help="generate images for stored concepts",
                       description="For every stored concept (or --concept) and every prompt, generate the images "
                                   "not written yet under OUT/<concept>/, with a results manifest and a failures "
                                   "table under OUT/_runs/: the same job and layout as the generate flow. Prompts "
                                   "hold the placeholder (default S), e.g. 'a photo of a S on the beach'.")
    p.add_argument("--store", required=True, help="embedding store folder or s3:// prefix")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--prompts", help=prompts_help)
    p.add_argument("--prompt", action="append", default=[], help="a prompt with the placeholder (repeatable; "
                   "instead of --prompts)")
    p.add_argument("--placeholder", default="S", help="the placeholder word of --prompt prompts")
    _images_per_prompt(p)
    p.add_argument("--concept", action="append", default=None, help="only this concept id (repeatable)")
    p.add_argument("--encoder-id", help="read the embeddings of this encoder (needed when several stored them)")
    p.add_argument("--batch-size", type=positive, default=4, help="images per pipeline call")
    p.add_argument("--device", default="auto", help="generation device(s): auto (every GPU, else cpu), cpu, "
                   "cuda:0 or a comma list (cuda:0,cuda:1)")
    _sampler(p)
    _models(p, "pretrained_model", "global_mapper", "local_mapper")

    p = sub.add_parser("evaluate", formatter_class=Formatter, help="score a generation run (CLIP-T, CLIP-I, "
                       "DINO-I) and write its report",
                       description="Score every image of a generation run as in the paper: CLIP-T (image vs its "
                                   "prompt with the class word in place of the placeholder), CLIP-I and DINO-I "
                                   "(image vs the concept's source image). Writes per-image metrics, aggregates, "
                                   "a failures table and a self-contained HTML report with a PNG summary beside "
                                   "the run's manifest (docs/evaluation.md): the same job as the evaluate flow. "
                                   "Exit status 1 when an image could not be evaluated.")
    p.add_argument("run", help="a results manifest (IMAGES/_runs/generate-<time>.parquet) or an images folder "
                               "(every image with a manifest row), local or s3://")
    p.add_argument("--store", help="the embedding store of the run's concepts (default: the one its manifest "
                                   "names, else OUT/embeddings beside OUT/images)")
    p.add_argument("--compare", help="another run (manifest or folder), evaluated too and shown side by side")
    p.add_argument("--batch-size", type=positive, default=32, help="images per metric-model call")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="metric models' dtype: auto is float16 on CUDA, float32 on the CPU")
    p.add_argument("--class-word", default="object",
                   help="CLIP-T's word for concepts stored without a class_word")
    p.add_argument("--report-concepts", type=non_negative, default=100,
                   help="contact sheets for at most this many concepts (the tables hold every image)")
    _models(p, "clip_model", "dino_model")

    _train_command(sub)

    p = sub.add_parser("export", formatter_class=Formatter, help="export stored embeddings to files",
                       description="Export the embedding store (all concepts, --concept ids, or --where metadata "
                                   "filters) as sharded Parquet, safetensors, NumPy or diffusers textual-inversion "
                                   "files with a manifest.json (docs/export.md): the same job as the export flow.")
    p.add_argument("store", help="embedding store folder or s3:// prefix")
    p.add_argument("dest", help="destination folder or s3:// prefix")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="file format")
    p.add_argument("--concept", action="append", default=None, help="only this concept id (repeatable)")
    p.add_argument("--where", action="append", type=name_value, metavar="COLUMN=VALUE",
                   help="only concepts whose metadata column equals the value (repeatable)")
    p.add_argument("--encoder-id", help="only embeddings of this encoder (needed when several stored them)")
    p.add_argument("--shard-size", type=positive, default=1000, help="concepts per file")
    p.add_argument("--version", type=non_negative, help="export the table as it was at this version "
                   "(`elite store history`; default: the newest)")
    p.add_argument("--token-template", default=DEFAULT_TOKEN_TEMPLATE,
                   help="textual-inversion token of each concept")

    _store_commands(sub)

    p = sub.add_parser("export-onnx", formatter_class=Formatter, help="export the concept encoder to one ONNX file",
                       description="Export CLIP vision tower + global mapper + local mapper as one ONNX graph "
                                   "with a dynamic batch axis. fp32: reference; int8: dynamic int8 weights, the "
                                   "fast CPU variant; fp16: for CUDA (onnxruntime-gpu).")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32", help="weights precision")
    _models(p, "vision_model", "global_mapper", "local_mapper", "pretrained_model")

    p = sub.add_parser("convert-checkpoint", formatter_class=Formatter,
                       help="check a release mapper .pt and convert it to safetensors",
                       description="Strictly check a release global_mapper.pt / local_mapper.pt (keys and shapes "
                                   "of SD 1.x + CLIP ViT-L/14) and write it as safetensors. Pickles that hold "
                                   "anything but tensors are refused, never executed.")
    p.add_argument("src", help="the release .pt file")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--pretrained-model", help="check against this SD repo's UNet layers instead of SD 1.x")

    p = sub.add_parser("make-tiny-models", formatter_class=Formatter,
                       help="write tiny random models in the real layouts (offline)",
                       description="Tiny random SD 1.x, CLIP vision tower and mappers in OUT_DIR, and the metric "
                                   "models (CLIP, DINO) in OUT_DIR/eval.")
    p.add_argument("out_dir", help="folder to write the models to")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser


def _train_command(sub: Any) -> None:
    p = sub.add_parser("train", formatter_class=Formatter, help="train the global (stage 1) or local (stage 2) "
                       "mapping network on a catalog", description="Train a mapping network as in the paper "
                       "(docs/training.md): stage 1 (global) the global mapper and its k/v copies, stage 2 (local) "
                       "the local mapper on top of a frozen stage-1 mapper, with CLIP, the text encoder, UNet and "
                       "VAE frozen. Writes OUT/<stage>_mapper.pt (the release's layout) and .safetensors, "
                       "checkpoints OUT/checkpoint-<step>/ and TensorBoard logs. Several GPUs: `accelerate "
                       "launch -m elite_cli train ...`.")
    p.add_argument("stage", choices=("global", "local"), help="global: stage 1; local: stage 2")
    p.add_argument("--concepts", required=True, help="folder or s3:// prefix of images (N.jpg + N_bg.png), or of "
                   "an Open Images V6 download with --layout openimages")
    p.add_argument("--manifest", help="a CSV/JSONL manifest key inside --concepts, instead of the folder listing")
    p.add_argument("--layout", choices=("catalog", "openimages"), default="catalog", help="catalog: the pipeline's "
                   "layout; openimages: <split>-annotations-object-segmentation.csv, <split>/, <split>-masks/")
    p.add_argument("--split", choices=("train", "validation", "test"), default="test",
                   help="--layout openimages: the split (the paper trained on test)")
    p.add_argument("--limit", type=positive, help="train on the first N concepts only")
    p.add_argument("--out", required=True, help="local folder for checkpoints, logs and the trained mapper")
    p.add_argument("--global-mapper", help="stage 1: start from these weights (default: from scratch, k/v copies "
                   "from the UNet); stage 2: the frozen stage-1 mapper (required)")
    p.add_argument("--local-mapper", help="stage 2: start from these weights (default: from scratch)")
    p.add_argument("--steps", type=positive, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=positive, default=4, help="images per micro-batch and process")
    p.add_argument("--gradient-accumulation", type=positive, default=4, help="micro-batches per optimizer step")
    p.add_argument("--learning-rate", type=positive_float, help="per-sample rate (default: the reference's, 1e-6 "
                   "stage 1, 1e-5 stage 2), times batch x accumulation x processes unless --no-scale-lr")
    p.add_argument("--no-scale-lr", action="store_true", help="use --learning-rate as it is")
    p.add_argument("--warmup-steps", type=non_negative, default=0, help="linear warm-up, then constant")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="autocast precision")
    p.add_argument("--resolution", type=positive, default=512, help="training image size (a multiple of 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order, augmentations and noise")
    p.add_argument("--checkpoint-every", type=positive, default=500, help="steps between checkpoints")
    p.add_argument("--resume", help="a checkpoint folder, or latest (the newest in --out)")
    p.add_argument("--validate-every", type=non_negative, default=0, help="steps between validation images of the "
                   "first two concepts (OUT/validation/step-<n>/; 0: none)")
    p.add_argument("--no-augment", action="store_true", help="no flips, rotations, blur, elastic warps or scaling")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in the backward: "
                   "less memory for ~30%% more time")
    p.add_argument("--num-workers", type=non_negative, default=0, help="data-loading processes per training "
                   "process (0: read samples in the training process)")
    group = p.add_argument_group("models (hub ids or folders; the environment variables give defaults)")
    for name in ("pretrained_model", "vision_model"):
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{MODEL_HELP[name]} [${MODEL_ENV[name]}]")


def _images_per_prompt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images-per-prompt", type=int, help="images per concept and prompt, for every prompt "
                        "(default: each prompt-file line's `images`, else 1)")


def _compaction(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compact-min-files", type=non_negative, default=COMPACT_MIN_FILES,
                        help="after encoding, compact the embedding table once this many small files (one per "
                             "batch) have piled up; 0: never")


def _store_commands(sub: Any) -> None:
    p = sub.add_parser("store", formatter_class=Formatter, help="look after the embedding table: history, "
                       "optimize, vacuum, migrate", description="Maintenance of the embedding table (a Delta Lake "
                       "table in a folder or under an s3:// prefix; docs/embedding-store.md).")
    store = p.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")
    q = store.add_parser("history", formatter_class=Formatter, help="the table's versions, newest first",
                         description="One line per commit: version, time (UTC), operation and what it changed.")
    q.add_argument("store", help="embedding table folder or s3:// prefix")
    q.add_argument("--limit", type=positive, default=20, help="show at most this many versions")
    q = store.add_parser("optimize", formatter_class=Formatter, help="compact small files into few large ones",
                         description="Rewrite the small data files (one per encode batch) into files of about "
                                     "--target-size, in one commit; with --z-order, rewrite every file ordered by "
                                     "concept_id (reads of a few ids touch fewer files). Old versions stay "
                                     "readable until vacuum.")
    q.add_argument("store", help="embedding table folder or s3:// prefix")
    q.add_argument("--z-order", action="store_true", help="order all rows by concept_id: rewrites everything and "
                   "holds the table in memory (~0.9 GB per 1,000 real-size concepts)")
    q.add_argument("--target-size", type=positive, help="target file size in bytes (default: deltalake's, 100 MB)")
    q = store.add_parser("vacuum", formatter_class=Formatter, help="delete files no recent version needs",
                         description="Delete data files that no version younger than --retention-hours uses, and "
                                     "files no commit ever referenced (a killed writer's). Versions older than "
                                     "the retention cannot be read afterwards.")
    q.add_argument("store", help="embedding table folder or s3:// prefix")
    q.add_argument("--retention-hours", type=float, default=168.0, help="keep what the last this-many hours' "
                   "versions need (Delta's default: 7 days; keep it above your longest-running reader)")
    q.add_argument("--dry-run", action="store_true", help="list the files without deleting them")
    q = store.add_parser("migrate", formatter_class=Formatter, help="convert a store of the earlier part format "
                         "into a table", description="Copy every current row of a store of the earlier format "
                         "(a folder of part-*.parquet files) into a new embedding table, hashes and metadata "
                         "unchanged. OLD is only read; run it again to finish an interrupted migration.")
    q.add_argument("old", help="the earlier store: folder or s3:// prefix")
    q.add_argument("new", help="the new table: folder or s3:// prefix (empty, or a migration to finish)")


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive(text: str) -> int:
    """An integer of at least 1 (batch sizes, counts), refused by argparse before anything loads."""
    return _integer(text, 1)


def non_negative(text: str) -> int:
    """An integer of at least 0 (table versions; 0 turns a count off)."""
    return _integer(text, 0)


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def name_value(text: str) -> tuple[str, object]:
    """NAME=VALUE; the value as JSON when it parses (2020, true, null, a list), else as text."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value
