"""Teacher scores from vLLM, in process and from a real OpenAI-style server, against the HF scorer (vLLM lane).

The server (`python -m vllm.entrypoints.openai.api_server`, the command `tropd serve-teacher` prints) starts once
for the module on a free loopback port; so does the in-process engine. Both score the random float32 teacher
with head_dim 64; the HF scorer's top-k and sampled log-probs are the reference, to 1e-4.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from helpers import JSONHandler, LoopbackServer, pair_models, set_args

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM lane, `make test-vllm`, has it)")

from tokenizers import Tokenizer  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM  # noqa: E402

from tropd_cli import cli  # noqa: E402
from tropd_cli.engine.scoring import build_sequences  # noqa: E402
from tropd_cli.engine.teacher import HFTeacherScorer  # noqa: E402
from tropd_cli.engine.teacher.server import (  # noqa: E402
    ServerClient,
    ServerTeacherScorer,
    check_server,
    server_command,
    teacher_names,
)
from tropd_cli.engine.teacher.vllm import VLLMTeacherScorer  # noqa: E402
from tropd_cli.engine.vllm_engine import EngineOptions, start_engine  # noqa: E402
from tropd_cli.errors import TropdError  # noqa: E402

TOP_K = 16
SERVER_MAX_LOGPROBS = 32


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(vllm_pair_dir, tmp_path_factory):
    url = f"http://127.0.0.1:{free_port()}"
    command = server_command(str(vllm_pair_dir / "teacher"), url, "float32", SERVER_MAX_LOGPROBS, max_model_len=256,
                             python=sys.executable) + ["--enforce-eager"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server did not start: {log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def teacher_engine(vllm_pair_dir):
    options = EngineOptions(dtype="float32", enforce_eager=True, kv_cache_gib=0.25, max_model_len=256,
                            max_logprobs=64, sleep=False)
    return start_engine(str(vllm_pair_dir / "teacher"), options, "test")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 900, (length,), generator=generator).tolist() for length in (5, 3, 9)]
    responses = [torch.randint(4, 900, (length,), generator=generator).tolist() for length in (7, 12, 1)]
    return build_sequences(prompts, responses, pad_token_id=0)


@pytest.fixture(scope="module")
def reference(vllm_pair_dir, batch):
    teacher = Qwen3ForCausalLM.from_pretrained(vllm_pair_dir / "teacher", dtype=torch.float32).eval()
    return HFTeacherScorer(teacher, 64).score(batch, TOP_K)


def assert_scores_equal(got, expected):
    assert got.entropy is None and got.hidden is None
    assert got.topk_ids.shape == expected.topk_ids.shape
    assert torch.allclose(got.logprobs, expected.logprobs, atol=1e-4, rtol=0)
    assert torch.allclose(got.topk_logprobs, expected.topk_logprobs, atol=1e-4, rtol=0)
    # ids agree wherever the log-probs are not tied within the tolerance
    untied = (expected.topk_logprobs[:, :-1] - expected.topk_logprobs[:, 1:]).abs() > 1e-4
    untied = torch.cat([untied, untied[:, -1:]], dim=1) & torch.cat([untied[:, :1], untied], dim=1)
    assert torch.equal(got.topk_ids[untied], expected.topk_ids[untied])


def test_the_served_teachers_scores_equal_the_hf_scorers(server_url, batch, reference):
    scorer = ServerTeacherScorer(server_url)
    assert scorer.provides == {"logprobs", "topk"} and scorer.head is None
    assert_scores_equal(scorer.score(batch, TOP_K), reference)


def test_the_servers_samples_are_token_ids_greedy_as_hf_and_seeded(server_url, vllm_pair_dir):
    """The server sampler on vLLM's real server: `return_token_ids` gives the samples' ids; greedy ones equal HF
    generate's on the same weights; a seed gives the same samples again."""
    from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams
    from tropd_cli.engine.teacher.server import ServerSampler

    teacher = Qwen3ForCausalLM.from_pretrained(vllm_pair_dir / "teacher", dtype=torch.float32).eval()
    prompts, eos = [[5, 17, 230], [9, 41], [77, 12, 300, 8]], [3]
    sampler = ServerSampler(ServerClient(server_url), str(vllm_pair_dir / "teacher"), eos, max_concurrency=2)
    greedy = sampler.generate(prompts, 2, SamplingParams(8, temperature=0.0), 0)
    expected = HFGenerateBackend(teacher, 0, eos).generate(prompts, 2, SamplingParams(8, temperature=0.0), 0)
    assert greedy.response_ids == expected.response_ids and greedy.prompt_index == [0, 0, 1, 1, 2, 2]
    sampled = sampler.generate(prompts, 3, SamplingParams(8), 7)
    assert sampled.response_ids == sampler.generate(prompts, 3, SamplingParams(8), 7).response_ids
    assert len(sampled.response_ids) == 9 and all(1 <= len(r) <= 8 for r in sampled.response_ids)


