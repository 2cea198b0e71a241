"""Prepared folders in `distill`: the toy lab from a folder trains exactly like the built-in generator,
batches are a pure function of the step, and teacher drafts are generated resumably and used by guidance
and `sft` instead of in-run sampling."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tropd_cli import cli
from tropd_cli.config import load_config
from tropd_cli.data import sources
from tropd_cli.data.prepared import PreparedFolder, pass_order, prepared_batches
from tropd_cli.data.rows import tokenizer_fingerprint
from tropd_cli.distill import distill
from tropd_cli.engine.guidance import InRunTeacherResponses
from tropd_cli.engine.rollout import HFGenerateBackend
from tropd_cli.errors import TropdError
from tropd_cli.files import OWN_FILES
from tropd_cli.models import load_tokenizer

TINY = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8", "eval.problems=0",
        "train.threads=1", "output.save_model=false"]
# 4 training prompts in shards of 1 (toylab draws 5 problems for them, one of them held out).
DRAFTS = [*TINY, "data.draft_shard_size=1"]


def prepare(out: Path, *settings: str, drafts: bool = False) -> int:
    argv = ["prepare", "--preset", "toylab", "--data", "toylab", "--out", str(out)]
    argv += ["--teacher-drafts"] if drafts else []
    for setting in settings:
        argv += ["--set", setting]
    return cli.main(argv)


def run_distill(out: Path, *settings: str) -> list[dict]:
    distill(load_config("toylab", list(settings)), "toylab", out=str(out), console=Console(file=io.StringIO()))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if not key.endswith("_s")} for record in records]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but tropd's own marker and lock (which record when and by whom)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in OWN_FILES}


def test_toylab_folder_holds_the_generator_stream(tmp_path):
    out = tmp_path / "toy"
    assert prepare(out, *TINY, "train.steps=5") == 0
    config = load_config("toylab", TINY + ["train.steps=5"])
    tokenizer = load_tokenizer("toylab:student")
    builtin = sources.prompt_batches(config, tokenizer)
    prepared = sources.prompt_batches(load_config("toylab", [*TINY, "train.steps=5", f"data.prompts={out}"]),
                                      tokenizer)
    assert [next(prepared) for _ in range(5)] == [next(builtin) for _ in range(5)]
    found = json.loads((out / "manifest.json").read_text())
    assert found["counts"]["train"] == 10 and found["counts"]["read"] == 10 + found["counts"]["eval"]
    assert all(row["meta"]["held_out"] for row in PreparedFolder(out, found).rows("eval"))


def test_toylab_keeps_the_generators_repeats_unless_asked_to_dedupe(tmp_path):
    # Seed 0's stream first repeats a problem at its 155th training prompt.
    steps = ["train.steps=80", "rollout.prompts_per_step=2"]
    assert prepare(tmp_path / "kept", *steps) == 0
    tokenizer = load_tokenizer("toylab:student")
    builtin = sources.prompt_batches(load_config("toylab", steps), tokenizer)
    prepared = sources.prompt_batches(load_config("toylab", [*steps, f"data.prompts={tmp_path / 'kept'}"]),
                                      tokenizer)
    assert [next(prepared) for _ in range(80)] == [next(builtin) for _ in range(80)]
    kept = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert kept["settings"]["dedupe"] is False and kept["counts"]["train"] == 160
    prompts = [row["prompt"] for row in PreparedFolder(tmp_path / "kept", kept).rows()]
    assert len(set(prompts)) == 159 and prompts.index(prompts[154]) < 154
    assert prepare(tmp_path / "deduped", *steps, "data.dedupe=true") == 0
    deduped = json.loads((tmp_path / "deduped" / "manifest.json").read_text())
    assert deduped["counts"]["deduplicated"] == deduped["counts"]["read"] - 1 and deduped["counts"]["train"] == 159


def test_toylab_from_a_folder_trains_exactly_like_the_builtin_generator(tmp_path):
    assert prepare(tmp_path / "toy", *TINY) == 0
    builtin = run_distill(tmp_path / "builtin", *TINY)
    from_folder = run_distill(tmp_path / "folder", *TINY, f"data.prompts={tmp_path / 'toy'}")
    assert len(builtin) == 2
    assert [r["loss"] for r in from_folder] == [r["loss"] for r in builtin]
    assert without_timings(from_folder) == without_timings(builtin)


def test_prepared_batches_are_a_pure_function_of_the_step():
    prompts = [[i] for i in range(5)]
    stream = prepared_batches(prompts, 3, seed=0)
    first_four = [next(stream) for _ in range(4)]
    # Pass 0 in file order, pass 1 in Random(0 * 1_000_003 + 1)'s shuffle, pass 2 in Random(2)'s.
    assert pass_order(5, 0, 0) == [0, 1, 2, 3, 4]
    second, third = pass_order(5, 0, 1), pass_order(5, 0, 2)
    flat = [0, 1, 2, 3, 4] + second + third
    assert first_four == [[[i] for i in flat[start:start + 3]] for start in range(0, 12, 3)]
    for start in range(4):
        assert next(prepared_batches(prompts, 3, seed=0, start_step=start)) == first_four[start]
    assert sorted(second) == [0, 1, 2, 3, 4] and second != [0, 1, 2, 3, 4]


def test_a_folder_prepared_for_another_tokenizer_is_refused(tmp_path):
    out = tmp_path / "toy"
    assert prepare(out, *TINY) == 0
    config = load_config("toylab", [*TINY, f"data.prompts={out}"])
    tokenizer = load_tokenizer("toylab:student")
    prepared = json.loads((out / "manifest.json").read_text())["tokenizer"]["sha256"]
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    current = tokenizer_fingerprint(tokenizer)
    assert current != prepared
    with pytest.raises(TropdError) as error:
        sources.prompt_batches(config, tokenizer)
    assert str(error.value) == (f"{out} was prepared with another tokenizer (that of toylab:student, sha256 "
                                f"{prepared[:12]}) than the student's (toylab:student, sha256 {current[:12]}); "
                                f"prepare it again with this preset")


ORIGINAL_GENERATE = HFGenerateBackend.generate


def count_generate(monkeypatch, stop_after: int | None = None) -> list[list[list[int]]]:
    """Patch HFGenerateBackend.generate to record each call's prompts, and to raise KeyboardInterrupt (as
    Ctrl-C does) instead of making call number `stop_after` + 1."""
    calls: list[list[list[int]]] = []

    def generate(backend, prompt_ids, n, params, seed):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(prompt_ids)
        return ORIGINAL_GENERATE(backend, prompt_ids, n, params, seed)

    monkeypatch.setattr(HFGenerateBackend, "generate", generate)
    return calls


def test_interrupted_drafts_resume_with_only_the_missing_shards(tmp_path, monkeypatch, capsys):
    out = tmp_path / "toy"
    count_generate(monkeypatch, stop_after=2)
    assert prepare(out, *DRAFTS, drafts=True) == 130
    assert capsys.readouterr().err.strip() == (f"stopped: teacher drafts interrupted with 2 of 4 shards written in "
                                               f"{out / 'drafts'}; run the same command again to generate the rest")
    assert sorted(p.name for p in (out / "drafts").iterdir()) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    pending = json.loads((out / "manifest.json").read_text())["drafts"]
    assert pending["complete"] is False and pending["shards"] == 4
    config = load_config("toylab", [*DRAFTS, f"data.prompts={out}", "objective.guidance=true"])
    with pytest.raises(TropdError) as error:
        sources.teacher_response_source(config, teacher_backend=None)
    assert str(error.value) == (f"{out} has 2 of 4 teacher-draft shards; finish them by running its `tropd prepare "
                                f"... --teacher-drafts` command again")

    resumed = count_generate(monkeypatch)
    assert prepare(out, *DRAFTS, drafts=True) == 0
    train = [row["prompt_ids"] for row in PreparedFolder.open(out).rows("train")]
    assert resumed == [[train[2]], [train[3]]]  # shards 2 and 3 only

    whole = tmp_path / "whole"
    assert len(count_generate(monkeypatch)) == 0
    assert prepare(whole, *DRAFTS, drafts=True) == 0
    assert folder_bytes(out) == folder_bytes(whole)  # the same bytes as an uninterrupted run
    drafts = json.loads((out / "manifest.json").read_text())["drafts"]
    assert drafts["complete"] is True and drafts["prompts"] == 4 and len(drafts["fingerprint"]) == 64
    again = count_generate(monkeypatch)
    assert prepare(out, *DRAFTS, drafts=True) == 0
    assert again == [] and folder_bytes(out) == folder_bytes(whole)


def test_drafts_made_with_other_settings_are_not_resumed(tmp_path, capsys):
    out = tmp_path / "toy"
    assert prepare(out, *DRAFTS, drafts=True) == 0
    assert prepare(out, *DRAFTS, "rollout.temperature=0.5", drafts=True) == 2
    assert capsys.readouterr().err.strip() == (f"error: {out} holds teacher drafts made with other settings "
                                               f"(temperature 1.0 there, 0.5 here); pass --overwrite to prepare it "
                                               f"again")


@pytest.fixture(scope="module")
def drafted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drafted") / "toy"
    assert prepare(out, *DRAFTS, drafts=True) == 0
    return out


def drafts_of(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((folder / "drafts").iterdir())
            for line in path.read_text().splitlines()]


@pytest.fixture
def no_in_run_sampling(monkeypatch):
    def refuse(self, prompt_ids):
        raise AssertionError("in-run teacher sampling was used")

    monkeypatch.setattr(InRunTeacherResponses, "__call__", refuse)


def test_guidance_trains_on_the_cached_drafts(drafted, tmp_path, no_in_run_sampling):
    records = run_distill(tmp_path / "run", *DRAFTS, f"data.prompts={drafted}", "objective.guidance=true")
    first_batch = drafts_of(drafted)[:2]  # step 1 reads the first two training prompts
    # Step i = 0 of N = 1: the whole draft without its EOS is the prefix of each of the n rollouts.
    content = [len(d["response_ids"]) - d["finished"] for d in first_batch]
    assert records[0]["prefix_length"] == sum(content) / 2
    assert records[1]["prefix_length"] == 0.0


def test_sft_trains_on_the_cached_drafts(drafted, tmp_path, no_in_run_sampling):
    records = run_distill(tmp_path / "run", *DRAFTS, f"data.prompts={drafted}", "objective.name=sft")
    drafts = drafts_of(drafted)
    assert [r["response_length"] for r in records] == [
        sum(len(d["response_ids"]) for d in drafts[i:i + 2]) / 2 for i in (0, 2)]


def test_drafts_of_another_teacher_are_refused(drafted, random_pair_dir):
    config = load_config("toylab", [*DRAFTS, f"data.prompts={drafted}", "objective.name=sft",
                                    f"teacher.model={random_pair_dir / 'teacher'}"])
    with pytest.raises(TropdError) as error:
        sources.teacher_response_source(config, teacher_backend=None)
    assert str(error.value) == (f"the teacher drafts of {drafted} come from toylab:teacher, not from teacher.model "
                                f"{random_pair_dir / 'teacher'}; prepare drafts with this teacher")
    # Objectives that need no teacher response keep the in-run source, which is never asked.
    plain = load_config("toylab", [*DRAFTS, f"data.prompts={drafted}"])
    assert isinstance(sources.teacher_response_source(plain, teacher_backend=None), InRunTeacherResponses)


def test_drafts_from_a_served_teacher_equal_the_teacher_loaded_here_and_never_load_it(tmp_path, monkeypatch):
    """`prepare --teacher-drafts --backend server`: the drafts come from the server (near-greedy sampling makes
    them comparable) and equal the drafts of the teacher loaded here; the teacher never loads here."""
    from helpers import ServedTeacher

    from tropd_cli.data import drafts
    from tropd_cli.models import TOYLAB_ASSETS

    near_greedy = [*DRAFTS, "rollout.temperature=1e-6"]
    assert prepare(tmp_path / "here", *near_greedy, drafts=True) == 0
    loads, real_load = [], drafts.load_causal_lm
    monkeypatch.setattr(drafts, "load_causal_lm", lambda spec, *a, **k: loads.append(spec) or real_load(spec, *a, **k))
    server = ServedTeacher(TOYLAB_ASSETS / "teacher", name="toylab:teacher")
    try:
        argv = ["prepare", "--preset", "toylab", "--data", "toylab", "--out", str(tmp_path / "there"),
                "--teacher-drafts", "--backend", "server", "--set", f"teacher.url={server.url}"]
        assert cli.main(argv + [arg for setting in near_greedy for arg in ("--set", setting)]) == 0
    finally:
        server.close()
    assert loads == [] and len([body for body in server.requests if body.get("return_token_ids")]) == 4
    here, there = (json.loads((tmp_path / name / "manifest.json").read_text())["drafts"] for name in ("here", "there"))
    assert there.pop("backend") == "server" and here.pop("backend") == "hf"
    assert there == here  # the same responses: the fingerprint covers every shard's bytes


def test_vllm_drafts_with_an_engine_too_short_for_the_prompts_stop_in_one_line_before_it_starts(tmp_path, capsys,
                                                                                                monkeypatch):
    """rollout.vllm_max_model_len must hold the longest prompt to draft plus rollout.max_new_tokens: one line naming
    the length needed, before the engine starts or any shard is written (the prompts are prepared and kept)."""
    from tropd_cli.data import drafts
    from tropd_cli.data import prepare as prepare_module
    from tropd_cli.engine.teacher import sampling

    monkeypatch.setattr(prepare_module, "vllm_absent", lambda setting: None)  # as if vLLM were installed
    monkeypatch.setattr(sampling, "teacher_sampler", lambda *a, **k: pytest.fail("the engine started"))
    assert prepare(tmp_path / "all", *DRAFTS) == 0
    longest = max(len(json.loads(line)["prompt_ids"]) for line in (tmp_path / "all" / "train.jsonl").open())
    new = load_config("toylab", DRAFTS).rollout.max_new_tokens
    argv = ["prepare", "--preset", "toylab", "--data", "toylab", "--out", str(tmp_path / "o"), "--teacher-drafts",
            "--backend", "vllm", *[arg for setting in [*DRAFTS, f"rollout.vllm_max_model_len={longest + new - 1}"]
                                   for arg in ("--set", setting)]]
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: rollout.vllm_max_model_len={longest + new - 1} is too short for the longest training prompt "
        f"({longest} tokens) plus rollout.max_new_tokens={new}; raise it to at least {longest + new}, or null for "
        "the model's own maximum")
    assert (tmp_path / "o" / "train.jsonl").is_file() and not (tmp_path / "o" / drafts.DRAFTS).exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "tgi", "--teacher-drafts"], "error: --backend must be hf, vllm or server, got 'tgi'"),
    (["--backend", "vllm"], "error: --backend chooses what samples the teacher drafts; add --teacher-drafts"),
    (["--backend", "server", "--teacher-drafts"], "error: --backend server asks the teacher's server for the drafts: "
                                                  "set teacher.url (--set teacher.url=http://HOST:PORT)"),
])
def test_a_bad_draft_backend_is_one_line(argv, message, tmp_path, capsys):
    assert cli.main(["prepare", "--preset", "toylab", "--data", "toylab", "--out", str(tmp_path / "o"), *argv]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "o").exists()
