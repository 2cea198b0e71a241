"""What several test files share, as plain functions and classes (fixtures live in conftest.py): the student
modes, tiny-run settings on a model pair, a Ctrl-C inside a step, quiet consoles, a bench script in a
subprocess, a run's saved student, and loopback HTTP servers (among them a teacher served as vLLM serves it).
Test files anywhere under tests/ import it as `helpers`: pytest puts tests/ on sys.path when it loads
tests/conftest.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tropd_cli.engine.trainer import Trainer
from tropd_cli.models import load_tokenizer
from tropd_cli.runfolder import RunFolder

ROOT = Path(__file__).resolve().parent.parent  # the repository
STUDENT_MODES = {  # the overrides that train every weight, LoRA adapters, or LoRA over a 4-bit base
    "full": [],
    "lora": ["student.lora.enabled=true"],
    "qlora": ["student.lora.enabled=true", "student.quantization=4bit"],
}


def pair_models(pair: Path) -> list[str]:
    """The overrides that make a saved pair (PAIR/teacher, PAIR/student) the run's teacher and student."""
    return [f"teacher.model={pair / 'teacher'}", f"student.model={pair / 'student'}"]


def set_args(settings: list[str]) -> list[str]:
    """Overrides as command-line arguments: --set KEY=VALUE for each."""
    return [arg for setting in settings for arg in ("--set", setting)]


def quiet() -> Console:
    """A console whose output goes nowhere."""
    return Console(file=io.StringIO(), width=120)


def crash_inside_step(monkeypatch, step: int):
    """Make the run die with Ctrl-C's exception inside `step` (1-based); returns the real train_step."""
    real_step = Trainer.train_step

    def crash(self):
        if self.step == step - 1:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", crash)
    return real_step


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT ARGS` from the repository root, offline, its output captured (10 minutes at most)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def student_weights(run: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's final student: its adapter, or its whole model."""
    folder = RunFolder(run).student
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers with JSON bytes."""

    def log_message(self, *args) -> None:
        pass

    def send_json(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LoopbackServer:
    """An HTTP server on a free loopback port (`url`), serving `handler` from a daemon thread until `close`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.closed = False
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()


class ServedTeacher(LoopbackServer):
    """The model in `folder` served under `name`: prompt log-probs computed in float32 (the top `prompt_logprobs`
    and the token itself, with vLLM's 1-based ranks), and samples drawn by `generate` with the request's seed.
    `requests` keeps every completion request's body."""

    def __init__(self, folder, name="teacher"):
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.tokenizer = load_tokenizer(str(folder))
        self.requests, self.lock = [], threading.Lock()
        owner = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, json.dumps({"data": [{"id": name}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/detokenize":
                    answer = {"prompt": owner.tokenizer.decode(body["tokens"])}
                else:
                    with owner.lock:
                        owner.requests.append(body)
                        answer = owner.complete(body)
                self.send_json(200, json.dumps(answer).encode())

        super().__init__(Handler)

    @torch.no_grad()
    def complete(self, body):
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        if body.get("prompt_logprobs") is not None:
            return {"choices": [{"index": i, "prompt_logprobs": self.scores(ids, body["prompt_logprobs"])}
                                for i, ids in enumerate(prompts)]}
        torch.manual_seed(body["seed"] % 2**32)
        ids = torch.tensor([prompts[0]])
        out = self.model.generate(ids, do_sample=body["temperature"] > 0, temperature=body["temperature"] or None,
                                  top_p=body["top_p"], max_new_tokens=body["max_tokens"],
                                  num_return_sequences=body["n"], eos_token_id=body["stop_token_ids"], pad_token_id=0)
        return {"choices": [{"index": i, "token_ids": row[ids.shape[1]:].tolist()} for i, row in enumerate(out)]}

    def scores(self, ids, k):
        logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        positions = [None]
        for j in range(1, len(ids)):
            row = logprobs[j - 1]
            ranks = {int(t): r + 1 for r, t in enumerate(torch.argsort(row, descending=True, stable=True)[:k])}
            ranks.setdefault(ids[j], int((row > row[ids[j]]).sum()) + 1)
            positions.append({str(t): {"logprob": float(row[t]), "rank": r} for t, r in ranks.items()})
        return positions