def test_the_in_process_vllm_teachers_scores_equal_the_hf_scorers(teacher_engine, batch, reference):
    assert_scores_equal(VLLMTeacherScorer("unused", llm=teacher_engine).score(batch, TOP_K), reference)


def test_the_server_check_passes_and_names_the_model(server_url, toy_tokenizer, vllm_pair_dir):
    teacher = str(vllm_pair_dir / "teacher")  # what `tropd serve-teacher` passes as --model
    names = teacher_names(teacher, None)
    assert check_server(ServerClient(server_url), toy_tokenizer, TOP_K, "top_k", names) == teacher


def test_a_server_serving_another_model_is_refused_in_one_line(server_url, toy_tokenizer, vllm_pair_dir):
    with pytest.raises(TropdError) as error:
        check_server(ServerClient(server_url), toy_tokenizer, TOP_K, "top_k", teacher_names("Qwen/Qwen3-32B", None))
    teacher = str(vllm_pair_dir / "teacher")
    assert str(error.value) == (f"teacher server {server_url} serves {teacher}, not the teacher Qwen/Qwen3-32B; if "
                                f"that is the same model under another name, set teacher.served_model={teacher}")
    assert check_server(ServerClient(server_url), toy_tokenizer, TOP_K, "top_k",
                        teacher_names("Qwen/Qwen3-32B", teacher)) == teacher


def test_k_above_the_servers_max_logprobs_is_one_line(server_url, toy_tokenizer):
    with pytest.raises(TropdError) as error:
        check_server(ServerClient(server_url), toy_tokenizer, 64, "top_k")
    assert str(error.value) == (f"objective.top_k=64 is above the teacher server's max_logprobs "
                                f"({SERVER_MAX_LOGPROBS}); restart it with --max-logprobs 64 (`tropd serve-teacher` "
                                f"prints the command) or lower objective.top_k")


def test_a_server_with_another_vocabulary_is_one_line(server_url, toy_tokenizer):
    vocab = toy_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    shuffled = Tokenizer.from_str(toy_tokenizer.backend_tokenizer.to_str())
    shuffled.model = type(shuffled.model)(vocab={token: (i * 7) % len(tokens) for i, token in enumerate(tokens)},
                                          unk_token="<|unk|>")
    other = PreTrainedTokenizerFast(tokenizer_object=shuffled)
    with pytest.raises(TropdError) as error:
        check_server(ServerClient(server_url), other, TOP_K, "top_k")
    assert str(error.value).startswith(f"teacher server {server_url} serves another vocabulary: ")
    assert "\n" not in str(error.value)


def test_a_server_that_is_down_is_one_line_after_its_retries():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TropdError) as error:
        ServerTeacherScorer(url, timeout_s=2, retries=2, backoff_s=0.05)
    assert str(error.value).startswith(f"teacher server {url} did not answer /v1/models after 3 tries (")
    assert "\n" not in str(error.value) and time.monotonic() - started < 10


