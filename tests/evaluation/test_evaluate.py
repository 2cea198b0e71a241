"""`tropd evaluate` end to end on the toy models: side by side, every benchmark kind via --data, bad input."""

import json
import shutil
from pathlib import Path

import pytest

from tropd_cli import cli
from tropd_cli.models import load_causal_lm, load_tokenizer
from tropd_cli.toylab.accuracy import toy_accuracy
from tropd_cli.toylab.tasks import Difficulty, sample_problems

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_FIELDS = {"prompt", "answer", "response", "extracted", "correct"}


def read_samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_two_toy_models_side_by_side_match_toy_accuracy(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", "toylab:teacher", "--model", "toylab:student", "--benchmark", "toylab",
            "--limit", "24", "--out", str(out), "--markdown"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "toylab:teacher" in printed and "Δ toylab:student" in printed and "greedy" in printed
    report = json.loads((out / "report.json").read_text())
    protocol = report["protocol"]
    assert (protocol["k"], protocol["temperature"], protocol["top_p"], protocol["seed"]) == (1, 0.0, 1.0, 1234)
    entry = report["benchmarks"]["toylab"]
    assert entry["max_new_tokens"] == 48 and entry["problems"] == 24 and len(entry["fingerprint"]) == 16
    problems = sample_problems(1234, 24, Difficulty(), held_out=True)
    student = toy_accuracy(load_causal_lm("toylab:student", trainable=False), load_tokenizer("toylab:student"),
                           problems, max_new_tokens=48)
    assert entry["results"]["toylab:student"]["greedy"] == student.accuracy
    assert entry["results"]["toylab:teacher"]["greedy"] == 1.0  # the teacher solves every held-out problem
    samples = read_samples(out)
    assert len(samples) == 48 and SAMPLE_FIELDS <= set(samples[0])
    assert samples[0]["prompt"] == problems[0].prompt and samples[0]["answer"] == str(problems[0].answer)
    markdown = (out / "report.md").read_text()
    assert "| toylab | greedy | 100.0 ± 0.0 |" in markdown
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".tropd.json", ".tropd.lock"]


