"""`elite personalize`: the personalize_catalog Prefect flow from the command line.

Everything a user can mistype (folders, buckets, the manifest, the prompt file, models) is checked here, before
Prefect starts (its ephemeral API takes seconds to start, more on a busy machine) and before any output is written.
A run that fails inside Prefect ends in one `elite: error:` line (`--verbose` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import SimpleNamespace

from elite.data.prompts import load_prompts
from elite.data.storage import embedding_table, open_store
from elite.errors import EliteError, Failure, InputError
from elite.jobs.common import check_output, check_readable
from elite.jobs.models import GENERATOR_NEEDS, encoder_needs, resolve_evaluation_models
from elite.model.sampling import check_sampler
from elite_cli.common import evaluation_summary, models_of, print_failures

# Prefect's ephemeral API starts in 7 s on an idle machine and took 13-32 s on a busy 2-core one, past Prefect's
# 20 s default; a user's own setting wins.
PREFECT_STARTUP_TIMEOUT = ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
PREFECT_DEFAULTS = (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), PREFECT_STARTUP_TIMEOUT)


def check_inputs(args: argparse.Namespace) -> None:
    """Fail fast, with one line, on what would otherwise fail minutes into the run."""
    source = open_store(args.concepts)
    check_readable(source, "concepts")
    if args.manifest is not None and not source.exists(args.manifest):
        raise InputError(f"manifest {source.uri(args.manifest)}: no such file")
    load_prompts(args.prompts, args.images_per_prompt)  # readable, at least one usable prompt, seeds that fit
    for where in (args.out, args.store):
        if where is not None:
            check_output(open_store(where))  # a valid location; an S3 one must answer (bucket, credentials, endpoint)
    check_sampler(args.steps or 1, args.guidance_scale, args.lambda_local, args.height or 8, args.width or 8)
    # a store of the earlier format is refused here, with how to migrate it
    embedding_table(args.store or open_store(args.out).uri("embeddings"))
    if args.runner == "ray":
        from flows._ray import check_runner  # Ray and prefect-ray installed

        check_runner(args.runner)


class _NoTraceback(logging.Formatter):
    """A console formatter that prints a record's message but not its traceback (Prefect logs one per nested flow
    run that failed, above our one-line error); the run logs in Prefect's API keep them whole."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _tracebacks_to_run_logs_only() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler  # imported with the flows: Prefect is there

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        if not isinstance(handler.formatter, _NoTraceback):
            handler.setFormatter(_NoTraceback(handler.formatter))


def cmd_personalize(args: argparse.Namespace) -> int:
    check_inputs(args)
    args.quiet()
    tiny_models: dict[str, str | None] = {}
    steps, height, width = args.steps, args.height, args.width
    if args.tiny:
        from elite.model.tiny import make_tiny_models  # diffusers and transformers: only when asked

        tiny = make_tiny_models(args.tiny_dir)  # seeded: the same weights, hence the same encoder id, every run
        tiny_models = {name: str(getattr(tiny, name)) for name in ("pretrained_model", "vision_model",
                                                                   "global_mapper", "local_mapper")}
        steps, height, width = steps or 4, height or 64, width or 64
        if args.evaluate:
            from elite.model.tiny import make_tiny_eval_models

            tiny_eval = make_tiny_eval_models(f"{args.tiny_dir}/eval")
            tiny_models |= {"clip_model": str(tiny_eval.clip_model), "dino_model": str(tiny_eval.dino_model)}
    models = models_of(args, GENERATOR_NEEDS + encoder_needs(args.engine), **tiny_models)
    if args.evaluate:
        models |= resolve_evaluation_models(clip_model=models["clip_model"], dino_model=models["dino_model"])
    for name, value in PREFECT_DEFAULTS:  # before Prefect is first imported
        os.environ.setdefault(name, value)
    try:
        from flows.personalize import personalize_catalog  # the flows extra: an optional dependency
    except ImportError as err:
        raise InputError(f"`elite personalize` runs the Prefect flows: install them with "
                         f"pip install -e '.[flows]' ({err})") from None
    if not args.verbose:
        _tracebacks_to_run_logs_only()
    flow = personalize_catalog.with_options(timeout_seconds=args.timeout) if args.timeout else personalize_catalog
    try:
        report = flow(
            args.concepts, args.prompts, args.out, store_uri=args.store, manifest=args.manifest, engine=args.engine,
            steps=steps or 100, height=height or 512, width=width or 512, guidance_scale=args.guidance_scale,
            lambda_local=args.lambda_local, encode_batch_size=args.encode_batch_size,
            generate_batch_size=args.batch_size, base_seed=args.seed,
            devices=args.devices.split(",") if args.devices else None, dtype=args.dtype,
            channels_last=args.channels_last, compile_backend=args.compile, encode_device=args.encode_device,
            replace_sources=args.replace_sources,
            compact_min_files=args.compact_min_files or None, runner=args.runner, ray_address=args.ray_address,
            ray_stall_timeout=args.ray_stall_timeout, pretrained_model=models["pretrained_model"],
            vision_model=models["vision_model"],
            global_mapper=models["global_mapper"], local_mapper=models["local_mapper"], onnx_path=models["onnx_path"],
            images_per_prompt=args.images_per_prompt, evaluate=args.evaluate, clip_model=models["clip_model"],
            dino_model=models["dino_model"])
    except EliteError:
        raise
    except Exception as err:  # Prefect could not start, the run timed out, or a bug: one line unless --verbose
        if args.verbose:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise EliteError(f"the personalize-catalog flow run failed: {type(err).__name__}: {first} "
                         "(--verbose shows the traceback)") from err
    if report["concepts"] == 0 and not report["failures"]:
        print(f"elite: error: no concepts found in {args.concepts}", file=sys.stderr)
        return 1
    print_failures([Failure(**row) for row in report["failures"]])
    print(f"personalize: {report['encoded']} concepts encoded ({report['encode_skipped']} already stored), "
          f"{report['generated']} images generated ({report['generate_skipped']} already there), "
          f"{report['failed']} failed\n  images: {report['images_uri']}"
          + (f"\n  manifest: {report['manifest_uri']}" if report["manifest_uri"] else "")
          + (f"\n  failures: {report['failures_uri']}" if report["failures_uri"] else "")
          + ("\n  (tiny random models: the images are noise-like by design)" if args.tiny else ""))
    if report["evaluation"]:
        print(evaluation_summary(SimpleNamespace(**report["evaluation"])))
    return 1 if report["failed"] else 0
