"""What a training run writes: the mapper in the release's layout, checkpoints (whole or not at all) and
validation images through ElitePipeline."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import cast

import torch
from accelerate import Accelerator

from elite.errors import EliteError
from elite.fileio import atomic_path
from elite.model.checkpoints import save_safetensors
from elite.model.mappers import GlobalMapper, LocalMapper
from elite.model.pipeline import REFERENCE, ElitePipeline
from elite.model.preprocessing import open_image
from elite.training.data import ConceptDataset
from elite.training.models import FrozenModels, new_mapper
from elite.training.settings import TrainSettings

logger = logging.getLogger(__name__)


def save_mapper(mapper: torch.nn.Module, path: Path) -> None:
    """The mapper as the release ships it (a pickled plain state dict, float32 on the CPU) and as safetensors."""
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in mapper.state_dict().items()}
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    save_safetensors(state, path.with_suffix(".safetensors"))


def list_checkpoints(output: Path) -> list[Path]:
    """`output/checkpoint-<step>/` folders, oldest first."""
    return sorted(output.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def save_checkpoint(accelerator: Accelerator, mapper: torch.nn.Module, settings: TrainSettings, output: Path,
                    step: int) -> Path:
    """`output/checkpoint-<step>/`, whole or not at all: written under a temporary name, then renamed."""
    final = output / f"checkpoint-{step:07d}"
    temporary = output / f".checkpoint-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        save_mapper(mapper, temporary / f"{settings.stage}_mapper.pt")
        (temporary / "trainer.json").write_text(json.dumps({"step": step, "settings": asdict(settings)}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
    accelerator.wait_for_everyone()
    return final


def validation_images(settings: TrainSettings, frozen: FrozenModels, glob: GlobalMapper, local: LocalMapper | None,
                      dataset: ConceptDataset, output: Path, step: int) -> Path:
    """`output/validation/step-<step>/<concept>.png`: the first concepts encoded and generated through ElitePipeline
    with the weights as they are ("a photo of a S", seed 0). Stage 1 has no trained local mapper yet: its images
    use the global word alone (lambda 0); stage 2's use the reference lambda."""
    folder = output / "validation" / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    local_mapper = local if local is not None else cast(LocalMapper, new_mapper(LocalMapper, frozen))
    pipe = ElitePipeline(frozen.vae, frozen.text_encoder, frozen.tokenizer, frozen.unet, REFERENCE.scheduler(),
                         frozen.vision, glob, local_mapper)
    for ref in dataset.refs[:settings.validation_concepts]:
        try:
            photo = open_image(dataset.locations.get(ref.image), dataset.locations.uri(ref.image))
            mask = None if ref.mask is None else dataset.read_mask(ref, photo)
            [concept] = pipe.encode_concepts([photo], [mask], [ref.concept_id])
        except EliteError as err:
            logger.warning("no validation image of %s: %s", ref.concept_id, err)
            continue
        [image] = pipe("a photo of a S", concept, seed=0, num_inference_steps=settings.validation_steps,
                       height=settings.resolution, width=settings.resolution, show_progress=False,
                       lambda_local=0.0 if local is None else REFERENCE.lambda_local).images
        with atomic_path(folder / f"{ref.concept_id}.png") as temporary:
            image.save(temporary, format="PNG")
    return folder
