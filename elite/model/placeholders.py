"""The placeholder rule, shared by prompt encoding (elite.model.text) and prompt files (elite.data.prompts).

Kept free of torch and transformers so planning prompts does not load the models' libraries.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from elite.errors import InputError


def placeholder_pattern(placeholders: Sequence[str]) -> re.Pattern[str]:
    """Whole-word, case-sensitive occurrences of any placeholder, longest first ("S1" before "S").

    Matching the text, not the token ids, keeps "S" from matching the tail of a word that BPE splits
    (e.g. "xyzs" -> "xyz", "s</w>") or the "s" of "it's"; positions still come from the tokenizer.
    """
    for placeholder in placeholders:
        if not placeholder.strip() or placeholder != placeholder.strip():
            raise InputError(f"placeholder {placeholder!r} is empty or has surrounding spaces")
    alternatives = [re.escape(p) for p in sorted(placeholders, key=len, reverse=True)]
    return re.compile(rf"(?<![\w'])(?:{'|'.join(alternatives)})(?!\w)")
