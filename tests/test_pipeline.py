from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler
from PIL import Image

from elite.errors import InputError
from elite.model.concepts import ConceptEmbedding
from elite.model.pipeline import ElitePipeline
from elite.model.text import encode_prompts
from elite.model.tiny import TinyModels

SMALL = {"num_inference_steps": 2, "height": 64, "width": 64, "show_progress": False}


@pytest.fixture(scope="module")
def concepts(pipe: ElitePipeline, concepts_dir: Path) -> list[ConceptEmbedding]:
    names = ["1", "2", "3", "7"]
    images = [Image.open(concepts_dir / f"{n}.jpg") for n in names]
    masks = [Image.open(concepts_dir / f"{n}_bg.png") for n in names]
    return pipe.encode_concepts(images, masks, names)


def test_batch_equals_one_by_one(pipe: ElitePipeline, concepts: list[ConceptEmbedding]) -> None:
    prompts = ["a photo of S on the beach", "S in the snow", "a painting of S", "S, next to a cat"]
    seeds = [11, 22, 33, 44]
    batch = pipe(prompts, concepts, seed=seeds, output_type="np", **SMALL).images
    assert isinstance(batch, np.ndarray) and batch.shape == (4, 64, 64, 3)
    for i in range(4):
        single = pipe(prompts[i], concepts[i], seed=seeds[i], output_type="np", **SMALL).images
        np.testing.assert_allclose(batch[i], single[0], atol=1e-4, rtol=0)


def test_seeds_reproduce_and_differ(pipe: ElitePipeline, concepts: list[ConceptEmbedding]) -> None:
    a = pipe("a photo of S", concepts[0], num_images_per_prompt=2, seed=[5, 6], output_type="np", **SMALL)
    b = pipe("a photo of S", concepts[0], num_images_per_prompt=2, seed=5, output_type="np", **SMALL)
    assert a.seeds == [5, 6]
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.allclose(a.images[0], a.images[1])
    gen = pipe("a photo of S", concepts[0], generator=torch.Generator().manual_seed(5), output_type="np", **SMALL)
    np.testing.assert_allclose(gen.images[0], a.images[0], atol=1e-5, rtol=0)  # batch 1 vs 2: GEMM rounding


def test_local_branch_and_concept_change_the_image(pipe: ElitePipeline, concepts: list[ConceptEmbedding]) -> None:
    run = lambda c, lam: pipe("a photo of S", c, seed=1, lambda_local=lam, output_type="np", **SMALL).images[0]  # noqa: E731
    base = run(concepts[0], 0.8)
    assert not np.allclose(base, run(concepts[0], 0.0), atol=1e-4)
    assert not np.allclose(base, run(concepts[1], 0.8), atol=1e-4)


def test_several_concepts_in_one_prompt(pipe: ElitePipeline, concepts: list[ConceptEmbedding]) -> None:
    prompt = "a photo of S1 next to S2"
    binding = {"S1": concepts[0], "S2": concepts[1]}
    bound_prompts, bindings = pipe._bind(prompt, binding, "S")
    _, slots = encode_prompts(
        pipe.text_encoder, pipe.tokenizer, bound_prompts,
        [{k: v.primary_word[None] for k, v in b.items()} for b in bindings])
    injection = pipe._local_injection(bindings, slots, 0.8, "per_sample", first_row=1)
    assert [p for p, _ in slots[0]] == ["S1", "S2"]
    assert injection.rows.tolist() == [1]
    assert torch.equal(injection.local_tokens[0, 0], concepts[0].local_tokens)
    assert torch.equal(injection.local_tokens[0, 1], concepts[1].local_tokens)
    assert injection.placeholder_index[0].tolist() == [pos for _, pos in slots[0]]
    image = pipe(prompt, binding, seed=3, output_type="np", **SMALL).images[0]
    swapped = pipe(prompt, {"S1": concepts[1], "S2": concepts[0]}, seed=3, output_type="np", **SMALL).images[0]
    assert not np.allclose(image, swapped, atol=1e-4)
    # each concept in a batch row of its own and the two-concept row together: batch-invariant still
    mixed = pipe([prompt, "a photo of S"], [binding, concepts[2]], seed=[3, 4], output_type="np", **SMALL).images
    np.testing.assert_allclose(mixed[0], image, atol=1e-4, rtol=0)


