"""`tropd prepare` on local files, folders and a (stubbed) hub dataset: normalisation, chat template,
filters, split, manifest, dry run, and the one-line errors, through the real command line."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tropd_cli import cli
from tropd_cli.config import load_config
from tropd_cli.evaluation.registry import get_benchmark, load_problems
from tropd_cli.toylab.accuracy import chat_prompt_ids

FIXTURES = Path(__file__).parent / "fixtures"
# prompts.* hold 5 records: one empty prompt and one exact duplicate, so 3 unique prompts remain.
COUNTS = {"read": 5, "non_empty": 4, "within_max_prompt_tokens": 4, "deduplicated": 3, "train": 3, "eval": 0}
# Random(0).shuffle([0, 1, 2]) == [0, 2, 1]: the first, third and second unique prompts.
TRAIN_ORDER = [("compute 12+7", "19"), ("compute 5+5+5", "15"), ("compute 30-4+2", "28")]


def run(data, out, *args: str, sets: tuple[str, ...] = ()) -> int:
    argv = ["prepare", "--preset", "toylab", "--data", str(data), *args]
    if out is not None:
        argv += ["--out", str(out)]
    for setting in sets:
        argv += ["--set", setting]
    return cli.main(argv)


def rows(out: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").split("\n") if line]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def error_of(capsys) -> str:
    return capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in (FIXTURES / "prompts.jsonl").read_text().splitlines() if line]
    path = tmp_path_factory.mktemp("parquet") / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.json", "prompts.csv", "parquet", "folder"])
def test_every_format_gives_the_same_prompts(name, parquet_file, toy_tokenizer, tmp_path):
    data = parquet_file if name == "parquet" else FIXTURES / name
    out = tmp_path / "prepared"
    assert run(data, out) == 0
    found = manifest(out)
    assert found["counts"] == COUNTS
    assert found["source"]["kind"] == ("folder" if name == "folder" else "file")
    assert found["source"]["fields"] == {"prompt": "prompt", "messages": None, "answer": "answer"}
    train = rows(out)
    expected = {(prompt, answer) for prompt, answer in TRAIN_ORDER}
    assert {(row["prompt"], row["answer"]) for row in train} == expected
    for row in train:
        assert row["prompt_ids"] == chat_prompt_ids(toy_tokenizer, row["prompt"])
        assert row["id"] == hashlib.sha256(row["prompt_text"].encode()).hexdigest()[:16]
    assert rows(out, "eval") == []
    if name == "folder":  # files in relative-path order; the first copy of the duplicate is the CSV's
        assert found["source"]["files"] == ["nested/part-2.csv", "part-1.jsonl"]
        assert [row["source"] for row in train] == ["nested/part-2.csv", "part-1.jsonl", "nested/part-2.csv"]
    else:
        assert [(row["prompt"], row["answer"]) for row in train] == TRAIN_ORDER


def test_a_jsonl_row_is_normalised_exactly(tmp_path):
    out = tmp_path / "prepared"
    assert run(FIXTURES / "prompts.jsonl", out) == 0
    text = "<|im_start|>user\ncompute 12+7<|im_end|>\n<|im_start|>assistant\n"
    assert rows(out)[0] == {
        "id": hashlib.sha256(text.encode()).hexdigest()[:16], "prompt": "compute 12+7", "answer": "19",
        "source": "prompts.jsonl", "meta": {"row": 1, "source_id": "a"}, "prompt_text": text,
        # <|im_start|> user \n compute " " 12 + 7 <|im_end|> \n <|im_start|> assistant \n
        "prompt_ids": [2, 1005, 1036, 1007, 1035, 16, 1025, 11, 1, 1036, 2, 1006, 1036],
    }
    found = manifest(out)
    assert list(found) == ["format", "format_version", "tropd_version", "fingerprint", "source", "tokenizer",
                           "settings", "counts", "prompt_tokens", "files"]
    assert found["tokenizer"]["name"] == "toylab:student" and len(found["tokenizer"]["sha256"]) == 64
    assert found["source"]["fingerprint"] == hashlib.sha256(
        f"prompts.jsonl\n{hashlib.sha256((FIXTURES / 'prompts.jsonl').read_bytes()).hexdigest()}\n".encode()
    ).hexdigest()
    files = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("train.jsonl", "eval.jsonl")}
    assert found["files"] == files
    assert found["fingerprint"] == hashlib.sha256(
        f"train.jsonl {files['train.jsonl']}\neval.jsonl {files['eval.jsonl']}\n".encode()).hexdigest()
    assert found["prompt_tokens"] == {"max": 15, "mean": 14.33}  # 13, 15 and 15 tokens


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    out = tmp_path / "prepared"
    assert run(FIXTURES / "prompts.jsonl", out, sets=("data.eval_fraction=0.34",)) == 0
    # round(3 * 0.34) = 1 held out: the first of the shuffled order [0, 2, 1], i.e. "compute 12+7".
    assert [row["prompt"] for row in rows(out, "eval")] == ["compute 12+7"]
    assert [row["prompt"] for row in rows(out)] == ["compute 5+5+5", "compute 30-4+2"]
    assert manifest(out)["counts"] == {**COUNTS, "train": 2, "eval": 1}
    other = tmp_path / "seed-1"
    assert run(FIXTURES / "prompts.jsonl", other, sets=("data.eval_fraction=0.34", "data.seed=1")) == 0
    # Random(1).shuffle([0, 1, 2]) == [1, 2, 0]: "compute 30-4+2" is held out.
    assert [row["prompt"] for row in rows(other, "eval")] == ["compute 30-4+2"]


def test_malformed_jsonl_line_names_file_and_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "prepared"
    data = FIXTURES / "malformed.jsonl"
    assert run(data, out) == 2
    assert error_of(capsys) == f"error: {data}:3: not valid JSON (Expecting ',' delimiter)"
    assert not out.exists()


def test_malformed_json_array_names_its_line(tmp_path, capsys):
    data = tmp_path / "broken.json"
    data.write_text('[\n  {"prompt": "compute 1+1"}\n  {"prompt": "compute 2+2"}\n]\n')
    assert run(data, tmp_path / "out") == 2
    assert error_of(capsys) == f"error: {data}:3: not valid JSON (Expecting ',' delimiter)"


def test_json_lines_saved_as_json_are_read_as_lines(tmp_path):
    data = tmp_path / "lines.json"
    data.write_text('{"prompt": "compute 1+1"}\n{"prompt": "compute 2+2"}\n')
    assert run(data, tmp_path / "out") == 0
    assert manifest(tmp_path / "out")["counts"]["read"] == 2


def test_a_missing_prompt_field_names_the_field_and_the_fields_that_exist(tmp_path, capsys):
    data = FIXTURES / "prompts.jsonl"
    assert run(data, tmp_path / "out", "--prompt-field", "question") == 2
    assert error_of(capsys) == (f"error: {data}:1: missing field 'question'; the record has: id, prompt, answer "
                                f"(choose another with --prompt-field)")
    assert not (tmp_path / "out").exists()


def test_without_a_prompt_or_messages_field_the_first_record_says_what_it_has(tmp_path, capsys):
    data = FIXTURES / "questions.jsonl"
    assert run(data, tmp_path / "out") == 2
    assert error_of(capsys) == (f"error: {data}:1: missing field 'prompt'; the record has: question, solution, "
                                f"level (choose one with --prompt-field or --messages-field)")


def test_mapped_fields_and_a_missing_named_answer(tmp_path, capsys):
    data = FIXTURES / "questions.jsonl"
    assert run(data, tmp_path / "out", "--prompt-field", "question", "--answer-field", "solution") == 2
    assert error_of(capsys) == (f"error: {data}:3: missing field 'solution'; the record has: question, level "
                                f"(choose another with --answer-field)")
    # Without --answer-field the answer is optional: 'answer' is not a field here, so no row has one.
    assert run(data, tmp_path / "out", "--prompt-field", "question") == 0
    assert [sorted(row) for row in rows(tmp_path / "out")][0] == ["id", "meta", "prompt", "prompt_ids",
                                                                  "prompt_text", "source"]


def test_an_empty_result_after_filtering_gives_the_counts(tmp_path, capsys):
    data = FIXTURES / "prompts.jsonl"
    assert run(data, tmp_path / "out", sets=("data.max_prompt_tokens=12",)) == 2
    assert error_of(capsys) == (f"error: no training prompts left from {data} (5 read, 4 non-empty, 0 within 12 "
                                f"prompt tokens, 0 unique, 0 train, 0 eval); every prompt is too long; raise "
                                f"data.max_prompt_tokens")
    assert not (tmp_path / "out").exists()


def test_very_long_prompts_are_dropped_by_the_length_filter(tmp_path):
    data = tmp_path / "long.jsonl"
    long_prompt = "compute " + "+".join(["1"] * 3000)  # 5,999 tokens + 10 of the template
    data.write_text(json.dumps({"prompt": long_prompt}) + "\n" + json.dumps({"prompt": "compute 1+1"}) + "\n")
    assert run(data, tmp_path / "out") == 0
    assert manifest(tmp_path / "out")["counts"] == {"read": 2, "non_empty": 2, "within_max_prompt_tokens": 1,
                                                    "deduplicated": 1, "train": 1, "eval": 0}
    assert run(data, tmp_path / "all", sets=("data.max_prompt_tokens=6009",)) == 0
    assert manifest(tmp_path / "all")["prompt_tokens"]["max"] == 6009


def test_unicode_prompts_round_trip_exactly(tmp_path):
    out = tmp_path / "out"
    assert run(FIXTURES / "unicode.jsonl", out) == 0
    prompts = {row["prompt"] for row in rows(out)}
    assert prompts == {"calcule 12+7 — résultat ? ✓", "计算 3+4", "compute 1+1 🙂"}
    assert "计算 3+4" in (out / "train.jsonl").read_text(encoding="utf-8")  # stored as text, not \u escapes


def test_conversations_are_cut_after_the_last_user_turn_and_get_the_system_prompt(tmp_path):
    out = tmp_path / "out"
    assert run(FIXTURES / "chat.jsonl", out, "--messages-field", "conversation", "--system-prompt",
               "You are careful.", sets=("data.eval_fraction=0",)) == 0
    by_answer = {row["answer"]: row for row in rows(out)}
    first, second = by_answer["7"], by_answer["9"]
    assert first["messages"] == [{"role": "system", "content": "You are a careful calculator."},
                                 {"role": "user", "content": "compute 3+4"}]
    assert first["prompt_text"] == ("<|im_start|>system\nYou are a careful calculator.<|im_end|>\n"
                                    "<|im_start|>user\ncompute 3+4<|im_end|>\n<|im_start|>assistant\n")
    assert second["messages"] == [{"role": "user", "content": "compute 10-1"}]
    assert second["prompt_text"] == ("<|im_start|>system\nYou are careful.<|im_end|>\n"
                                     "<|im_start|>user\ncompute 10-1<|im_end|>\n<|im_start|>assistant\n")
    assert manifest(out)["settings"]["system_prompt"] == "You are careful."


def test_conversations_in_csv_cells_and_bad_conversations(tmp_path, capsys):
    data = tmp_path / "chat.csv"
    data.write_text('messages,answer\n"[{""role"": ""user"", ""content"": ""compute 1+1""}]",2\n'
                    '"[{""role"": ""assistant"", ""content"": ""2""}]",2\n')
    assert run(data, tmp_path / "out") == 2
    assert error_of(capsys) == f"error: {data}:3: field 'messages' has no user turn"


def test_thinking_reaches_templates_that_read_it(tmp_path):
    from tropd_cli.toylab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %} think{% endif %}")
    tokenizer.save_pretrained(tmp_path / "student")
    student = f"student.model={tmp_path / 'student'}"
    for thinking, suffix in (("null", ""), ("false", " think"), ("true", "")):
        out = tmp_path / f"out-{thinking}"
        assert run(FIXTURES / "prompts.jsonl", out, sets=(student, f"data.thinking={thinking}")) == 0
        assert rows(out)[0]["prompt_text"] == "compute 12+7" + suffix
        assert manifest(out)["tokenizer"]["reads_thinking"] is True


def test_dry_run_prints_counts_and_rows_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(FIXTURES / "prompts.jsonl", out, "--dry-run", "--teacher-drafts") == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "unique" in printed and "compute 5+5+5" in printed
    assert f"dry run: would write {out}/train.jsonl (3 prompts), {out}/eval.jsonl (0) and {out}/manifest.json; " \
           "nothing was written" in printed.replace("\n", "")
    assert "would generate 3 teacher drafts in 1 shards with toylab:teacher" in printed.replace("\n", "")
    assert run(FIXTURES / "prompts.jsonl", None, "--dry-run") == 0  # --out is optional when only looking


def test_out_is_required_unless_dry_run(capsys):
    assert run(FIXTURES / "prompts.jsonl", None) == 2
    assert error_of(capsys) == "error: pass --out DIR for the prepared folder (or --dry-run to only look)"


def test_preparing_twice_is_byte_identical(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert run(FIXTURES / "folder", out, sets=("data.eval_fraction=0.34",)) == 0
    assert sorted(p.name for p in first.iterdir()) == [".tropd.json", ".tropd.lock", "eval.jsonl", "manifest.json",
                                                      "train.jsonl"]
    first_files = {p.name: p.read_bytes() for p in first.iterdir() if not p.name.startswith(".")}
    assert first_files == {p.name: p.read_bytes() for p in second.iterdir() if not p.name.startswith(".")}
    for name in ("eval.jsonl", "manifest.json", "train.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    before = (first / "manifest.json").read_bytes()
    assert run(FIXTURES / "folder", first, "--overwrite", sets=("data.eval_fraction=0.34",)) == 0
    assert (first / "manifest.json").read_bytes() == before


def test_a_non_empty_out_needs_overwrite_unless_it_holds_the_same_prompts(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(FIXTURES / "prompts.jsonl", out) == 0
    assert run(FIXTURES / "prompts.jsonl", out) == 0  # same prompts: nothing to do
    assert "already holds these prompts" in capsys.readouterr().out
    assert run(FIXTURES / "prompts.csv", out) == 2
    assert error_of(capsys) == f"error: output folder {out} is not empty; choose another --out or pass --overwrite"
    assert run(FIXTURES / "prompts.csv", out, "--overwrite") == 0
    assert manifest(out)["source"]["files"] == ["prompts.csv"]


@pytest.mark.parametrize(("data", "args", "message"), [
    ("missing.jsonl", (), "data file or folder {data} does not exist"),
    ("./nowhere", (), "data file or folder {data} does not exist"),
    ("notes.txt", (), "{data}: unsupported file type '.txt'; use .jsonl, .json, .csv or .parquet"),
    ("empty-folder", (), "folder {data} holds no .jsonl, .json, .csv or .parquet files"),
    ("prompts.jsonl", ("--split", "test"), "--split and --subset choose part of a hub dataset; {data} is a local "
                                           "file"),
    ("toylab", ("--split", "test"), "--split and --subset choose part of a hub dataset; toylab generates its "
                                    "prompts"),
    ("prompts.jsonl", ("--prompt-field", "prompt", "--messages-field", "m"),
     "--prompt-field and --messages-field exclude each other; pass one of them"),
])
def test_source_errors_are_one_line(data, args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(FIXTURES / "prompts.jsonl", "prompts.jsonl")
    Path("notes.txt").write_text("hello\n")
    Path("empty-folder").mkdir()
    assert run(data, tmp_path / "out", *args) == 2
    assert error_of(capsys) == "error: " + message.format(data=data)


def test_hub_datasets_load_through_datasets(tmp_path, capsys, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        if name == "owner/missing":
            raise FileNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub\nmore detail")
        return datasets.Dataset.from_list([{"problem": "compute 2+3", "solution": "5"},
                                           {"problem": "compute 7-1", "solution": "6"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "out"
    assert run("owner/math", out, "--subset", "easy", "--split", "test", "--prompt-field", "problem",
               "--answer-field", "solution") == 0
    assert calls == [("owner/math", "easy", "test")]
    found = manifest(out)
    assert found["source"]["kind"] == "hub" and found["source"]["split"] == "test"
    assert {row["source"] for row in rows(out)} == {"owner/math"}
    assert sorted(row["answer"] for row in rows(out)) == ["5", "6"]
    assert run("owner/missing", tmp_path / "other") == 2
    assert error_of(capsys) == ("error: cannot load hub owner/missing split train: Dataset 'owner/missing' doesn't "
                                "exist on the Hub; pass a local file or folder with --data")


def test_data_prompts_is_toylab_or_a_prepared_folder(tmp_path, capsys):
    """Presets may name a folder not prepared yet; doctor and distill refuse it in one line."""
    assert load_config("toylab").data.prompts == "toylab"
    assert load_config("toylab", ["data.prompts=Runs/Nope"]).data.prompts == "Runs/Nope"
    out = tmp_path / "prepared"
    assert run(FIXTURES / "prompts.jsonl", out) == 0
    assert load_config("toylab", [f"data.prompts={out}"]).data.prompts == str(out)
    assert cli.main(["doctor", "-p", "toylab", "--set", "data.prompts=Runs/Nope"]) == 2
    assert error_of(capsys) == "error: Runs/Nope is not a folder written by `tropd prepare` (no manifest.json)"
    assert cli.main(["distill", "-p", "toylab", "--set", f"data.prompts={tmp_path}", "--out", str(tmp_path / "r")]) == 2
    assert error_of(capsys) == f"error: {tmp_path} is not a folder written by `tropd prepare` (no manifest.json)"
    assert not (tmp_path / "r").exists()


def test_evaluate_reads_the_eval_split_as_a_custom_benchmark(tmp_path):
    out = tmp_path / "prepared"
    assert run(FIXTURES / "prompts.jsonl", out, sets=("data.eval_fraction=0.67",)) == 0
    problems = load_problems(get_benchmark("custom"), out / "eval.jsonl", seed=0, limit=None).problems
    assert [(p.question, p.answer) for p in problems] == [("compute 12+7", "19"), ("compute 5+5+5", "15")]


def test_max_train_prompts_keeps_a_prefix_of_the_seeded_order(tmp_path):
    full, capped = tmp_path / "full", tmp_path / "capped"
    assert run(FIXTURES / "prompts.jsonl", full) == 0
    assert run(FIXTURES / "prompts.jsonl", capped, sets=("data.max_train_prompts=2",)) == 0
    assert rows(capped) == rows(full)[:2]
    written = manifest(capped)
    assert written["counts"]["train"] == 2 and written["settings"]["max_train_prompts"] == 2


def test_a_line_separator_inside_a_prompt_round_trips(tmp_path):
    """JSON Lines end at \\n only: U+2028, written raw with ensure_ascii=False, stays inside its line."""
    source = tmp_path / "q.jsonl"
    source.write_text(json.dumps({"prompt": "compute 1+1\u2028please", "answer": "2"}) + "\n", encoding="utf-8")
    out = tmp_path / "prepared"
    assert run(source, out, sets=("data.eval_fraction=0",)) == 0
    assert "\u2028" in (out / "train.jsonl").read_text(encoding="utf-8")
    assert [row["prompt"] for row in rows(out)] == ["compute 1+1\u2028please"]
