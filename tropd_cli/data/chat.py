"""Chat encoding: one user message in a tokenizer's chat template, as token ids ending with the assistant header.

`tropd evaluate`, `tropd export`'s verification and the toy lab all format prompts this one way, so that
a model sees the same prompt whichever of them asks it.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, content: str, **template_kwargs: Any) -> list[int]:
    """One user message in the tokenizer's chat template, ending with the assistant header; the plain
    text, tokenized as the tokenizer does by default, when it has no template.

    `template_kwargs` reach the template (e.g. `enable_thinking`); templates ignore unknown ones.
    """
    if not tokenizer.chat_template:
        return list(tokenizer(content)["input_ids"])
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, **template_kwargs
    )
    return list(encoded["input_ids"])
