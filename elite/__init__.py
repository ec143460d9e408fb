"""ELITE: encode visual concepts into textual embeddings for customised text-to-image generation.

    elite.model   the method: mappers, attention, text injection, encoder, pipeline, checkpoints
    elite.data    the data plumbing: object stores (folders, S3), the embedding store, sources, prompts, export formats
    elite.jobs    the jobs both front doors run (the `elite` CLI in elite_cli/, the Prefect flows in flows/)

The library is importable without Prefect; heavy submodules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConceptEmbedding",
    "ConceptEncoder",
    "ConceptPreprocessor",
    "EliteAttnProcessor",
    "EliteError",
    "ElitePipeline",
    "ElitePipelineOutput",
    "EmbeddingRecord",
    "EmbeddingStore",
    "GlobalMapper",
    "InputError",
    "LocalInjection",
    "LocalMapper",
    "MapperConfig",
    "ObjectStore",
    "OnnxConceptEncoder",
    "StorageError",
    "TorchConceptEncoder",
    "TransientStorageError",
    "convert_checkpoint",
    "elite_attention",
    "embedding_store",
    "encode_catalog",
    "encode_prompts",
    "export_concept_encoder",
    "export_embeddings",
    "find_concepts",
    "generate_catalog",
    "load_embeddings",
    "load_encoder",
    "load_mapper",
    "make_tiny_models",
    "open_store",
    "save_embeddings",
]

_WHERE = {
    "CheckpointError": "errors", "EliteError": "errors", "InputError": "errors", "StorageError": "errors",
    "TransientStorageError": "errors",
    "ConceptEmbedding": "model.concepts", "load_embeddings": "model.concepts", "save_embeddings": "model.concepts",
    "ConceptEncoder": "model.encoder", "TorchConceptEncoder": "model.encoder",
    "ConceptPreprocessor": "model.preprocessing", "EliteAttnProcessor": "model.attention",
    "LocalInjection": "model.attention", "elite_attention": "model.attention", "ElitePipeline": "model.pipeline",
    "ElitePipelineOutput": "model.pipeline", "GlobalMapper": "model.mappers", "LocalMapper": "model.mappers",
    "MapperConfig": "model.mappers", "convert_checkpoint": "model.checkpoints", "load_mapper": "model.checkpoints",
    "encode_prompts": "model.text", "make_tiny_models": "model.tiny", "load_encoder": "model.loading",
    "OnnxConceptEncoder": "model.onnx_encoder", "export_concept_encoder": "model.onnx_export",
    "EmbeddingRecord": "data.store_format", "EmbeddingStore": "data.store", "ObjectStore": "data.objects",
    "open_store": "data.storage", "embedding_store": "data.storage", "find_concepts": "data.sources",
    "export_embeddings": "jobs.export", "encode_catalog": "jobs.encode", "generate_catalog": "jobs.generate",
}

if TYPE_CHECKING:
    from elite.data.objects import ObjectStore
    from elite.data.sources import find_concepts
    from elite.data.storage import embedding_store, open_store
    from elite.data.store import EmbeddingStore
    from elite.data.store_format import EmbeddingRecord
    from elite.errors import CheckpointError, EliteError, InputError, StorageError, TransientStorageError
    from elite.jobs.encode import encode_catalog
    from elite.jobs.export import export_embeddings
    from elite.jobs.generate import generate_catalog
    from elite.model.attention import EliteAttnProcessor, LocalInjection, elite_attention
    from elite.model.checkpoints import convert_checkpoint, load_mapper
    from elite.model.concepts import ConceptEmbedding, load_embeddings, save_embeddings
    from elite.model.encoder import ConceptEncoder, TorchConceptEncoder
    from elite.model.loading import load_encoder
    from elite.model.mappers import GlobalMapper, LocalMapper, MapperConfig
    from elite.model.onnx_encoder import OnnxConceptEncoder
    from elite.model.onnx_export import export_concept_encoder
    from elite.model.pipeline import ElitePipeline, ElitePipelineOutput
    from elite.model.preprocessing import ConceptPreprocessor
    from elite.model.text import encode_prompts
    from elite.model.tiny import make_tiny_models


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'elite' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"elite.{_WHERE[name]}"), name)
