"""The `elite` command line, a front door over `elite.jobs` beside the Prefect flows in `flows/`."""
