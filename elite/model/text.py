"""Placeholder lookup through the tokenizer and word injection into the CLIP text encoder.

The placeholder (reference: `S`) is found as a whole word in the prompt and its position counted
in tokens by the tokenizer (the release counted words, which breaks for words of several tokens),
so multi-token placeholders, punctuation ("S," "S.") and several placeholders per prompt all
resolve to the right positions.
Each occurrence becomes a slot of `num_words` positions (1 at inference: w0; 5 in training, later
tokens shift right and the sequence is cut at the context length, as the method doc describes).
The words are written by a forward hook on the token embedding, before position embeddings are
added: transformers 5's `CLIPTextModel` takes no `inputs_embeds`, and a hook keeps gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from elite.errors import InputError
from elite.model.placeholders import placeholder_pattern


@dataclass(frozen=True)
class PromptSlots:
    input_ids: list[int]  # (context_length,) with one position per injected word at each slot
    slots: list[tuple[str, int]]  # (placeholder, first position) of every occurrence, in prompt order


def tokenize_with_placeholders(tokenizer: PreTrainedTokenizerBase, prompt: str, placeholders: Sequence[str],
                               num_words: int = 1, truncate: bool = False) -> PromptSlots:
    """Token ids of `prompt` with each placeholder occurrence as a slot of `num_words` positions.

    The text between placeholders is tokenized piece by piece; CLIP's pre-tokenizer splits at those
    boundaries anyway, so the ids equal those of the whole prompt, whatever a placeholder tokenizes to.
    """
    ids_out: list[int] = [tokenizer.bos_token_id]
    slots: list[tuple[str, int]] = []
    end = 0
    for match in placeholder_pattern(placeholders).finditer(prompt):
        ids_out += tokenizer(prompt[end:match.start()], add_special_tokens=False).input_ids
        slots.append((match.group(0), len(ids_out)))
        ids_out += tokenizer(match.group(0), add_special_tokens=False).input_ids[:1] * num_words  # overwritten
        end = match.end()
    ids_out += tokenizer(prompt[end:], add_special_tokens=False).input_ids
    ids_out.append(tokenizer.eos_token_id)
    for placeholder in placeholders:
        if all(found != placeholder for found, _ in slots):
            raise InputError(f"prompt {prompt!r} does not contain the placeholder {placeholder!r}")
    limit = tokenizer.model_max_length
    if len(ids_out) > limit:
        if not truncate:
            raise InputError(f"prompt {prompt!r} is {len(ids_out)} tokens with the injected words; "
                             f"the text encoder takes at most {limit}")
        ids_out = ids_out[:limit]
        if any(pos + num_words > limit for _, pos in slots):
            raise InputError(f"prompt {prompt!r}: a placeholder falls beyond token {limit} and would be cut")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PromptSlots(ids_out + [pad] * (limit - len(ids_out)), slots)


@contextlib.contextmanager
def injected_words(text_encoder: CLIPTextModel, rows: torch.Tensor, positions: torch.Tensor,
                   words: torch.Tensor) -> Iterator[None]:
    """While active, token embeddings at (rows[n], positions[n]) are replaced by words[n]."""
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        # out-of-place so gradients flow into `words`; (batch, tokens, dim)
        return output.index_put((rows.to(output.device), positions.to(output.device)), words.to(output))

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   bindings: Sequence[Mapping[str, torch.Tensor]], truncate: bool = False,
                   ) -> tuple[torch.Tensor, list[list[tuple[str, int]]]]:
    """Encode prompts with concept words injected at their placeholders.

    `bindings[b]` maps each placeholder of prompt b to its words, shape (num_words, text_dim): w0 alone
    at inference, all five in training. Returns hidden states (batch, context, text_dim) and the slots.
    """
    if len(prompts) != len(bindings):
        raise InputError(f"got {len(prompts)} prompts and {len(bindings)} concept bindings")
    device = text_encoder.device
    all_ids: list[list[int]] = []
    all_slots: list[list[tuple[str, int]]] = []
    rows: list[int] = []
    positions: list[int] = []
    words: list[torch.Tensor] = []
    for row, (prompt, binding) in enumerate(zip(prompts, bindings, strict=True)):
        num_words = {w.shape[0] for w in binding.values()}
        if len(num_words) != 1:
            raise InputError(f"prompt {prompt!r}: every concept must inject the same number of words")
        (count,) = num_words
        tokens = tokenize_with_placeholders(tokenizer, prompt, list(binding), count, truncate)
        all_ids.append(tokens.input_ids)
        all_slots.append(tokens.slots)
        for placeholder, start in tokens.slots:
            rows.extend([row] * count)
            positions.extend(range(start, start + count))
            words.append(binding[placeholder])
    input_ids = torch.tensor(all_ids, device=device)  # (batch, context)
    word_tensor = torch.cat(words, dim=0)  # (injected positions, text_dim)
    with injected_words(text_encoder, torch.tensor(rows), torch.tensor(positions), word_tensor):
        hidden = text_encoder(input_ids=input_ids).last_hidden_state  # (batch, context, text_dim)
    return hidden, all_slots
