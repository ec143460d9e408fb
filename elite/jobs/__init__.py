"""The jobs: one implementation each, behind both front doors (the `elite` CLI and the Prefect flows).

    elite.jobs.encode.encode_catalog       concept images on a store -> the embedding store
    elite.jobs.generate.generate_catalog   stored concepts x prompts -> PNGs, a results manifest, failures
    elite.data.export.export_embeddings    the embedding store -> Parquet, safetensors, NumPy or TI files

A job takes store objects (ObjectStore, EmbeddingStore) and an encoder or generation settings, never URIs it
opens itself, and a `run_batches` runner: the CLI runs batches here one after the other, the flows submit them
as Prefect tasks with retries of transient storage errors. What one item does becomes a `Failure` row; the run
goes on.
"""
