"""The `elite` command line: a thin front door over the library's jobs (the flows are the other one).

Every command takes folders and s3:// URIs alike and writes the same layout and run tables as the flows. An
EliteError prints one `elite: error: ...` line and exits 1; items that failed are printed as `FAILED` lines,
are in the run's failures table, and make the exit status 1 while the rest is done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from elite.data.prompts import DEFAULT_PROMPTS, PromptSpec, load_prompts
from elite.data.storage import embedding_store, embedding_table, open_store
from elite.errors import EliteError, Failure, InputError, printable
from elite.fileio import sha256_file
from elite.jobs.common import check_output, check_readable
from elite.jobs.export import export_embeddings
from elite.jobs.models import GENERATOR_NEEDS, encoder_needs, resolve_evaluation_models, resolve_models
from elite.model.sampling import check_sampler
from elite_cli.common import evaluation_summary, models_of, print_failures
from elite_cli.parser import build_parser
from elite_cli.personalize import cmd_personalize
from elite_cli.quiet import quiet_libraries
from elite_cli.store import cmd_store

# The model side (torch models, diffusers, ONNX export) is imported by the commands that use it: `--help`, a
# mistyped option or a missing folder answer in a second, not after diffusers has loaded.


def cmd_convert(args: argparse.Namespace) -> int:
    args.quiet()
    from elite.model.checkpoints import convert_checkpoint
    from elite.model.loading import unet_cross_attention_layers

    layers = unet_cross_attention_layers(args.pretrained_model) if args.pretrained_model else None
    count = convert_checkpoint(args.src, args.dst, layers)
    print(f"wrote {args.dst} ({count} tensors)")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    args.quiet()
    from elite.model.encoder import TorchConceptEncoder
    from elite.model.loading import unet_cross_attention_layers
    from elite.model.onnx_export import export_concept_encoder

    models = models_of(args, encoder_needs("torch"))
    layers = unet_cross_attention_layers(models["pretrained_model"]) if models["pretrained_model"] else None
    encoder = TorchConceptEncoder.from_pretrained(str(models["vision_model"]), str(models["global_mapper"]),
                                                  str(models["local_mapper"]), layers)
    sources = {"vision_model": str(models["vision_model"]),
               "global_mapper_file_sha256": sha256_file(str(models["global_mapper"])),
               "local_mapper_file_sha256": sha256_file(str(models["local_mapper"]))}
    path = export_concept_encoder(encoder.module, args.out, args.precision, sources)
    print(f"wrote {path} ({args.precision}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    args.quiet()
    from elite.model.tiny import make_tiny_eval_models, make_tiny_models

    paths = make_tiny_models(args.out_dir, seed=args.seed).__dict__
    paths |= make_tiny_eval_models(f"{args.out_dir}/eval", seed=args.seed).__dict__
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    source = open_store(args.concepts)
    check_readable(source, "concepts")  # before the models load: a mistyped folder fails in a second
    reports = open_store(args.store)  # the store's folder: the failures table goes under its _runs/
    check_output(reports)
    embeddings = embedding_table(args.store)  # the earlier format is refused (with how to migrate) before models load
    models = models_of(args, encoder_needs(args.engine))
    args.quiet()
    from elite.jobs.encode import EncoderSettings, cached_encoder, encode_catalog  # the model side: when needed

    encoder = cached_encoder(EncoderSettings(args.engine, models["onnx_path"], models["vision_model"],
                                             models["global_mapper"], models["local_mapper"],
                                             models["pretrained_model"], args.encode_device, args.dtype))
    with tqdm(desc="encoding", unit="concept") as bar:
        report = encode_catalog(source, embeddings, encoder, manifest=args.manifest, batch_size=args.batch_size,
                                reports=reports, replace_sources=args.replace_sources,
                                progress=bar.update, compact_min_files=args.compact_min_files or None)
    print_failures(report.failures)
    print(f"encoded {report.done} concepts ({report.skipped} already stored, {len(report.failures)} failed) with "
          f"{report.encoder_id[:18]} on {getattr(encoder, 'device', '?')} -> {args.store}"
          + (f"\n  compacted {report.compacted.get('numFilesRemoved', 0)} small files" if report.compacted else "")
          + (f"\n  failures: {report.failures_uri}" if report.failures_uri else ""))
    return 1 if report.failures else 0


def _prompts(args: argparse.Namespace) -> tuple[list[PromptSpec], list[Failure]]:
    if args.prompt and args.prompts:
        raise InputError("give --prompt (repeatable) or --prompts FILE, not both")
    if args.prompt:
        images = 1 if args.images_per_prompt is None else args.images_per_prompt
        return [PromptSpec(p, images, placeholder=args.placeholder) for p in args.prompt], []
    return load_prompts(args.prompts, args.images_per_prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    check_sampler(args.steps, args.guidance_scale, args.lambda_local, args.height, args.width)
    models = models_of(args, GENERATOR_NEEDS)
    prompts, prompt_failures = _prompts(args)
    embeddings = embedding_store(args.store)
    if embeddings.is_empty():  # a mistyped --store would otherwise "generate 0 images" and succeed
        raise InputError(f"the embedding store at {args.store} holds no concepts (encode some with `elite encode`)")
    out = open_store(args.out)
    check_output(out)
    args.quiet()
    from elite.jobs.generate import GenerationSettings, generate_catalog  # the model side: when needed

    settings = GenerationSettings(str(models["pretrained_model"]), str(models["global_mapper"]),
                                  str(models["local_mapper"]), args.encoder_id, args.steps, args.guidance_scale,
                                  args.lambda_local, args.height, args.width, args.dtype,
                                  channels_last=args.channels_last, compile_backend=args.compile)
    devices = args.device.split(",") if args.device not in (None, "auto") else None
    with tqdm(desc="generating", unit="image") as bar:
        report = generate_catalog(embeddings, prompts, out, settings, concept_ids=args.concept,
                                  batch_size=args.batch_size, base_seed=args.seed, devices=devices,
                                  prompt_failures=prompt_failures, progress=bar.update)
    print_failures(report.failures)
    print(f"generated {report.generated} images ({report.skipped} already there, {len(report.failures)} failed) "
          f"in {report.out_uri}" + (f"\n  manifest: {report.manifest_uri}" if report.manifest_uri else "")
          + (f"\n  failures: {report.failures_uri}" if report.failures_uri else ""))
    return 1 if report.failures else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    models = resolve_evaluation_models(clip_model=args.clip_model, dino_model=args.dino_model)
    args.quiet()
    from elite.jobs.evaluate import EvaluationSettings, evaluate_run  # the model side: when needed

    settings = EvaluationSettings(models["clip_model"], models["dino_model"], args.device, args.dtype,
                                  args.class_word)
    bars: list[Any] = []  # opened by the first finished batch: a run that cannot be read is one error line only

    def progress(images: int) -> None:
        if not bars:
            bars.append(tqdm(desc="evaluating", unit="image"))
        bars[0].update(images)

    try:
        report = evaluate_run(args.run, settings, store_uri=args.store, compare=args.compare,
                              batch_size=args.batch_size, report_concepts=args.report_concepts, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    for run in (report.compare, report):
        if run is not None:
            print_failures(run.failures)
            print(evaluation_summary(run))
    return 1 if report.failures or (report.compare is not None and report.compare.failures) else 0


def cmd_train(args: argparse.Namespace) -> int:
    models = resolve_models(("pretrained_model", "vision_model"), pretrained_model=args.pretrained_model,
                            vision_model=args.vision_model)  # mappers: only from the options (start points)
    check_readable(open_store(args.concepts), "concepts")
    args.quiet()
    from elite.jobs.train import train_catalog  # the model side: when needed
    from elite.training.settings import TrainSettings

    settings = TrainSettings(
        args.stage, str(models["pretrained_model"]), str(models["vision_model"]), args.out,
        global_mapper=args.global_mapper, local_mapper=args.local_mapper, steps=args.steps,
        batch_size=args.batch_size, gradient_accumulation=args.gradient_accumulation,
        learning_rate=args.learning_rate, scale_lr=not args.no_scale_lr, warmup_steps=args.warmup_steps,
        mixed_precision=args.mixed_precision, seed=args.seed, resolution=args.resolution,
        checkpoint_every=args.checkpoint_every, resume=args.resume, validate_every=args.validate_every,
        gradient_checkpointing=args.gradient_checkpointing, num_workers=args.num_workers)
    report = train_catalog(args.concepts, settings, manifest=args.manifest, augment=not args.no_augment,
                           layout=args.layout, split=args.split, limit=args.limit)
    print_failures(report.failures)
    result = report.result
    change = f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, " if result.losses else ""
    print(f"trained the {args.stage} mapper to step {result.steps} ({change}{result.skipped} samples skipped) -> "
          f"{result.mapper_path}")
    return 1 if report.failures else 0


def cmd_export(args: argparse.Namespace) -> int:
    where = dict(args.where) if args.where else None
    manifest = export_embeddings(args.store, args.dest, args.format, concept_ids=args.concept, where=where,
                                 encoder_id=args.encoder_id, shard_size=args.shard_size,
                                 token_template=args.token_template, version=args.version)
    at = f" (table version {manifest['store_version']})" if manifest["store_version"] is not None else ""
    print(f"exported {manifest['exported']} concepts{at} as {args.format} in {manifest['file_count']} file(s) to "
          f"{manifest['dest_uri']}\n  manifest: {manifest['manifest_uri']}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert-checkpoint": cmd_convert, "export-onnx": cmd_export_onnx, "make-tiny-models": cmd_make_tiny,
    "encode": cmd_encode, "generate": cmd_generate, "evaluate": cmd_evaluate, "train": cmd_train, "export": cmd_export,
    "personalize": cmd_personalize,
    "store": cmd_store,
}


class _Warnings(logging.Handler):
    """The library's warnings (a column dropped from a manifest, a prompt that applies to no concept) as
    `elite: warning: ...` lines on stderr; sys.stderr is looked up per line, as tests and tools swap it."""

    def emit(self, record: logging.LogRecord) -> None:
        # write, not print: inside a Prefect run with log_prints, print would be logged a second time
        sys.stderr.write(f"elite: {record.levelname.lower()}: {printable(record.getMessage())}\n")


WARNINGS = _Warnings(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(DEFAULT_PROMPTS).parse_args(argv)
    args.quiet = quiet_libraries if not args.verbose else (lambda: None)
    library = logging.getLogger("elite")
    if WARNINGS not in library.handlers and args.command != "personalize":  # the flows log them to the run's log
        library.addHandler(WARNINGS)
    try:
        return COMMANDS[args.command](args)
    except EliteError as err:
        print(f"elite: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
