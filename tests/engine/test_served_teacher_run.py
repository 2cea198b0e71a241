"""A run whose teacher is served and never loads here, on the CPU: a loopback server that answers as vLLM's
OpenAI server does (`/v1/models`, `/detokenize`, `/v1/completions` with `prompt_logprobs` for scores and
`return_token_ids` for samples), backed by the toy teacher; the server sampler's requests and answers; the memory
estimate without teacher weights."""

from __future__ import annotations

import json

import pytest
from helpers import JSONHandler, LoopbackServer, ServedTeacher, pair_models, quiet

from tropd_cli.config import load_config
from tropd_cli.distill import distill
from tropd_cli.engine import run
from tropd_cli.engine.rollout import SamplingParams
from tropd_cli.engine.teacher.server import ServerClient, ServerSampler
from tropd_cli.errors import TeacherUnavailable
from tropd_cli.preflight import run_preflight

EOS = 3
TIMINGS = ("rollout_s", "score_s", "update_s", "sync_s", "tokens_per_s")


@pytest.fixture(scope="module")
def served(random_pair_dir):
    server = ServedTeacher(random_pair_dir / "teacher", name=str(random_pair_dir / "teacher"))
    yield server
    server.close()


def settings(pair, *extra):
    return [*pair_models(pair), "train.steps=3", "rollout.prompts_per_step=2", "rollout.n=2",
            "rollout.max_new_tokens=8", "eval.problems=0", "train.lr=1e-3", "train.threads=1",
            "train.checkpoint_every=0", "output.save_model=false", *extra]


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_served_teacher_trains_as_the_teacher_loaded_here_and_never_loads_here(served, random_pair_dir, tmp_path,
                                                                                  monkeypatch):
    local = distill(load_config("toylab", settings(random_pair_dir, "objective.name=opd")), "toylab",
                    out=str(tmp_path / "local"), console=quiet())
    loads = []
    real_load = run.load_causal_lm
    monkeypatch.setattr(run, "load_causal_lm", lambda spec, *a, **k: loads.append(spec) or real_load(spec, *a, **k))
    remote = distill(load_config("toylab", settings(random_pair_dir, "objective.name=opd", "teacher.backend=server",
                                                    f"teacher.url={served.url}")),
                     "toylab", out=str(tmp_path / "served"), console=quiet())
    assert loads == [str(random_pair_dir / "student")]  # the student only
    assert remote.summary["teacher_loaded_here"] is False and local.summary["teacher_loaded_here"] is True
    here, there = records(local.run_dir), records(remote.run_dir)
    assert len(here) == len(there) == 3
    for a, b in zip(here, there):
        assert a.pop("teacher_entropy") > 0  # a server gives no full-vocabulary entropy; the rest is the same
        assert a.keys() == b.keys(), a.keys() ^ b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_teacher_samples_come_from_the_server(served, random_pair_dir, tmp_path):
    served.requests.clear()
    result = distill(load_config("toylab", settings(random_pair_dir, "objective.name=seqkd", "teacher.backend=server",
                                                    f"teacher.url={served.url}", "train.steps=2")),
                     "toylab", out=str(tmp_path / "seqkd"), console=quiet())
    assert result.summary["status"] == "finished"
    samples = [body for body in served.requests if body.get("return_token_ids")]
    assert len(samples) == 2 * 2  # two prompts a step, one request each
    assert all(body["n"] == 2 and body["max_tokens"] == 8 and body["temperature"] == 1.0 for body in samples)
    assert len({body["seed"] for body in samples}) == 4


def test_the_server_sampler_cuts_at_stop_ids_repeats_greedy_and_seeds_each_prompt(served):
    client = ServerClient(served.url, retries=0)
    sampler = ServerSampler(client, "teacher", [EOS], max_concurrency=2)
    served.requests.clear()
    prompts = [[1, 5, 6], [1, 7]]
    first = sampler.generate(prompts, 3, SamplingParams(6, temperature=1.0), generator_seed=11)
    again = sampler.generate(prompts, 3, SamplingParams(6, temperature=1.0), generator_seed=11)
    assert first.response_ids == again.response_ids and first.prompt_index == [0, 0, 0, 1, 1, 1]
    for response, done in zip(first.response_ids, first.finished):
        assert (EOS in response) == done and (not done or response.index(EOS) == len(response) - 1)
        assert len(response) <= 6
    bodies = served.requests[:2]
    assert all(body["top_k"] == 0 and body["min_p"] == 0 and body["repetition_penalty"] == 1 for body in bodies)
    assert {body["seed"] for body in bodies} != {bodies[0]["seed"]} and all(b["stop_token_ids"] == [EOS]
                                                                             for b in bodies)
    greedy = sampler.generate(prompts, 2, SamplingParams(6, temperature=0.0), generator_seed=0)
    assert greedy.response_ids[0] == greedy.response_ids[1] and served.requests[-1]["n"] == 1


