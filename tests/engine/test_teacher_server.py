"""The served teacher without vLLM: the prompt-log-prob conversion, the HTTP client's retries and all-or-nothing
answers against a tiny fake server on the loopback, and the command `tropd serve-teacher` prints."""

import json
import threading
import time

import pytest
import torch
from helpers import JSONHandler, LoopbackServer

from tropd_cli import cli
from tropd_cli.engine.scoring import build_sequences
from tropd_cli.engine.teacher import stats_from_prompt_logprobs
from tropd_cli.engine.teacher.server import (
    ServerClient,
    ServerTeacherScorer,
    api_key_from,
    check_server,
    served_model,
    teacher_names,
)
from tropd_cli.errors import TropdError
from tropd_cli.models import resolve_model_path

BATCH = build_sequences([[5, 6], [7]], [[8, 9], [10]], pad_token_id=0)
CUT, TRICKLE = "cut", "trickle"


def position(token, others):
    """A prompt-log-prob entry: the token at rank 3 and `others` (id -> log-prob) ranked first."""
    entry = {other: (value, rank + 1) for rank, (other, value) in enumerate(others.items())}
    entry.setdefault(token, (-5.0, 3))
    return entry


def scored(sequence):
    return [None] + [position(token, {100 + token: -0.1, 200 + token: -0.5}) for token in sequence[1:]]


def test_prompt_logprobs_become_the_sampled_tokens_logprob_and_the_top_k_in_scoring_order():
    stats = stats_from_prompt_logprobs(BATCH, [scored([5, 6, 8, 9]), scored([7, 10])], top_k=2)
    assert stats.logprobs.tolist() == [-5.0, -5.0, -5.0]  # tokens 8, 9 of row 0, then 10 of row 1
    assert stats.topk_ids.tolist() == [[108, 208], [109, 209], [110, 210]]
    assert torch.allclose(stats.topk_logprobs, torch.tensor([[-0.1, -0.5]] * 3))
    assert stats.entropy is None and stats.hidden is None


def test_a_partial_score_is_refused():
    with pytest.raises(ValueError, match="sequence 1: 1 scored positions for 2 tokens"):
        stats_from_prompt_logprobs(BATCH, [scored([5, 6, 8, 9]), [None]], top_k=2)
    with pytest.raises(ValueError, match="1 log-probs, not the top 2"):
        thin = [None] + [{token: (-1.0, 1)} for token in (6, 8, 9)]
        stats_from_prompt_logprobs(BATCH, [thin, scored([7, 10])], top_k=2)


