"""Rollouts with an in-process vLLM engine colocated with training (`rollout.backend: vllm`).

The engine holds its own copy of the student, so `sync` hands it the new weights after every optimizer step,
through vLLM's supported paths only:

- a full student: `collective_rpc("reload_weights", weights_iterator=...)` with the training model's
  state dict (calling the model's `load_weights` after start-up is not supported and fails), then a
  prefix-cache reset, since cached KV blocks belong to the old weights;
- a LoRA or QLoRA student: the adapter is saved to a folder the backend owns and loaded once, with
  `add_lora(LoRARequest(..., load_inplace=True))`; the rollouts' requests then name it without `load_inplace`
  (with it, the engine reads the folder again at every decoding step). Without `load_inplace` an adapter id
  vLLM has seen keeps its old weights, silently (tests pin it). vLLM 0.32 has no bitsandbytes loader, so a
  QLoRA student's engine runs the base model unquantized in `dtype` under the same adapter:
  `sampler_logprob_gap` shows the difference and `rollout.importance_correction: tis` corrects for it.

On CUDA with `sleep`, the engine sleeps between rollouts: its KV cache is dropped and its weights are offloaded
(LoRA: the base stays needed, level 1) or dropped (full: `sync` rewrites them anyway, level 2); `sync` and
`generate` wake what they need. On a CPU sleep mode is a no-op in vLLM, so it is not asked for.

The engine (started by `engine/vllm_engine.py`) runs in this process, so `reload_weights` receives the
training tensors by reference instead of through a pipe. Responses and `finished` follow `HFGenerateBackend`:
cut after the first stop id (kept), finished when one was found; each response also carries vLLM's log-prob
of every sampled token (raw, before temperature and top-p, as the trainer scores them) for
`sampler_logprob_gap` and truncated importance sampling.
"""

from __future__ import annotations

import gc
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tropd_cli.engine.rollout.base import Rollouts, SamplingParams, cut_at_eos
from tropd_cli.engine.vllm_engine import EngineOptions, shut_down_engine, start_engine, unwritten_weights
from tropd_cli.errors import TropdError

ADAPTER_NAME, ADAPTER_ID = "tropd-student", 1


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter whole: an FSDP2 shard (a DTensor) gathered from every rank (each rank calls this in the same
    order), any other tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


