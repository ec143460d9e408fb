from __future__ import annotations

import pytest
import torch

from elite.errors import InputError
from elite.model.pipeline import ElitePipeline
from elite.model.text import encode_prompts, tokenize_with_placeholders


def _ids(pipe: ElitePipeline, text: str) -> list[int]:
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def test_index_found_through_the_tokenizer(pipe: ElitePipeline) -> None:
    tok = pipe.tokenizer
    prefix = len(_ids(pipe, "a photo of"))
    for prompt in ("a photo of S", "a photo of S, on the beach", "a photo of S.", "a photo of S's hat"):
        slots = tokenize_with_placeholders(tok, prompt, ["S"]).slots
        assert slots == [("S", 1 + prefix)], prompt
    # "photo" is merged to one token in the tiny vocab, "sks" and "xyzzy" are not: counting words would be wrong
    assert len(_ids(pipe, "sks")) == 3
    slots = tokenize_with_placeholders(tok, "xyzzy sks on a table", ["sks"]).slots
    assert slots == [("sks", 1 + len(_ids(pipe, "xyzzy")))]


def test_no_false_matches_inside_words(pipe: ElitePipeline) -> None:
    # In the tiny vocab "xyzs" and "it's" end in the token "s</w>", the same id as the placeholder "S".
    assert _ids(pipe, "xyzs")[-1] == _ids(pipe, "S")[0]
    for prompt in ("a photo of S with xyzs", "it's S", "S1 and S"):
        slots = tokenize_with_placeholders(pipe.tokenizer, prompt, ["S"]).slots
        assert len(slots) == 1, prompt


def test_multi_token_placeholder_collapses_to_one_slot(pipe: ElitePipeline) -> None:
    tok = pipe.tokenizer
    out = tokenize_with_placeholders(tok, "a sks dog", ["sks"])
    plain = [tok.bos_token_id, *_ids(pipe, "a"), -1, *_ids(pipe, "dog"), tok.eos_token_id]
    (_, pos), = out.slots
    assert pos == 2
    assert out.input_ids[:pos] == plain[:pos] and out.input_ids[pos + 1: len(plain)] == plain[pos + 1:]
    assert len(out.input_ids) == tok.model_max_length


def test_several_placeholders_and_longest_match(pipe: ElitePipeline) -> None:
    out = tokenize_with_placeholders(pipe.tokenizer, "S1 next to S2 and S1", ["S1", "S2"])
    assert [p for p, _ in out.slots] == ["S1", "S2", "S1"]
    out = tokenize_with_placeholders(pipe.tokenizer, "S1 next to S", ["S", "S1"])
    assert [p for p, _ in out.slots] == ["S1", "S"]


def test_five_words_shift_later_tokens(pipe: ElitePipeline) -> None:
    one = tokenize_with_placeholders(pipe.tokenizer, "a photo of S on the beach", ["S"], num_words=1)
    five = tokenize_with_placeholders(pipe.tokenizer, "a photo of S on the beach", ["S"], num_words=5)
    (_, pos), = one.slots
    assert five.slots == one.slots
    assert five.input_ids[:pos] == one.input_ids[:pos]
    assert five.input_ids[pos + 5: pos + 5 + 8] == one.input_ids[pos + 1: pos + 1 + 8]


def test_prompt_errors(pipe: ElitePipeline) -> None:
    with pytest.raises(InputError, match=r"prompt 'a photo of a dog' does not contain the placeholder 'S'"):
        tokenize_with_placeholders(pipe.tokenizer, "a photo of a dog", ["S"])
    long_prompt = "a photo of S " + "with a dog " * 40
    with pytest.raises(InputError, match=r"tokens with the injected words; the text encoder takes at most 77"):
        tokenize_with_placeholders(pipe.tokenizer, long_prompt, ["S"])
    cut = tokenize_with_placeholders(pipe.tokenizer, long_prompt, ["S"], num_words=5, truncate=True)
    assert len(cut.input_ids) == 77
    with pytest.raises(InputError, match="empty or has surrounding spaces"):
        tokenize_with_placeholders(pipe.tokenizer, "a photo", [" "])


def test_injection_replaces_only_the_slot_and_keeps_gradients(pipe: ElitePipeline) -> None:
    dim = pipe.text_encoder.config.hidden_size
    words = torch.randn(2, 1, dim, requires_grad=True)
    prompts = ["a photo of S on the beach", "S, in the snow"]
    seen: list[torch.Tensor] = []  # token + position embeddings as the transformer received them
    # transformers 5 flattened `text_model` away; find the embeddings module either way
    embeddings = next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("embeddings"))
    handle = embeddings.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        with torch.enable_grad():
            hidden, slots = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts,
                                           [{"S": words[0]}, {"S": words[1]}])
            hidden.sum().backward()
    finally:
        handle.remove()
    assert hidden.shape == (2, 77, dim)
    assert words.grad is not None and (words.grad.abs().sum(dim=-1) > 0).all()
    ids = torch.tensor([tokenize_with_placeholders(pipe.tokenizer, p, ["S"]).input_ids for p in prompts])
    plain = pipe.text_encoder.get_input_embeddings()(ids).detach()
    received = seen[0] - embeddings.position_embedding.weight[:77].detach()  # (batch, 77, dim) token part
    expected = plain.clone()
    for row, ((_, pos),) in enumerate(slots):
        expected[row, pos] = words[row, 0].detach()
    torch.testing.assert_close(received, expected)
    # tokens before the slot see the same causal context: identical hidden states there
    with torch.no_grad():
        base = pipe.text_encoder(input_ids=ids).last_hidden_state
    for row, ((_, pos),) in enumerate(slots):
        torch.testing.assert_close(hidden[row, :pos].detach(), base[row, :pos])
        assert not torch.allclose(hidden[row, pos].detach(), base[row, pos])


def test_training_injects_all_five_words(pipe: ElitePipeline) -> None:
    dim = pipe.text_encoder.config.hidden_size
    words = torch.randn(5, dim, requires_grad=True)
    with torch.enable_grad():
        hidden, slots = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a photo of S on the beach"],
                                       [{"S": words}])
        hidden.sum().backward()
    (_, pos), = slots[0]
    assert hidden.shape == (1, 77, dim)
    assert words.grad is not None and (words.grad.abs().sum(dim=-1) > 0).all()  # every word reaches the output
    plain = tokenize_with_placeholders(pipe.tokenizer, "a photo of S on the beach", ["S"]).input_ids
    with torch.no_grad():
        base = pipe.text_encoder(input_ids=torch.tensor([plain])).last_hidden_state
    torch.testing.assert_close(hidden[0, :pos].detach(), base[0, :pos])
