"""The `elite` command line: thin over the library; an EliteError prints one line and exits 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from elite.errors import EliteError, Failure, InputError, StorageError

if TYPE_CHECKING:
    from elite.concepts import ConceptEmbedding
    from elite.pipeline import ElitePipeline

DEFAULT_PROMPTS = ("a photo of a S on the beach", "a painting of a S in the style of van gogh")


def _add_model_args(parser: argparse.ArgumentParser, vision: bool = True, sd: bool = True,
                    runtime: bool = True) -> None:
    group = parser.add_argument_group("models (hub ids or folders; environment variables give defaults)")
    if sd:
        group.add_argument("--pretrained-model", default=os.environ.get("ELITE_PRETRAINED_MODEL"),
                           help="Stable Diffusion 1.x repo id or folder in diffusers layout, e.g. "
                                "CompVis/stable-diffusion-v1-4 [$ELITE_PRETRAINED_MODEL]")
    if vision:
        group.add_argument("--vision-model", default=os.environ.get("ELITE_VISION_MODEL"),
                           help="CLIP vision tower id or folder, e.g. openai/clip-vit-large-patch14 "
                                "[$ELITE_VISION_MODEL]")
    group.add_argument("--global-mapper", default=os.environ.get("ELITE_GLOBAL_MAPPER"),
                       help="global_mapper.pt of the release, or its safetensors conversion [$ELITE_GLOBAL_MAPPER]")
    group.add_argument("--local-mapper", default=os.environ.get("ELITE_LOCAL_MAPPER"),
                       help="local_mapper.pt of the release, or its safetensors conversion [$ELITE_LOCAL_MAPPER]")
    if runtime:
        group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                           help="torch device (default: cuda when available, else cpu)")
        group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                           help="weights dtype (default: float16 on CUDA, float32 on CPU)")


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if not getattr(args, name):
            raise InputError(f"--{name.replace('_', '-')} is required (or set $ELITE_{name.upper()})")


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.float16 if str(args.device).startswith("cuda") else torch.float32


def cmd_convert(args: argparse.Namespace) -> int:
    from elite.checkpoints import convert_checkpoint
    from elite.pipeline import unet_cross_attention_layers

    layers = unet_cross_attention_layers(args.pretrained_model) if args.pretrained_model else None
    count = convert_checkpoint(args.src, args.dst, layers)
    print(f"wrote {args.dst} ({count} tensors)")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from elite.encoder import TorchConceptEncoder
    from elite.export import export_concept_encoder
    from elite.fileio import sha256_file
    from elite.pipeline import unet_cross_attention_layers

    _require(args, "vision_model", "global_mapper", "local_mapper")
    layers = unet_cross_attention_layers(args.pretrained_model) if args.pretrained_model else None
    encoder = TorchConceptEncoder.from_pretrained(args.vision_model, args.global_mapper, args.local_mapper, layers)
    sources = {"vision_model": str(args.vision_model),
               "global_mapper_file_sha256": sha256_file(args.global_mapper),
               "local_mapper_file_sha256": sha256_file(args.local_mapper)}
    path = export_concept_encoder(encoder.module, args.out, args.precision, sources)
    print(f"wrote {path} ({args.precision}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from elite.tiny import make_tiny_models

    paths = make_tiny_models(args.out_dir, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in paths.__dict__.items()}, indent=2))
    return 0


def _load_encoder(args: argparse.Namespace) -> Any:
    from elite.encoder import load_encoder

    if args.engine == "onnx" and not args.onnx:
        raise InputError("--engine onnx needs --onnx FILE (write one with `elite export-onnx`)")
    if args.engine == "torch":
        _require(args, "vision_model", "global_mapper", "local_mapper")
    return load_encoder(args.engine, onnx_path=args.onnx, vision_model=args.vision_model,
                        global_mapper=args.global_mapper, local_mapper=args.local_mapper,
                        pretrained_model=args.pretrained_model, device=args.device, dtype=_dtype(args))


def cmd_encode(args: argparse.Namespace) -> int:
    from elite.concepts import find_concepts, save_embeddings
    from elite.encoder import encode_sources
    from elite.store import EmbeddingRecord, EmbeddingStore, sha256_file

    if not args.out and not args.store:
        raise InputError("give --store DIR (Parquet embedding store) and/or --out FILE (safetensors)")
    sources = find_concepts(args.concepts)
    if not sources:
        raise InputError(f"{args.concepts}: no images (.jpg, .jpeg, .png, .webp) found")
    encoder = _load_encoder(args)
    failures: list[Failure] = []
    todo, hashes, skipped = list(sources), {}, 0
    if args.store:
        store = EmbeddingStore(args.store)
        todo = []
        for source in sources:
            try:
                hashes[source.concept_id] = (sha256_file(source.image),
                                             sha256_file(source.mask) if source.mask else None)
            except StorageError as err:
                failures.append(Failure(source.concept_id, "read", str(err)))
                continue
            if store.has(*hashes[source.concept_id], encoder.encoder_id):
                skipped += 1
            else:
                todo.append(source)
    embeddings, encode_failures = encode_sources(encoder, todo, batch_size=args.batch_size)
    failures += encode_failures
    for failure in failures:
        print(f"FAILED {failure.item} ({failure.stage}): {failure.reason}", file=sys.stderr)
    where = []
    if args.store and embeddings:
        by_id = {s.concept_id: s for s in todo}
        result = store.append([EmbeddingRecord.from_embedding(
            e, source_uri=by_id[e.concept_id].image.resolve().as_uri(), image_sha256=hashes[e.concept_id][0],
            mask_sha256=hashes[e.concept_id][1], encoder_id=encoder.encoder_id) for e in embeddings])
        where.append(f"store {args.store} (+{result.written})")
    if args.out and embeddings:
        save_embeddings(args.out, embeddings, {"encoder_id": encoder.encoder_id})
        where.append(str(args.out))
    print(f"encoded {len(embeddings)} of {len(sources)} concepts ({skipped} already stored, {len(failures)} failed)"
          f" with {encoder.encoder_id[:18]} -> {', '.join(where) or 'nothing written'}")
    return 1 if failures else 0


@dataclass(frozen=True)
class _Job:
    concept: ConceptEmbedding
    prompt: str
    seed: int
    file: Path

    def record(self) -> dict[str, object]:
        return {"concept_id": self.concept.concept_id, "prompt": self.prompt, "seed": self.seed,
                "file": str(self.file)}


def _safe_segment(concept_id: str) -> str:
    """A concept id as one path segment; ids that would leave the output folder are refused."""
    if not concept_id or concept_id in (".", "..") or any(c in concept_id for c in "/\\\0"):
        raise InputError(f"concept id {concept_id!r} cannot be used as a folder name")
    return concept_id


def generate_images(pipe: ElitePipeline, concepts: Sequence[ConceptEmbedding], prompts: Sequence[str], out_dir: str, *,
                    images_per_prompt: int, batch_size: int, seed: int,
                    **call_kwargs: Any) -> list[dict[str, object]]:
    """Every (concept, prompt, index) -> `out_dir/<concept>/p<prompt>-i<index>-s<seed>.png`; skips existing files."""
    from tqdm.auto import tqdm

    from elite.fileio import atomic_path
    from elite.pipeline import derive_seed

    jobs = []
    for concept in concepts:
        folder = Path(out_dir) / _safe_segment(concept.concept_id)
        for p, prompt in enumerate(prompts):
            for i in range(images_per_prompt):
                s = derive_seed(concept.concept_id, prompt, i, base=seed)
                jobs.append(_Job(concept, prompt, s, folder / f"p{p:02d}-i{i:02d}-s{s}.png"))
    todo = [job for job in jobs if not job.file.exists()]
    for start in tqdm(range(0, len(todo), batch_size), desc="generating", unit="batch"):
        chunk = todo[start:start + batch_size]
        out = pipe([j.prompt for j in chunk], [j.concept for j in chunk], seed=[j.seed for j in chunk],
                   show_progress=False, **call_kwargs)
        for job, image in zip(chunk, out.images, strict=True):
            with atomic_path(job.file) as tmp:
                image.save(tmp, format="PNG")
    return [job.record() for job in jobs]


def cmd_generate(args: argparse.Namespace) -> int:
    from elite.pipeline import ElitePipeline

    _require(args, "pretrained_model", "global_mapper", "local_mapper")
    concepts = _read_concepts(args)
    prompts = list(args.prompt) or list(DEFAULT_PROMPTS)
    pipe = ElitePipeline.from_pretrained(args.pretrained_model, None, args.global_mapper, args.local_mapper,
                                         torch_dtype=_dtype(args), device=args.device)
    records = generate_images(
        pipe, concepts, prompts, args.out, images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size, seed=args.seed, placeholder=args.placeholder,
        lambda_local=args.lambda_local, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
        height=args.height, width=args.width)
    _write_manifest(Path(args.out) / "manifest.jsonl", records)
    print(f"{len(records)} images in {args.out} (manifest: {Path(args.out) / 'manifest.jsonl'})")
    return 0


def _read_concepts(args: argparse.Namespace) -> list[ConceptEmbedding]:
    from elite.concepts import load_embeddings
    from elite.store import EmbeddingStore

    if bool(args.embeddings) == bool(args.store):
        raise InputError("give exactly one of --embeddings FILE and --store DIR")
    if args.store:
        return EmbeddingStore(args.store).read_embeddings(args.concept, args.encoder_id)
    concepts = load_embeddings(args.embeddings)
    if args.concept:
        missing = sorted(set(args.concept) - {c.concept_id for c in concepts})
        if missing:
            raise InputError(f"{args.embeddings}: no concept {missing[0]!r}")
        concepts = [c for c in concepts if c.concept_id in set(args.concept)]
    return concepts


def _write_manifest(path: Path, records: list[dict[str, object]]) -> None:
    from elite.fileio import write_bytes_atomic

    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def cmd_personalize(args: argparse.Namespace) -> int:
    # before Prefect is first imported: no telemetry calls (they fail noisily offline)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        from flows.personalize import personalize_catalog, resolve_models
    except ImportError as err:
        raise InputError(f"`elite personalize` runs the Prefect flows: install them with "
                         f"pip install -e '.[flows]' ({err})") from None
    from elite.storage import open_store

    models = {"pretrained_model": args.pretrained_model, "vision_model": args.vision_model,
              "global_mapper": args.global_mapper, "local_mapper": args.local_mapper}
    steps, height, width = args.steps, args.height, args.width
    if args.tiny:
        from elite.tiny import make_tiny_models

        tiny = make_tiny_models(args.tiny_dir)  # seeded: the same weights, hence the same encoder id, every run
        models = {name: str(getattr(tiny, name)) for name in models}
        steps, height, width = steps or 4, height or 64, width or 64
    resolve_models(args.engine, onnx_path=args.onnx, **models)  # a missing model: one line, before Prefect starts
    prompts = args.prompts
    if prompts is None:  # the default prompts, as a prompt file next to the outputs
        out = open_store(args.out)
        out.put("prompts.txt", "".join(f"{p}\n" for p in DEFAULT_PROMPTS).encode())
        prompts = out.uri("prompts.txt")
    report = personalize_catalog(
        args.concepts, prompts, args.out, store_uri=args.store, manifest=args.manifest, engine=args.engine,
        onnx_path=args.onnx, steps=steps or 100, height=height or 512, width=width or 512,
        guidance_scale=args.guidance_scale, lambda_local=args.lambda_local, encode_batch_size=args.encode_batch_size,
        generate_batch_size=args.batch_size, base_seed=args.seed,
        devices=args.devices.split(",") if args.devices else None, dtype=args.dtype or "auto", **models)
    if report["concepts"] == 0 and not report["failures"]:
        print(f"elite: error: no concepts found in {args.concepts}", file=sys.stderr)
        return 1
    for failure in report["failures"]:
        print(f"FAILED {failure['concept_id'] or '-'} ({failure['stage']}) {failure['uri']}: {failure['reason']}",
              file=sys.stderr)
    print(f"personalize: {report['encoded']} concepts encoded ({report['encode_skipped']} already stored), "
          f"{report['generated']} images generated ({report['generate_skipped']} already there), "
          f"{report['failed']} failed\n  images: {report['images_uri']}\n  manifest: {report['manifest_uri']}\n"
          f"  failures: {report['failures_uri']}" + ("\n  (tiny random models: the images are noise-like by design)"
                                                     if args.tiny else ""))
    return 1 if report["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elite", description="ELITE: encode visual concepts into word "
                                     "embeddings and generate personalised images with Stable Diffusion 1.x.")
    parser.add_argument("--verbose", action="store_true", help="keep diffusers/transformers logs and bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert-checkpoint", help="check a release mapper .pt and convert it to safetensors",
                       description="Strictly check a release global_mapper.pt / local_mapper.pt (keys and shapes "
                                   "of SD 1.x + CLIP ViT-L/14) and write it as safetensors. Pickles that hold "
                                   "anything but tensors are refused, never executed.")
    p.add_argument("src", help="the release .pt file")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--pretrained-model", help="check against this SD repo's UNet layers instead of SD 1.x")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-onnx", help="export the concept encoder to one ONNX file",
                       description="Export CLIP vision tower + global mapper + local mapper as one ONNX graph "
                                   "with a dynamic batch axis. fp32: reference; int8: dynamic int8 weights, the "
                                   "fast CPU variant; fp16: for CUDA (onnxruntime-gpu).")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    _add_model_args(p, vision=True, sd=True, runtime=False)
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("make-tiny-models", help="write tiny random models in the real layouts (offline)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("encode", help="encode a folder of concept images into an embeddings file",
                       description="Encode every image of a folder (N.jpg with an optional mask N_bg.png, "
                                   "non-zero = object; without a mask the whole image is the object) into "
                                   "five words and 256 local tokens each, written to one safetensors file.")
    p.add_argument("concepts", help="folder of concept images")
    p.add_argument("--store", help="Parquet embedding store (folder) to append to; concepts already stored "
                                   "for this encoder (same image and mask bytes) are skipped")
    p.add_argument("--out", help="also/instead write this run's embeddings to one .safetensors file")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    p.add_argument("--onnx", help="ONNX encoder file for --engine onnx (from `elite export-onnx`)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_model_args(p, vision=True, sd=True)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("generate", help="generate images from an embeddings file and prompts",
                       description="For every concept of the embeddings file and every prompt, generate "
                                   "images. Prompts hold the placeholder (default S), e.g. 'a photo of a S "
                                   "on the beach'. Files already present are skipped, so a rerun resumes.")
    p.add_argument("--embeddings", help="safetensors file written by `elite encode --out`")
    p.add_argument("--store", help="Parquet embedding store written by `elite encode --store`")
    p.add_argument("--encoder-id", help="with --store: read the embeddings of this encoder (needed when "
                                        "concepts were stored by several)")
    p.add_argument("--prompt", action="append", default=[], help="prompt with the placeholder (repeatable)")
    p.add_argument("--concept", action="append", default=None, help="only these concept ids (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--placeholder", default="S")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="denoising steps (reference: 100)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="reference: 5")
    p.add_argument("--lambda-local", type=float, default=0.8, help="weight of the local branch (reference: 0.8)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="base of the per-image seeds")
    p.add_argument("--batch-size", type=int, default=4)
    _add_model_args(p, vision=False, sd=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("personalize", help="the catalog job: encode new concepts, generate missing images (Prefect)",
                       description="Run the personalize_catalog Prefect flow: encode the concepts of a folder or "
                                   "manifest that are not stored yet, then generate every image of the prompt file "
                                   "that is missing, under OUT/images, with the embedding store in OUT/embeddings. "
                                   "Folders and s3:// URIs both work. Without PREFECT_API_URL, Prefect runs in "
                                   "ephemeral mode (no server). Exit status 1 when anything failed.")
    p.add_argument("--concepts", required=True, help="folder or s3:// prefix of concept images (N.jpg + N_bg.png)")
    p.add_argument("--manifest", help="a CSV/JSONL manifest key inside --concepts instead of the folder listing")
    p.add_argument("--prompts", help="prompt file (.txt, .jsonl or .csv; see docs/inputs.md); default: 2 prompts")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--store", help="embedding store location (default: OUT/embeddings)")
    p.add_argument("--tiny", action="store_true", help="offline: tiny random models (written to --tiny-dir)")
    p.add_argument("--tiny-dir", default="outputs/tiny-models", help="where --tiny writes its models")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    p.add_argument("--onnx", default=os.environ.get("ELITE_ONNX_ENCODER"),
                   help="ONNX encoder file for --engine onnx [$ELITE_ONNX_ENCODER]")
    p.add_argument("--steps", type=int, help="denoising steps (default 100, the reference; 4 with --tiny)")
    p.add_argument("--height", type=int, help="default 512 (64 with --tiny)")
    p.add_argument("--width", type=int, help="default 512 (64 with --tiny)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="reference: 5")
    p.add_argument("--lambda-local", type=float, default=0.8, help="weight of the local branch (reference: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="base of the per-image seeds")
    p.add_argument("--batch-size", type=int, default=4, help="images per generation task")
    p.add_argument("--encode-batch-size", type=int, default=8, help="concepts per encoding task")
    p.add_argument("--devices", help="generation slots, e.g. cuda:0,cuda:1 (default: every GPU, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    _add_model_args(p, vision=True, sd=True, runtime=False)
    p.set_defaults(func=cmd_personalize)
    return parser


def _quiet_libraries() -> None:
    """Keep the CLI's output to our progress bars and results: no weight-loading bars or backend notices."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args))
    except EliteError as err:
        print(f"elite: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