def test_samples_without_token_ids_stop_the_step_in_one_line():
    class Old(JSONHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_json(200, json.dumps({"choices": [{"index": 0, "text": "4"}]}).encode())

    server = LoopbackServer(Old)
    try:
        with pytest.raises(TeacherUnavailable) as error:
            ServerSampler(ServerClient(server.url, retries=0), "teacher", [EOS]).generate(
                [[1, 5]], 1, SamplingParams(4), 0)
    finally:
        server.close()
    assert str(error.value) == (f"teacher server {server.url} returned samples without their index or token ids (a "
                                "vLLM server older than 0.10 does not return them)")


def test_the_memory_estimate_counts_no_teacher_weights_when_it_is_served(served, random_pair_dir):
    here = run_preflight(load_config("toylab", settings(random_pair_dir)))
    there = run_preflight(load_config("toylab", settings(random_pair_dir, "teacher.backend=server",
                                                         f"teacher.url={served.url}")))
    rows_here, rows_there = dict(here.memory.rows), dict(there.memory.rows)
    assert rows_there.pop("teacher weights: none here (served)") == 0
    assert next(size for name, size in rows_here.items() if name.startswith("teacher weights (")) > 0
    assert there.memory.total < here.memory.total
    assert there.served_model == str(random_pair_dir / "teacher") and here.served_model is None


def test_a_served_teachers_weights_are_not_checked_here(tmp_path):
    """Pickle-only weights are refused for a teacher loaded here, not for one a server holds."""
    from tropd_cli.preflight.pairs import weights_check

    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"")
    here = load_config("toylab", [f"teacher.model={folder}"])
    there = load_config("toylab", [f"teacher.model={folder}", "teacher.backend=server", "teacher.url=http://x:1"])
    assert weights_check(here).error.startswith(f"teacher model '{folder}' has pickle weights only")
    assert weights_check(there).error is None


def test_guidance_with_a_served_teacher_samples_its_responses_there_and_resumes_exactly(served, random_pair_dir,
                                                                                          tmp_path):
    """Guidance's teacher responses, sampled by the server in the run and cached, survive a resume: a run of four
    steps resumed from its step-2 checkpoint redoes steps 3 and 4 with the same metrics."""
    import shutil

    from tropd_cli.distill import resume

    guided = ["objective.name=tropd", "objective.guidance=true", "teacher.backend=server", f"teacher.url={served.url}",
              "train.steps=4", "train.checkpoint_every=2", "train.checkpoint_keep=0"]
    served.requests.clear()
    whole = distill(load_config("toylab", settings(random_pair_dir, *guided)), "toylab", out=str(tmp_path / "whole"),
                    console=quiet())
    assert any(body.get("return_token_ids") for body in served.requests)  # responses sampled on the server
    shutil.copytree(tmp_path / "whole", tmp_path / "again")
    resumed = resume(tmp_path / "again", console=quiet(), from_step=2)
    assert records(resumed.run_dir) == records(whole.run_dir)


def test_a_served_teachers_held_out_accuracy_is_measured_on_the_servers_samples(tmp_path):
    """The toy student served as the teacher: its greedy held-out accuracy measured on the server's samples equals
    the accuracy measured with it loaded here, and one greedy request per problem reached the server."""
    from tropd_cli.models import TOYLAB_ASSETS

    server = ServedTeacher(TOYLAB_ASSETS / "student", name="toylab:student")
    try:
        common = ["teacher.model=toylab:student", "train.steps=1", "rollout.prompts_per_step=2", "rollout.n=2",
                  "rollout.max_new_tokens=48", "eval.problems=16", "eval.temperature=0", "eval.every=0",
                  "train.threads=1", "train.checkpoint_every=0", "output.save_model=false"]
        here = distill(load_config("toylab", common), "toylab", out=str(tmp_path / "here"), console=quiet())
        there = distill(load_config("toylab", [*common, "teacher.backend=server", f"teacher.url={server.url}"]),
                        "toylab", out=str(tmp_path / "there"), console=quiet())
    finally:
        server.close()
    assert 0 < here.summary["teacher_accuracy"] < 1
    assert there.summary["teacher_accuracy"] == here.summary["teacher_accuracy"]
    greedy = [body for body in server.requests if body.get("return_token_ids")]
    assert len(greedy) == 16 and all(body["temperature"] == 0 and body["n"] == 1 for body in greedy)