class FakeServer(LoopbackServer):
    """A loopback HTTP server answering /v1/models and /v1/completions from `answers` in turn: (status, body),
    a function of the request body that returns one, or CUT (an answer that stops short) or TRICKLE (an answer
    sent a byte at a time). `headers` keeps each POST's headers."""

    def __init__(self, answers):
        self.answers, self.requests, self.headers = list(answers), [], []
        self.lock = threading.Lock()
        owner = self

        class Handler(JSONHandler):
            def _reply(self, status, body):
                self.send_json(status, json.dumps(body).encode())

            def do_GET(self):
                self._reply(200, {"data": [{"id": "teacher"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append(body)
                    owner.headers.append(dict(self.headers))
                    answer = owner.answers.pop(0)
                if answer in (CUT, TRICKLE):
                    self.send_response(200)
                    self.send_header("Content-Length", "10000")
                    self.end_headers()
                    try:
                        for _ in range(1 if answer == CUT else 10000):
                            self.wfile.write(b"{" if answer == CUT else b" ")
                            self.wfile.flush()
                            if answer == TRICKLE:
                                time.sleep(0.05)
                    except OSError:  # the client gave up
                        pass
                    return
                self._reply(*(answer(body) if callable(answer) else answer))

        super().__init__(Handler)


def completions(per_sequence):
    return {"choices": [{"index": i, "prompt_logprobs": [None if p is None else {str(t): {"logprob": v, "rank": r}
                                                                                 for t, (v, r) in p.items()}
                                                          for p in entries]}
                        for i, entries in enumerate(per_sequence)]}


@pytest.fixture
def fake():
    servers = []

    def make(answers):
        servers.append(FakeServer(answers))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_the_scorer_retries_server_errors_then_scores(fake):
    good = completions([scored([5, 6, 8, 9]), scored([7, 10])])
    server = fake([(503, {"error": {"message": "busy"}}), (502, {}), (200, good)])
    stats = ServerTeacherScorer(server.url, retries=2, backoff_s=0.01).score(BATCH, 2)
    assert stats.topk_ids.tolist() == [[108, 208], [109, 209], [110, 210]]
    assert len(server.requests) == 3
    assert server.requests[-1] == {"model": "teacher", "prompt": [[5, 6, 8, 9], [7, 10]], "max_tokens": 1,
                                   "temperature": 0.0, "prompt_logprobs": 2}


def test_a_server_that_keeps_failing_stops_the_run_in_one_line(fake):
    server = fake([(500, {"error": {"message": "engine dead"}})] * 2)
    with pytest.raises(TropdError) as error:
        ServerTeacherScorer(server.url, retries=1, backoff_s=0.01).score(BATCH, 2)
    assert str(error.value).startswith(f"teacher server {server.url} did not answer /v1/completions after 2 tries "
                                       "(HTTP 500: engine dead)")


def test_a_partial_answer_is_never_trained_on(fake):
    server = fake([(200, completions([scored([5, 6, 8, 9])]))])
    with pytest.raises(TropdError, match=r"returned a partial score \(1 scored sequences for a batch of 2\)$"):
        ServerTeacherScorer(server.url, retries=0).score(BATCH, 2)


def test_a_refused_request_is_not_retried_and_says_why(fake):
    server = fake([(400, {"error": {"message": "Token id 5 is out of vocabulary"}})])
    with pytest.raises(TropdError) as error:
        ServerTeacherScorer(server.url, retries=3).score(BATCH, 2)
    assert str(error.value) == (f"teacher server {server.url} refused a scoring request: Token id 5 is out of "
                                "vocabulary")
    assert len(server.requests) == 1


def test_serve_teacher_prints_the_exact_server_command(capsys):
    assert cli.main(["serve-teacher", "-p", "toylab", "--set", "teacher.url=http://127.0.0.1:8123",
                     "--set", "rollout.vllm_max_model_len=512"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("python -m vllm.entrypoints.openai.api_server --model ")
    assert out.endswith("/toylab/assets/teacher --host 127.0.0.1 --port 8123 --dtype float32 --max-logprobs 64 "
                        "--max-model-len 512")


GOOD = completions([scored([5, 6, 8, 9]), scored([7, 10])])


def test_an_answer_cut_short_or_without_choices_is_retried(fake):
    server = fake([CUT, (200, {"object": "text_completion"}), (200, "not an object"), (200, GOOD)])
    stats = ServerTeacherScorer(server.url, retries=3, backoff_s=0.01).score(BATCH, 2)
    assert stats.topk_ids.tolist() == [[108, 208], [109, 209], [110, 210]] and len(server.requests) == 4


def test_a_server_that_keeps_answering_without_choices_says_so(fake):
    server = fake([(200, {"object": "text_completion"})] * 2)
    with pytest.raises(TropdError) as error:
        ServerTeacherScorer(server.url, retries=1, backoff_s=0.01).score(BATCH, 2)
    assert str(error.value).startswith(f"teacher server {server.url} did not answer /v1/completions after 2 tries "
                                       "(an answer without 'choices')")


def test_a_trickling_server_is_stopped_at_the_deadline(fake):
    server = fake([TRICKLE, (200, GOOD)])
    started = time.monotonic()
    with pytest.raises(TropdError) as error:
        ServerTeacherScorer(server.url, timeout_s=30, retries=3, backoff_s=0.01, deadline_s=0.5).score(BATCH, 2)
    assert time.monotonic() - started < 3  # each read is far inside timeout_s; the deadline ends it
    assert str(error.value).startswith(f"teacher server {server.url} did not answer /v1/completions after 1 tries "
                                       "within teacher.deadline_s=0.5 (deadline passed while reading the answer)")


def test_the_api_key_goes_out_as_a_bearer_token_and_never_into_a_message(fake, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-secret")
    server = fake([(500, {"error": {"message": "engine dead"}})] * 2)
    with pytest.raises(TropdError) as error:
        ServerTeacherScorer(server.url, retries=1, backoff_s=0.01, api_key=api_key_from("TEACHER_KEY")).score(BATCH, 2)
    assert [headers["Authorization"] for headers in server.headers] == ["Bearer sk-secret"] * 2
    assert "sk-secret" not in str(error.value)
    monkeypatch.delenv("TEACHER_KEY")
    with pytest.raises(TropdError, match="^teacher.api_key_env=TEACHER_KEY names an environment variable that is "
                                         "not set$"):
        api_key_from("TEACHER_KEY")
    assert api_key_from(None) is None


def test_sequences_are_split_over_concurrent_requests_and_rejoined_in_order(fake):
    by_first_token = {5: scored([5, 6, 8, 9]), 7: scored([7, 10])}

    def answer(body):  # each request scores its own prompts, whichever arrives first
        time.sleep(0.5)
        return 200, completions([by_first_token[prompt[0]] for prompt in body["prompt"]])

    server = fake([answer, answer])
    started = time.monotonic()
    stats = ServerTeacherScorer(server.url, retries=0, max_concurrency=2).score(BATCH, 2)
    assert time.monotonic() - started < 0.9  # in flight together (one after the other: at least 1 s)
    assert sorted(request["prompt"] for request in server.requests) == [[[5, 6, 8, 9]], [[7, 10]]]
    assert stats.topk_ids.tolist() == [[108, 208], [109, 209], [110, 210]]


def test_a_4xx_answer_is_not_retried_by_the_client(fake):
    server = fake([(404, {"error": {"message": "no such route"}})])
    with pytest.raises(TropdError, match="no such route"):
        ServerClient(server.url, retries=3).request("/v1/completions", {}, expect="choices")
    assert len(server.requests) == 1


def test_the_teacher_must_be_what_the_server_serves(fake):
    server = fake([])  # serves one model, "teacher"
    assert served_model(ServerClient(server.url)) == "teacher"
    assert served_model(ServerClient(server.url), ("other", "teacher")) == "teacher"
    with pytest.raises(TropdError) as error:
        check_server(ServerClient(server.url), None, 2, "top_k", teacher_names("Qwen/Qwen3-32B", None))
    assert str(error.value) == (f"teacher server {server.url} serves teacher, not the teacher Qwen/Qwen3-32B; if that "
                                "is the same model under another name, set teacher.served_model=teacher")
    assert server.requests == []  # refused on the model list alone
    assert teacher_names("toylab:teacher", None) == ("toylab:teacher", resolve_model_path("toylab:teacher"))
    assert teacher_names("Qwen/Qwen3-32B", None) == ("Qwen/Qwen3-32B",)
    assert teacher_names("Qwen/Qwen3-32B", "big") == ("big",)


def test_serve_teacher_start_becomes_the_server_so_that_stopping_it_leaves_none_running(tmp_path):
    """`tropd serve-teacher --start` replaces itself by the server (a stand-in `vllm` package here): the pid a
    supervisor holds is the server's, and SIGTERM to it ends the server, with no orphan left behind."""
    import os
    import signal
    import subprocess
    import sys

    import psutil
    from helpers import ROOT

    server = tmp_path / "vllm" / "entrypoints" / "openai"
    server.mkdir(parents=True)
    for folder in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", server):
        (folder / "__init__.py").write_text("")
    marker = tmp_path / "pid"
    (server / "api_server.py").write_text(f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n"
                                          "time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tropd_cli", "serve-teacher", "-p", "toylab", "--start"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists() or not marker.read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    assert int(marker.read_text()) == process.pid
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM
    assert not psutil.pid_exists(process.pid)