@pytest.mark.parametrize(("benchmark", "fixture", "graders"), [
    ("gsm8k", "gsm8k.jsonl", ["gsm8k"]),
    ("math500", "math500.jsonl", ["math"]),
    ("aime24", "aime24.jsonl", ["math"]),
    ("amc23", "amc23.jsonl", ["math"]),
    ("gpqa-diamond", "gpqa-diamond.jsonl", ["choice"]),
    ("custom", "custom.jsonl", ["choice", "math"]),
])
def test_benchmarks_from_local_copies_with_sampling(benchmark, fixture, graders, tmp_path):
    out = tmp_path / benchmark
    argv = ["evaluate", "-m", "toylab:student", "-b", benchmark, "--data", str(FIXTURES / fixture), "-k", "4",
            "--temperature", "1.0", "--top-p", "0.95", "--max-new-tokens", "6", "--greedy", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["k"] == 4 and report["protocol"]["top_p"] == 0.95
    entry = report["benchmarks"][benchmark]
    assert entry["graders"] == graders and entry["max_new_tokens"] == 6 and fixture in entry["source"]
    metrics = entry["results"]["toylab:student"]
    for name in ("avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "greedy", "avg@4_stderr"):
        assert name in metrics
    assert 0.0 <= metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"] <= 1.0
    samples = read_samples(out)
    assert len(samples) == entry["problems"] * 5  # 4 sampled + 1 greedy per problem
    assert all(SAMPLE_FIELDS <= set(sample) for sample in samples)


def test_run_folder_and_adapter_folder_are_models(random_pair_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    shutil.copytree(random_pair_dir / "student", run / "student")
    adapter = tmp_path / "adapter"
    base = load_causal_lm(str(random_pair_dir / "student"))
    get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(adapter)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "-m", str(run), "-m", str(adapter), "-b", "toylab", "--limit", "4",
                     "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["model"] == str(run / "student")
    assert report["models"][1]["adapter"] == str(adapter)
    assert report["models"][1]["model"] == str(random_pair_dir / "student")
    assert set(report["benchmarks"]["toylab"]["results"]) == {str(run), str(adapter)}


@pytest.mark.parametrize(("argv", "message"), [
    (["-b", "gsm9k"], "error: unknown benchmark 'gsm9k'; known benchmarks: gsm8k, math500, aime24"),
    (["-b", "custom", "--data", str(FIXTURES / "custom-malformed.jsonl")],
     f"error: {FIXTURES / 'custom-malformed.jsonl'}:2: not valid JSON"),
    (["-b", "custom"], "error: the custom benchmark reads a local file: pass --data PATH"),
    (["-b", "toylab", "-k", "4"], "error: greedy decoding (--temperature 0) gives one response per problem"),
    (["-b", "toylab", "-b", "gsm8k", "--data", "x.jsonl"], "error: --data is a copy of one benchmark"),
    (["-b", "gsm8k"], "error: cannot load hub openai/gsm8k (main) split test:"),
    (["-b", "toylab", "--backend", "tgi"], "error: --backend must be hf or vllm, got 'tgi'"),
    (["-b", "toylab", "--dtype", "fp8"], "error: --dtype must be auto, float32, bfloat16 or float16, got 'fp8'"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    assert cli.main(["evaluate", "-m", "toylab:student", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_model_folder_without_a_tokenizer(random_pair_dir, tmp_path, capsys):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(random_pair_dir / "student" / name, folder / name)
    assert cli.main(["evaluate", "-m", str(folder), "-b", "toylab", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: model folder '{folder}' has no tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known to be good


def test_missing_model_folder(tmp_path, capsys):
    assert cli.main(["evaluate", "-m", str(tmp_path / "nope"), "-b", "toylab", "--out", str(tmp_path / "o")]) == 2
    assert f"error: model folder '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err


def test_help_page(capsys):
    assert cli.main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--benchmark" in out and "(default: 1234)" in out


def test_responses_end_at_the_generation_config_eos_ids(tmp_path):
    """A chat model's end-of-turn token in generation_config.json ends evaluate's responses, as in distill."""
    from transformers import GenerationConfig

    from tropd_cli.engine.rollout import SamplingParams
    from tropd_cli.models import resolve_model_path
    from tropd_cli.toylab.accuracy import generate_texts, prompt_token_ids

    tokenizer = load_tokenizer("toylab:student")
    problem = sample_problems(1234, 1, Difficulty(), held_out=True)[0]
    rollouts, _ = generate_texts(load_causal_lm("toylab:student", trainable=False), tokenizer,
                                 [prompt_token_ids(tokenizer, problem)], 1, SamplingParams(48, 0.0, 1.0), 1234)
    response = rollouts.response_ids[0]
    end_of_turn = response[2]  # a token the student emits third, standing in for an end-of-turn token
    assert end_of_turn != tokenizer.eos_token_id and len(response) > 4
    folder = tmp_path / "chat-student"
    shutil.copytree(resolve_model_path("toylab:student"), folder)
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, end_of_turn]).save_pretrained(folder)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "-m", str(folder), "-b", "toylab", "--limit", "1", "--out", str(out)]) == 0
    sample = read_samples(out)[0]
    assert sample["finished"] is True
    assert sample["response"] == tokenizer.decode(response[:response.index(end_of_turn) + 1], skip_special_tokens=True)


def test_an_interrupted_evaluation_continues_where_it_stopped_and_equals_an_uninterrupted_one(tmp_path, capsys,
                                                                                            monkeypatch):
    """Ctrl-C after the teacher's three chunks: nothing in --out, the chunks in the journal; the same command again
    generates only the student's chunks (the teacher does not even load), and its report and samples equal an
    uninterrupted evaluation's; the journal is gone after."""
    from tropd_cli.evaluation import runner

    def argv(out):
        return ["evaluate", "-m", "toylab:teacher", "-m", "toylab:student", "-b", "toylab", "--limit", "24",
                "--batch-size", "8", "--out", str(out)]

    assert cli.main(argv(tmp_path / "whole")) == 0
    out, calls, loads = tmp_path / "cut", [], []
    real_generate, real_load = runner.generate_texts, runner.load_causal_lm

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_texts", generate)
    monkeypatch.setattr(runner, "load_causal_lm", lambda spec, *a, **k: loads.append(spec) or real_load(spec, *a, **k))
    capsys.readouterr()
    assert cli.main(argv(out)) == 130
    journal = tmp_path / ".cut.partial"
    assert capsys.readouterr().err.strip() == (f"stopped: interrupted; the responses generated so far are kept in "
                                              f"{journal}; run the same command again to continue")
    assert not out.exists() and len((journal / "samples.jsonl").read_text().splitlines()) == 3
    calls.clear(), loads.clear()
    assert cli.main(argv(out)) == 0
    assert "continuing an interrupted evaluation: 3 chunks of responses already generated" in capsys.readouterr().out
    assert len(calls) == 3 and loads == ["toylab:student"]
    whole, cut = (json.loads((folder / "report.json").read_text()) for folder in (tmp_path / "whole", out))
    for report in (whole, cut):
        for metrics in report["benchmarks"]["toylab"]["results"].values():
            assert metrics.pop("seconds") >= 0
    assert cut["benchmarks"] == whole["benchmarks"] and read_samples(out) == read_samples(tmp_path / "whole")
    assert cut["protocol"]["dtype"] == "float32" and cut["protocol"]["backend"] == "hf"  # --dtype auto on a CPU
    assert not journal.exists()


def test_a_journal_made_with_other_settings_is_replaced_with_one_line(tmp_path, capsys):
    argv = ["evaluate", "-m", "toylab:student", "-b", "toylab", "--limit", "8", "--out", str(tmp_path / "o")]
    journal = tmp_path / ".o.partial"
    journal.mkdir()
    (journal / "progress.json").write_text(json.dumps({"seed": 1}))
    (journal / "samples.jsonl").write_text(json.dumps({"model": "toylab:student", "benchmark": "toylab",
                                                       "pass": "greedy", "chunk": 0, "texts": ["answer: 0"] * 8,
                                                       "finished": [True] * 8, "tokens": 16}) + "\n")
    assert cli.main(argv) == 0
    assert f"an interrupted evaluation with other settings was in {journal}; starting over" in capsys.readouterr().out
    assert not any(sample["response"] == "answer: 0" for sample in read_samples(tmp_path / "o"))
    assert not journal.exists()


def test_a_second_evaluation_of_the_same_new_out_stops_at_once_naming_the_first(tmp_path, capsys):
    """Two evaluations writing one new --out would append their chunks to one journal: the journal folder is locked
    for an evaluation's life, and the second stops before any model loads, with the first's journal untouched."""
    import os

    from tropd_cli.evaluation.journal import journal_folder
    from tropd_cli.files import LOCK_INFO, FolderLock

    out = tmp_path / "o"
    journal = journal_folder(out)
    journal.mkdir()
    (journal / "samples.jsonl").write_text("the first evaluation's chunks\n")
    first = FolderLock(journal, "evaluate").acquire()  # another process's evaluation, running
    try:
        assert cli.main(["evaluate", "-m", "toylab:student", "-b", "toylab", "--limit", "8", "--out", str(out)]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith(f"error: {journal} is in use by another tropd process (pid "
                                                      f"{os.getpid()} on "), line
        assert line.endswith("; wait for it to end or stop it") and "`tropd evaluate` since" in line
        assert (journal / "samples.jsonl").read_text() == "the first evaluation's chunks\n" and not out.exists()
    finally:
        first.release()
    shutil.rmtree(journal)
    assert cli.main(["evaluate", "-m", "toylab:student", "-b", "toylab", "--limit", "8", "--out", str(out)]) == 0
    assert not journal.exists() and not (tmp_path / LOCK_INFO).exists()


def test_a_journal_line_cut_short_is_dropped_and_the_next_chunk_starts_its_own_line(tmp_path, capsys, monkeypatch):
    """A crash inside a chunk's line: that chunk is generated again, the file is cut back to its last whole line,
    and a second interruption later still finds every chunk it wrote."""
    from tropd_cli.evaluation import journal as journal_module
    from tropd_cli.evaluation import runner

    argv = ["evaluate", "-m", "toylab:student", "-b", "toylab", "--limit", "24", "--batch-size", "8",
            "--out", str(tmp_path / "o")]
    real_generate, calls = runner.generate_texts, []

    def stop_at(count):
        def generate(*args, **kwargs):
            calls.append(1)
            if len(calls) == count:
                raise KeyboardInterrupt
            return real_generate(*args, **kwargs)
        return generate

    monkeypatch.setattr(runner, "generate_texts", stop_at(2))
    assert cli.main(argv) == 130
    samples = tmp_path / ".o.partial" / "samples.jsonl"
    samples.write_text(samples.read_text() + '{"model": "toylab:student", "benchmark": "toylab", "pass": "gr')
    calls.clear()
    monkeypatch.setattr(runner, "generate_texts", stop_at(2))  # chunk 1 generated again, stopped at chunk 2
    assert cli.main(argv) == 130
    assert [json.loads(line)["chunk"] for line in samples.read_text().splitlines()] == [0, 1]
    assert len(journal_module._read_chunks(samples)) == 2
    monkeypatch.setattr(runner, "generate_texts", real_generate)
    capsys.readouterr()
    assert cli.main(argv) == 0 and "2 chunks of responses already generated" in capsys.readouterr().out


def test_a_model_folder_trained_again_in_place_does_not_reuse_the_journal(random_pair_dir, tmp_path, capsys,
                                                                          monkeypatch):
    import os
    import shutil

    from tropd_cli.evaluation import runner

    model = tmp_path / "model"
    shutil.copytree(random_pair_dir / "student", model)
    argv = ["evaluate", "-m", str(model), "-b", "toylab", "--limit", "16", "--batch-size", "8",
            "--out", str(tmp_path / "o")]
    real_generate = runner.generate_texts
    calls = []
    monkeypatch.setattr(runner, "generate_texts", lambda *a, **k: calls.append(1) or (
        (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) == 2 else real_generate(*a, **k)))
    assert cli.main(argv) == 130
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # written again
    monkeypatch.setattr(runner, "generate_texts", real_generate)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "an interrupted evaluation with other settings was in" in capsys.readouterr().out


def test_ctrl_c_before_any_chunk_keeps_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    from tropd_cli.evaluation import runner

    monkeypatch.setattr(runner, "generate_texts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["evaluate", "-m", "toylab:student", "-b", "toylab", "--limit", "8", "--out",
                     str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == "stopped: interrupted before any response was finished; nothing was kept"
    assert not (tmp_path / ".o.partial").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_is_one_line(tmp_path, capsys):
    assert cli.main(["evaluate", "-m", "toylab:student", "-b", "toylab", "--backend", "vllm",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --backend vllm needs vLLM, which is not installed here: pip install")
    assert "\n" not in err