class VLLMRolloutBackend:
    """Rollouts from a vLLM engine on `model_path`, kept equal to `model` by `sync`.

    `adapter` says the student trains LoRA adapters (a peft model whose `save_pretrained` writes only the
    adapter). `llm` reuses a started engine (tests share one per module; the teacher's scorer lends its engine
    to sample the teacher). The engine is synced to `model` at once, so that a resumed or re-typed student is
    what samples from the first step; `model` None samples the engine's own frozen weights (the teacher, or a
    model being evaluated, under its saved LoRA adapter when `adapter_path` names one). `setting` is the option
    a missing vLLM is named by.
    """

    def __init__(self, model_path: str, model: torch.nn.Module | None, eos_token_ids: list[int],
                 options: EngineOptions | None = None, adapter: bool = False, llm: Any = None,
                 adapter_path: str | None = None, setting: str = "rollout.backend=vllm") -> None:
        options = options or EngineOptions()
        self.eos_token_ids = list(eos_token_ids)
        self.llm = llm if llm is not None else start_engine(model_path, options, setting)
        self.evaluates = setting == "--backend vllm"  # `tropd evaluate`'s engine: the model's own length
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="tropd-adapter-")) if adapter else None
        self.lora_request: Any = None
        if adapter_path is not None:  # a frozen model's saved adapter, loaded by the first request that names it
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, adapter_path)
        self.sleeps = options.sleep and torch.cuda.is_available()
        self.asleep: set[str] = set()  # the engine's released tags: weights, kv_cache
        if model is not None:
            self.sync(model)

    def close(self) -> None:
        """Remove the adapter folder (the engine goes with the process)."""
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)

    def shut_down(self) -> None:
        """Stop the engine and free its weights and KV cache now, for a process that starts another engine after
        this one (evaluate, model after model)."""
        self.close()
        llm, self.llm = self.llm, None
        shut_down_engine(llm)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _wake(self, tags: list[str]) -> None:
        wanted = [tag for tag in tags if tag in self.asleep]
        if wanted:
            self.llm.wake_up(tags=wanted)
            self.asleep -= set(wanted)

    def _sleep(self) -> None:
        if self.sleeps:
            self.llm.sleep(level=1 if self.adapter_dir is not None else 2)
            self.asleep = {"weights", "kv_cache"}

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """Give the engine `model`'s current weights (the adapter, for a LoRA student)."""
        from vllm.lora.request import LoRARequest

        self._wake(["weights"])
        if self.adapter_dir is not None:
            adapter = {name: whole(tensor) for name, tensor in model.named_parameters() if "lora_" in name}
            model.save_pretrained(str(self.adapter_dir), state_dict=adapter)
            # Loaded once here, in place of the old one; the requests then name the loaded adapter. (A request
            # with load_inplace would have the engine read the folder again on every decoding step.)
            self.llm.llm_engine.add_lora(LoRARequest(ADAPTER_NAME, ADAPTER_ID, str(self.adapter_dir),
                                                     load_inplace=True))
            self.lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, str(self.adapter_dir))
        else:
            state = model.state_dict()
            weights = ((name, whole(tensor).detach()) for name, tensor in state.items())  # one whole tensor at a time
            with unwritten_weights() as missing:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            if missing:
                names = sorted(missing)
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                raise TropdError(f"the vLLM engine's weights {', '.join(names[:3])}{more} got no value from the "
                                 f"student's {len(state)} tensors in the sync, and would sample stale weights; the "
                                 "student's parameter names do not match the engine's model")
        if "kv_cache" not in self.asleep:
            self.llm.reset_prefix_cache()

    def check_fits(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        """Every prompt plus `max_new_tokens` must fit the engine's max_model_len: vLLM refuses a longer prompt with
        its own error and stops a response at the limit, shorter than HF generate would let it run."""
        limit = self.llm.model_config.max_model_len
        longest = max(map(len, prompt_ids), default=0)
        if longest + max_new_tokens <= limit:
            return
        what = f"a prompt of {longest} tokens plus {max_new_tokens} new tokens does not fit the vLLM engine's " \
               f"max_model_len of {limit}"
        if self.evaluates:
            raise TropdError(f"{what}, the model's own maximum; " + (
                f"pass --max-new-tokens {limit - longest} or fewer" if longest < limit else
                "the prompt alone is too long for the model"))
        raise TropdError(f"{what} (rollout.vllm_max_model_len, or the model's own maximum when that is null); allow "
                         f"at least {longest + max_new_tokens}, or fewer new tokens")

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 generator_seed: int) -> Rollouts:
        """`n` responses per prompt, prompt-major (temperature 0: one greedy response repeated n times, since
        vLLM refuses greedy sampling with n > 1). Each prompt gets its own seed drawn from `generator_seed`."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        self.check_fits(prompt_ids, params.max_new_tokens)
        self._wake(["weights", "kv_cache"])
        greedy = params.temperature == 0
        draws = 1 if greedy else n
        seeds = random.Random(generator_seed)
        sampling = [VLLMSamplingParams(
            n=draws, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens, seed=seeds.getrandbits(63), stop_token_ids=self.eos_token_ids,
            logprobs=0, detokenize=False) for _ in prompt_ids]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], sampling,
                                    use_tqdm=False, lora_request=self.lora_request)
        self._sleep()
        prompt_index, responses, finished, logprobs = [], [], [], []
        for index, output in enumerate(outputs):
            completions = sorted(output.outputs, key=lambda completion: completion.index)
            for completion in completions * (n if greedy else 1):
                response, done = cut_at_eos(list(completion.token_ids), self.eos_token_ids)
                prompt_index.append(index)
                responses.append(response)
                finished.append(done)
                logprobs.append([position[token].logprob
                                 for position, token in zip(completion.logprobs, response)])
        return Rollouts(prompt_ids=list(prompt_ids), prompt_index=prompt_index, response_ids=responses,
                        finished=finished, logprobs=logprobs)
