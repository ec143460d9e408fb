"""Prefect flows over the `elite` library (install with the `flows` extra).

    flows.personalize.personalize_catalog  the scheduled catalog job: encode what is new, generate what is missing
    flows.encode.encode_concepts           concept images on a store -> the embedding table (Delta Lake)
    flows.generate.generate_images         stored concepts x a prompt file -> PNGs, a results manifest, failures
    flows.export.export_embeddings         the store (whole or filtered) -> Parquet, safetensors, NumPy, TI files

Flows only wire: they open stores from URIs, call `elite` functions and pass references (keys, URIs, concept
ids) between tasks; each task reads its own images or embeddings. Models load once per worker process.
"""
