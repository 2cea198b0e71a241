"""The toy tokenizer: exact round trips, special tokens, chat template, AutoTokenizer loading."""

from transformers import AutoTokenizer

from tropd_cli.toylab.tasks import Difficulty, sample_problems


def test_task_text_round_trips_exactly(toy_tokenizer):
    for problem in sample_problems(0, 50, Difficulty(), held_out=False):
        for text in (problem.prompt, problem.solution):
            ids = toy_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert toy_tokenizer.unk_token_id not in ids
            assert toy_tokenizer.decode(ids) == text


def test_numbers_are_single_tokens(toy_tokenizer):
    assert toy_tokenizer.tokenize("37+8=45") == ["37", "+", "8", "=", "45"]
    assert toy_tokenizer("1000", add_special_tokens=False)["input_ids"] == [toy_tokenizer.unk_token_id]


def test_chat_template_matches_qwen_layout(toy_tokenizer):
    messages = [{"role": "user", "content": "compute 1+2"}]
    text = toy_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\ncompute 1+2<|im_end|>\n<|im_start|>assistant\n"
    encoded = toy_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert toy_tokenizer.decode(encoded["input_ids"]) == text


def test_save_and_load_with_auto_tokenizer(tmp_path, toy_tokenizer):
    toy_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == toy_tokenizer.get_vocab()
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert loaded.eos_token_id != loaded.pad_token_id
    assert loaded.chat_template == toy_tokenizer.chat_template
    assert loaded("12+7=19")["input_ids"] == toy_tokenizer("12+7=19")["input_ids"]