def test_schedulers_outputs_and_no_guidance(pipe: ElitePipeline, concepts: list[ConceptEmbedding]) -> None:
    lms = pipe("a photo of S", concepts[0], seed=1, output_type="np", **SMALL).images
    for cls in (DDIMScheduler, EulerAncestralDiscreteScheduler):
        other = pipe("a photo of S", concepts[0], seed=1, output_type="np",
                     scheduler=cls.from_config(pipe.scheduler.config), **SMALL).images
        assert other.shape == lms.shape and not np.allclose(other, lms)
    ancestral = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    twice = [pipe("a photo of S", concepts[0], seed=1, output_type="np", scheduler=ancestral, **SMALL).images
             for _ in range(2)]
    np.testing.assert_array_equal(*twice)  # stochastic samplers draw from the per-image generators
    pil = pipe("a photo of S", concepts[0], seed=1, **SMALL).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    pt = pipe("a photo of S", concepts[0], seed=1, output_type="pt", **SMALL).images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 64, 64)
    latent = pipe("a photo of S", concepts[0], seed=1, output_type="latent", **SMALL).images
    assert isinstance(latent, torch.Tensor) and latent.shape == (1, 4, 8, 8)
    plain = pipe("a photo of S", concepts[0], seed=1, guidance_scale=1.0, output_type="np", **SMALL).images
    assert plain.shape == (1, 64, 64, 3) and np.isfinite(plain).all()


def test_bad_calls_are_clear(pipe: ElitePipeline, concepts: list[ConceptEmbedding], tiny_models: TinyModels) -> None:
    with pytest.raises(InputError, match="does not contain the placeholder 'S'"):
        pipe("a photo of a dog", concepts[0], **SMALL)
    with pytest.raises(InputError, match="got 1 seeds for 2 images"):
        pipe(["a S", "b S"], concepts[0], seed=[1], **SMALL)
    with pytest.raises(InputError, match="got 2 prompts and 3 concepts"):
        pipe(["a S", "b S"], concepts[:3], **SMALL)
    alien = ConceptEmbedding("alien", torch.zeros(5, 768), torch.zeros(256, 768), torch.ones(16, 16))
    with pytest.raises(InputError, match=r"concept 'alien' has embeddings of width 768; .* takes 32"):
        pipe("a S", alien, **SMALL)
    with pytest.raises(InputError, match="multiple of 8"):
        pipe("a S", concepts[0], **{**SMALL, "height": 60})
    with pytest.raises(InputError, match="float16 needs a CUDA device"):
        ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                      tiny_models.local_mapper, torch_dtype=torch.float16)
    generate_only = ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                                  tiny_models.local_mapper)
    with pytest.raises(InputError, match="without a vision model"):
        generate_only.encode_concepts([Image.new("RGB", (8, 8))])
    out = generate_only("a photo of S", concepts[0], seed=1, output_type="np", **SMALL).images
    ref = pipe("a photo of S", concepts[0], seed=1, output_type="np", **SMALL).images
    np.testing.assert_array_equal(out, ref)


def test_bfloat16_on_cpu_is_close_to_float32(tiny_models: TinyModels, pipe: ElitePipeline,
                                             concepts: list[ConceptEmbedding]) -> None:
    bf16 = ElitePipeline.from_pretrained(tiny_models.pretrained_model, tiny_models.vision_model,
                                         tiny_models.global_mapper, tiny_models.local_mapper,
                                         torch_dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16
    low = bf16("a photo of S", concepts[0], seed=1, output_type="np", **SMALL).images
    ref = pipe("a photo of S", concepts[0], seed=1, output_type="np", **SMALL).images
    assert np.abs(low - ref).mean() < 0.05


def test_reference_scheduler_whatever_the_repo_says(tiny_models: TinyModels, pipe: ElitePipeline,
                                                    concepts: list[ConceptEmbedding]) -> None:
    repo_config = json.loads((tiny_models.pretrained_model / "scheduler" / "scheduler_config.json").read_text())
    assert repo_config["timestep_spacing"] == "leading"  # as current diffusers saves it
    from_repo = LMSDiscreteScheduler.from_pretrained(tiny_models.pretrained_model, subfolder="scheduler")
    from_repo.set_timesteps(3)
    assert from_repo.timesteps[0] == 667  # what reading the repo's config used to give
    assert isinstance(pipe.scheduler, LMSDiscreteScheduler)
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    copy = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    copy.set_timesteps(3)
    assert copy.timesteps.tolist() == [999.0, 499.5, 0.0]
    copy.set_timesteps(100)
    assert copy.timesteps[0] == 999 and copy.timesteps[-1] == 0
    seen: list[float] = []  # the timesteps the UNet is actually called with
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1])))
    try:
        pipe("a photo of S", concepts[0], seed=1, output_type="latent", **{**SMALL, "num_inference_steps": 3})
    finally:
        hook.remove()
    assert seen == [999.0, 499.5, 0.0]


