"""`elite store ...`: history, optimize, vacuum and migrate on the embedding table (elite.data.store)."""

from __future__ import annotations

import argparse
import datetime
import json

from tqdm.auto import tqdm

from elite.data.migrate import migrate_store
from elite.data.storage import embedding_store, embedding_table
from elite.data.store import EmbeddingStore
from elite.errors import InputError


def cmd_store(args: argparse.Namespace) -> int:
    if args.store_command == "migrate":
        with tqdm(desc="migrating", unit="concept") as bar:
            report = migrate_store(args.old, args.new, progress=bar.update)
        print(f"migrated {report.source_rows} concepts ({report.written} written, {report.skipped} already in the "
              f"table) of {len(report.encoders)} encoder(s) -> {args.new} (version {report.version})")
        return 0
    if args.store_command == "history":
        store = embedding_store(args.store)
        if not isinstance(store, EmbeddingStore):
            raise InputError(f"{args.store}: a store of the earlier part format has no history; "
                             f"`elite store migrate {args.store} NEW` converts it")
        commits = store.history(args.limit)
        if not commits:
            raise InputError(f"{args.store}: no embedding table here")
        for commit in commits:
            when = datetime.datetime.fromtimestamp(commit["timestamp"] / 1000, datetime.UTC)
            metrics = commit.get("operationMetrics") or {}
            changed = {k: v for k, v in metrics.items() if k.startswith(("num_target_rows_", "numFiles")) and v}
            print(f"{commit['version']:>6}  {when:%Y-%m-%d %H:%M:%S}  {commit['operation']:<13} "
                  f"{json.dumps(changed, sort_keys=True) if changed else ''}".rstrip())
        return 0
    table = embedding_table(args.store)
    if table.version() is None:
        raise InputError(f"{args.store}: no embedding table here")
    if args.store_command == "optimize":
        before = table.small_files()
        metrics = table.optimize(z_order=args.z_order, target_size=args.target_size)
        print(f"optimized {args.store}: {metrics.get('numFilesRemoved', 0)} files rewritten into "
              f"{metrics.get('numFilesAdded', 0)} ({before} small files before), version {table.version()}")
        return 0
    files = table.vacuum(args.retention_hours, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(files)} files no version of the last {args.retention_hours:g} hours needs in {args.store}")
    for name in files:
        print(f"  {name}")
    return 0
