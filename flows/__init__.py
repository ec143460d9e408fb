"""Prefect flows over the `elite` library (install with the `flows` extra).

    flows.encode.encode_concepts     concept images on a store -> the Parquet embedding store, skipping stored ones
    flows.generate.generate_images   stored concepts x a prompt file -> PNGs and a results manifest on a store

Flows only wire: they open stores from URIs, call `elite` functions and pass references (keys, URIs, concept
ids) between tasks; each task reads its own images or embeddings. Models load once per worker process.
"""
