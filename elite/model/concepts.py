"""Concept embeddings and the embeddings file (one safetensors file of several concepts)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from elite.errors import InputError, StorageError
from elite.model.checkpoints import save_safetensors

EMBEDDINGS_FORMAT = "elite-embeddings"
EMBEDDINGS_VERSION = "1"


@dataclass(frozen=True)
class ConceptEmbedding:
    """One encoded concept: the five words and the masked local tokens."""

    concept_id: str
    words: torch.Tensor  # (5, text_dim): words[0] is the primary word w0
    local_tokens: torch.Tensor  # (patches, text_dim), zero on background patches
    mask_grid: torch.Tensor  # (grid, grid), 1 = object patch

    @property
    def primary_word(self) -> torch.Tensor:
        return self.words[0]  # (text_dim,)


def save_embeddings(path: str | os.PathLike[str], concepts: list[ConceptEmbedding],
                    metadata: dict[str, str] | None = None) -> None:
    """Write concepts to one safetensors file (atomically); concept ids and `metadata` go in its header."""
    if not concepts:
        raise InputError("no concepts to save")
    header = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION,
              "concept_ids": json.dumps([c.concept_id for c in concepts]), **(metadata or {})}
    save_safetensors({
        "words": torch.stack([c.words.float().cpu() for c in concepts]),  # (concepts, 5, text_dim)
        "local_tokens": torch.stack([c.local_tokens.float().cpu() for c in concepts]),  # (concepts, patches, dim)
        "mask_grid": torch.stack([c.mask_grid.float().cpu() for c in concepts]),  # (concepts, grid, grid)
    }, path, metadata=header)


def load_embeddings(path: str | os.PathLike[str]) -> list[ConceptEmbedding]:
    """Read an embeddings file written by `save_embeddings`."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except FileNotFoundError as err:
        raise StorageError(f"{path}: no such file") from err
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise StorageError(f"{path}: not a readable embeddings file: {err}") from err
    if header.get("format") != EMBEDDINGS_FORMAT:
        raise StorageError(f"{path}: not an ELITE embeddings file (format {header.get('format')!r})")
    if header.get("version") != EMBEDDINGS_VERSION:
        raise StorageError(f"{path}: embeddings format version {header.get('version')!r}, "
                           f"this release reads {EMBEDDINGS_VERSION!r}")
    ids = json.loads(header["concept_ids"])
    return [ConceptEmbedding(cid, tensors["words"][i], tensors["local_tokens"][i], tensors["mask_grid"][i])
            for i, cid in enumerate(ids)]
