"""`python -m flows.serve`: the catalog job without a work pool or worker. The process registers the deployments
with the Prefect API at PREFECT_API_URL, then runs their flow runs as its own subprocesses until it is stopped.

    PREFECT_API_URL=http://prefect.internal:4200/api python -m flows.serve \\
        --concepts-uri s3://shop/catalog --prompts-uri s3://shop/prompts.txt --out-uri s3://shop/personalized \\
        --param steps=50 --param 'devices=["cuda:0", "cuda:1"]'

Deployments: `personalize-catalog/personalize-catalog` on a cron schedule (nightly by default, one run at a time)
and `export-embeddings/export-embeddings`, on demand, over the catalog's embedding store. Runs inherit this
process's environment: the ELITE_* model locations and S3 settings go there. Work pools instead: infra/README.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, cast

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ParameterTypeError, SignatureMismatchError
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from elite.errors import InputError
from elite.jobs.models import GENERATOR_NEEDS, MODEL_ENV, encoder_needs, resolve_models
from elite_cli.parser import name_value
from flows.export import export_embeddings
from flows.personalize import join_uri, personalize_catalog

CRON = "0 2 * * *"  # nightly at 02:00, as in infra/prefect.yaml
TIMEZONE = "UTC"


def build_deployments(concepts_uri: str, prompts_uri: str, out_uri: str, *, cron: str = CRON,
                      timezone: str = TIMEZONE, parameters: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The scheduled personalize-catalog deployment (`parameters`: more of its flow's arguments) and the
    on-demand export-embeddings deployment over its embedding store. Bad parameters fail here, not at run time."""
    catalog = {"concepts_uri": concepts_uri, "prompts_uri": prompts_uri, "out_uri": out_uri, **(parameters or {})}
    personalize_catalog.validate_parameters(catalog)
    store_uri = catalog.get("store_uri") or join_uri(out_uri, "embeddings")
    # module entrypoints: runs import the installed `flows` package, whatever this process's working directory;
    # to_deployment is typed for async callers too (async_dispatch), and returns the deployment when called sync
    deployments = [
        cast(RunnerDeployment, personalize_catalog.to_deployment(
            "personalize-catalog", schedule=Cron(cron, timezone=timezone), parameters=catalog, concurrency_limit=1,
            tags=["elite"], entrypoint_type=EntrypointType.MODULE_PATH)),
        cast(RunnerDeployment, export_embeddings.to_deployment(
            "export-embeddings", parameters={"store_uri": store_uri}, tags=["elite"],
            entrypoint_type=EntrypointType.MODULE_PATH)),
    ]
    for deployment in deployments:
        # set, to none: an update sends only the fields set, so a deployment of the same name made by `prefect
        # deploy` would keep its work pool, and that pool's workers would take these runs too
        deployment.work_pool_name = deployment.work_queue_name = None
    return deployments


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts-uri", required=True, help="the catalog: a folder or s3:// prefix")
    parser.add_argument("--prompts-uri", required=True, help="the prompt file")
    parser.add_argument("--out-uri", required=True, help="images, embedding store and run tables go under it")
    parser.add_argument("--cron", default=CRON, help=f"when personalize-catalog runs (default {CRON!r})")
    parser.add_argument("--timezone", default=TIMEZONE, help=f"an IANA name the cron is read in (default {TIMEZONE})")
    parser.add_argument("--param", type=name_value, action="append", default=[], metavar="NAME=VALUE",
                        help="another personalize_catalog parameter, e.g. steps=50; repeatable")
    args = parser.parse_args(argv)
    parameters = dict(args.param)
    try:
        deployments = build_deployments(args.concepts_uri, args.prompts_uri, args.out_uri, cron=args.cron,
                                        timezone=args.timezone, parameters=parameters)
        resolve_models(GENERATOR_NEEDS + encoder_needs(parameters.get("engine", "torch")),
                       **{name: parameters.get(name) for name in MODEL_ENV})
    except (ParameterTypeError, SignatureMismatchError, InputError, ValueError) as err:
        parser.error(str(err))
    serve(*deployments)


if __name__ == "__main__":
    main()