def test_a_given_scheduler_is_used(tiny_models: TinyModels, pipe: ElitePipeline,
                                   concepts: list[ConceptEmbedding]) -> None:
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    other = ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                          tiny_models.local_mapper, scheduler=ddim)
    assert other.scheduler is ddim
    seen: list[float] = []
    hook = other.unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1])))
    try:
        out = other("a photo of S", concepts[0], seed=1, output_type="np", **SMALL).images
    finally:
        hook.remove()
    assert seen == [501.0, 1.0]  # DDIM's own "leading" spacing with steps_offset 1, not LMS's 999, 0
    same = pipe("a photo of S", concepts[0], seed=1, output_type="np", scheduler=ddim, **SMALL).images
    np.testing.assert_array_equal(out, same)
    with pytest.raises(InputError, match="scheduler must be a diffusers scheduler, got a dict"):
        ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                      tiny_models.local_mapper, scheduler={"name": "lms"})


def test_device_and_dtype_arguments(tiny_models: TinyModels) -> None:
    auto = ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                         tiny_models.local_mapper, device="auto", torch_dtype="auto")
    gpu = torch.cuda.is_available()
    assert auto.device == torch.device("cuda:0" if gpu else "cpu")
    assert auto.dtype == (torch.float16 if gpu else torch.float32)
    named = ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                          tiny_models.local_mapper, device="cpu", torch_dtype="bfloat16")
    assert named.dtype == torch.bfloat16 and next(named.global_mapper.parameters()).dtype == torch.bfloat16
    with pytest.raises(InputError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"):
        ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                      tiny_models.local_mapper, device="gpu0")
    with pytest.raises(InputError, match="dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got 'fp8'"):
        ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                      tiny_models.local_mapper, torch_dtype="fp8")


def test_a_compiled_channels_last_unet_gives_the_same_images_and_compiles_once(
        tiny_models: TinyModels, pipe: ElitePipeline, concepts: list[ConceptEmbedding]) -> None:
    """optimize(): the ELITE processors are installed once and each call hands them its concepts, so a second call
    with other concepts and prompts reuses the compiled graphs (torch.compile's eager backend: the same tracing as
    inductor, no C++ compiler needed)."""
    from torch._dynamo.utils import counters

    fast = ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                         tiny_models.local_mapper)
    fast.optimize(channels_last=True, compile_backend="eager")
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    calls = [("a photo of a S", concepts[:2], [0, 1]), ("a S on a table", [concepts[3], concepts[2]], [5, 6])]
    graphs = []
    for prompt, chosen, seeds in calls:
        got = fast(prompt, chosen, seed=seeds, output_type="np", **SMALL).images
        want = pipe(prompt, chosen, seed=seeds, output_type="np", **SMALL).images
        assert np.abs(got - want).max() < 1e-4
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0]  # the second call compiled nothing
    assert all(p.injection is None for p in fast._installed.values())  # type: ignore[union-attr]


def test_the_attention_processors_copy_nothing_per_step(tiny_models: TinyModels, concepts: list[ConceptEmbedding],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In a low dtype, where a tensor of the wrong dtype or device would be converted on every call: no copy op
    runs inside the ELITE processors (the injection is on the device, in the UNet's dtype, once per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from elite.model import attention

    copies: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            result = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket)
            if name in ("aten._to_copy", "aten.copy_") or (name == "aten.to" and result is not args[0]):
                copies.append(f"{func} {tuple(getattr(a, 'dtype', a) for a in args)}")  # a conversion, not a no-op
            return result

    calls = []
    original = attention.EliteAttnProcessor.__call__

    def watched(self: attention.EliteAttnProcessor, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        with Watch():
            return original(self, *args, **kwargs)

    monkeypatch.setattr(attention.EliteAttnProcessor, "__call__", watched)
    bf16 = ElitePipeline.from_pretrained(tiny_models.pretrained_model, None, tiny_models.global_mapper,
                                         tiny_models.local_mapper, torch_dtype=torch.bfloat16)
    bf16("a photo of a S", concepts[:2], seed=[0, 1], output_type="latent", **SMALL)
    assert len(calls) == 2 * len(bf16.global_mapper.config.cross_attention_layers)  # every layer, every step
    assert copies == []
