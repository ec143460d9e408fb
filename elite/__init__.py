"""ELITE: encode visual concepts into textual embeddings for customised text-to-image generation.

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
    "convert_checkpoint",
    "elite_attention",
    "embedding_store",
    "encode_prompts",
    "export_concept_encoder",
    "find_concepts",
    "load_embeddings",
    "load_mapper",
    "make_tiny_models",
    "open_store",
    "save_embeddings",
]

_WHERE = {
    "CheckpointError": "errors", "EliteError": "errors", "InputError": "errors", "StorageError": "errors",
    "ConceptEmbedding": "concepts", "find_concepts": "concepts", "load_embeddings": "concepts",
    "save_embeddings": "concepts", "ConceptEncoder": "encoder", "TorchConceptEncoder": "encoder",
    "ConceptPreprocessor": "preprocessing", "EliteAttnProcessor": "attention", "LocalInjection": "attention",
    "elite_attention": "attention", "ElitePipeline": "pipeline", "ElitePipelineOutput": "pipeline",
    "GlobalMapper": "mappers", "LocalMapper": "mappers", "MapperConfig": "mappers",
    "convert_checkpoint": "checkpoints", "load_mapper": "checkpoints", "encode_prompts": "text",
    "make_tiny_models": "tiny", "EmbeddingRecord": "store", "EmbeddingStore": "store",
    "ObjectStore": "storage", "open_store": "storage", "embedding_store": "storage",
    "OnnxConceptEncoder": "onnx_encoder", "export_concept_encoder": "export",
}

if TYPE_CHECKING:
    from elite.attention import EliteAttnProcessor, LocalInjection, elite_attention
    from elite.checkpoints import convert_checkpoint, load_mapper
    from elite.concepts import ConceptEmbedding, find_concepts, load_embeddings, save_embeddings
    from elite.encoder import ConceptEncoder, TorchConceptEncoder
    from elite.errors import CheckpointError, EliteError, InputError, StorageError
    from elite.export import export_concept_encoder
    from elite.mappers import GlobalMapper, LocalMapper, MapperConfig
    from elite.onnx_encoder import OnnxConceptEncoder
    from elite.pipeline import ElitePipeline, ElitePipelineOutput
    from elite.preprocessing import ConceptPreprocessor
    from elite.storage import ObjectStore, embedding_store, open_store
    from elite.store import EmbeddingRecord, EmbeddingStore
    from elite.text import encode_prompts
    from elite.tiny import make_tiny_models


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'elite' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"elite.{_WHERE[name]}"), name)