class Proxy(LoopbackServer):
    """A loopback proxy in front of the real server: it can cut one answer short and send one answer without
    its choices (each retried by the client), and it goes away for good after `live` completion requests."""

    def __init__(self, target: str, faults: tuple[str, ...] = (), live: int | None = None) -> None:
        self.target, self.faults, self.live, self.completions = target, list(faults), live, 0
        owner = self

        class Handler(JSONHandler):
            def _forward(self, body: bytes | None) -> None:
                if self.path == "/v1/completions":
                    owner.completions += 1
                    if owner.live is not None and owner.completions > owner.live:
                        threading.Thread(target=owner.close, daemon=True).start()
                        self.close_connection = True
                        return  # no answer: the connection closes, and the port closes behind it
                    fault = owner.faults.pop(0) if owner.faults and owner.completions > 1 else None
                    if fault == "cut":
                        self.send_response(200)
                        self.send_header("Content-Length", "1000")
                        self.end_headers()
                        self.wfile.write(b'{"choices": [')
                        return
                    if fault == "malformed":
                        self.send_json(200, b'{"object": "text_completion"}')
                        return
                request = urllib.request.Request(owner.target + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        self.send_json(answer.status, answer.read())
                except urllib.error.HTTPError as error:
                    self.send_json(error.code, error.read())

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        super().__init__(Handler)


def test_a_run_whose_server_dies_resumes_on_another_and_matches_the_uninterrupted_run(server_url, vllm_pair_dir,
                                                                                      tmp_path, capsys):
    """Through a proxy that cuts one answer short and sends one without choices (both retried), four steps with
    the served teacher; then the same run with a proxy that dies inside step 4: one line, a checkpoint of step 3,
    and `--resume --set teacher.url=` pointing at the server itself finishes it with the same metrics."""
    settings = [*pair_models(vllm_pair_dir), "teacher.backend=server", f"objective.top_k={TOP_K}", "train.steps=4",
                "train.checkpoint_every=2", "train.checkpoint_keep=0", "rollout.prompts_per_step=2", "rollout.n=2",
                "rollout.max_new_tokens=8", "eval.problems=0", "train.lr=1e-3", "teacher.retries=2",
                "teacher.timeout_s=20"]

    def distill(out, url, *extra):
        argv = ["distill", "-p", "toylab", "--out", str(out), "--set", f"teacher.url={url}"]
        return cli.main(argv + set_args([*settings, *extra]))

    def records(out):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s") and k != "tokens_per_s"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    flaky = Proxy(server_url, faults=("cut", "malformed"))
    assert distill(tmp_path / "reference", flaky.url) == 0
    flaky.close()
    per_step = (flaky.completions - 2 - 1) // 4  # less the two retried answers and preflight's one request
    capsys.readouterr()

    dying = Proxy(server_url, live=1 + 3 * per_step)
    out = tmp_path / "run"
    assert distill(out, dying.url) == 2
    dying.close()
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"error: teacher server {dying.url} did not answer "
                                                  "/v1/completions after ")
    assert error.endswith(f"; the run stopped after step 3 with a checkpoint in {out / 'checkpoints' / 'step-000003'};"
                          f" go on with: tropd distill --resume {out} --set teacher.url=URL")
    assert cli.main(["distill", "--resume", str(out), "--set", f"teacher.url={server_url}"]) == 0
    assert records(out) == records(tmp_path / "reference")
    assert json.loads((out / "summary.json").read_text())["teacher_loaded_here"] is False


def test_a_run_served_by_the_real_server_trains_as_the_teacher_loaded_here_and_samples_there(server_url,
                                                                                             vllm_pair_dir, tmp_path,
                                                                                             monkeypatch):
    """OPD with the teacher served by vLLM's server: no teacher module loads here, and every step's metrics equal
    the run with the teacher loaded here to the scores' tolerance (teacher_entropy aside, which a server cannot
    give); seqkd's samples and guidance's responses are drawn by the server."""
    from tropd_cli.engine import run
    from tropd_cli.engine.teacher.server import ServerSampler

    loads, sampled = [], []
    real_load, real_generate = run.load_causal_lm, ServerSampler.generate
    monkeypatch.setattr(run, "load_causal_lm", lambda spec, *a, **k: loads.append(spec) or real_load(spec, *a, **k))
    monkeypatch.setattr(ServerSampler, "generate", lambda self, *a, **k: sampled.append(a[1]) or real_generate(
        self, *a, **k))
    base = [*pair_models(vllm_pair_dir), f"objective.top_k={TOP_K}", "train.steps=3", "rollout.prompts_per_step=2",
            "rollout.n=2", "rollout.max_new_tokens=8", "eval.problems=0", "train.lr=1e-3", "train.checkpoint_every=0",
            "output.save_model=false"]
    served = ["teacher.backend=server", f"teacher.url={server_url}"]

    def distill(name, *extra):
        out = tmp_path / name
        assert cli.main(["distill", "-p", "toylab", "--out", str(out), *set_args([*base, *extra])]) == 0
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out

    here, _ = distill("here", "objective.name=opd")
    loads.clear()
    there, out = distill("there", "objective.name=opd", *served)
    assert loads == [str(vllm_pair_dir / "student")]
    assert json.loads((out / "summary.json").read_text())["teacher_loaded_here"] is False
    for a, b in zip(here, there, strict=True):
        assert a.pop("teacher_entropy") > 0
        for key in a.keys() - {"rollout_s", "score_s", "update_s", "sync_s", "tokens_per_s"}:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key
    assert sampled == []
    distill("seqkd", "objective.name=seqkd", "train.steps=2", *served)
    assert sampled == [2, 2]  # each step's teacher samples, n=2, drawn by the server
    sampled.clear()
    distill("guided", "objective.guidance=true", "train.steps=2", *served)
    assert sampled == [1, 1]  # each step's prompts get one teacher response each, drawn by the server
