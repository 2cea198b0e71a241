"""The toy lab's tokenizer: whole numbers, a few words and symbols, and a Qwen-style chat template.

Built with the `tokenizers` library (a word-level model over a fixed vocabulary) and wrapped as a
transformers fast tokenizer, so everything downstream (AutoTokenizer, apply_chat_template, decode,
padding) runs the same code as with a real model. Whole numbers are single tokens: tiny models then
learn arithmetic facts instead of carry logic, which keeps the lab trainable on two CPU cores.
Text round-trips exactly: the pre-tokenizer isolates every number, word, symbol and whitespace
character, and the decoder concatenates.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

MAX_NUMBER = 999
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, "<|im_start|>", UNK_TOKEN]
WORDS = [
    "system", "user", "assistant", "compute", "answer", "step", "by", "You", "are", "a", "careful",
    "calculator", "Solve", "it", "and", "end", "with", "the", "think", "result", "is",
]
SYMBOLS = ["+", "-", "*", "=", ":", "?", ".", ",", "(", ")", " ", "\n"]

# Qwen-style: <|im_start|>role\ncontent<|im_end|>\n ... then <|im_start|>assistant\n to generate.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """The ordered vocabulary: special tokens first, then numbers, words and symbols."""
    return SPECIAL_TOKENS + [str(n) for n in range(MAX_NUMBER + 1)] + WORDS + SYMBOLS


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the toy tokenizer in memory."""
    vocab = {token: index for index, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\d+|[A-Za-z]+|\s|[^\sA-Za-z\d]"), behavior="isolated"
    )
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="left",
    )
    return tokenizer


def save_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer and write it in `save_pretrained` format to `path`."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(path))
    return tokenizer
