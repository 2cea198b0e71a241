"""The teacher scored by an in-process vLLM engine (`teacher.backend: vllm`).

Each prompt+response sequence goes to the engine as a token-id prompt with `prompt_logprobs=K` and
`max_tokens=1`; vLLM computes the log-softmax of every position in float32 and returns the top K and the token
there (`base.stats_from_prompt_logprobs` gathers them). The engine is started with `max_logprobs` equal to the
objective's top-k, so the request is never refused. Useful when the teacher fits beside the student only in
vLLM's memory layout, or to score with vLLM's kernels; for a teacher on another machine see `server.py`.
"""

from __future__ import annotations

from typing import Any

from tropd_cli.engine.scoring import SequenceBatch, TeacherStats
from tropd_cli.engine.teacher.base import SERVED, sequences_of, stats_from_prompt_logprobs
from tropd_cli.engine.vllm_engine import EngineOptions, start_engine


class VLLMTeacherScorer:
    """The teacher's log-probs and top-k from a vLLM engine on `model_path` (`llm` reuses a started one)."""

    provides = SERVED
    head = None

    def __init__(self, model_path: str, options: EngineOptions | None = None, llm: Any = None) -> None:
        self.llm = llm if llm is not None else start_engine(model_path, options or EngineOptions(sleep=False),
                                                            "teacher.backend=vllm")

    def score(self, batch: SequenceBatch, top_k: int, keep_hidden: bool = False) -> TeacherStats:
        """tau_t and the top-k per response token (`keep_hidden` has no meaning here: no full logits)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sequences = sequences_of(batch)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in sequences], params,
                                    use_tqdm=False)
        per_sequence = [[None if position is None else {token: (value.logprob, value.rank)
                                                        for token, value in position.items()}
                         for position in output.prompt_logprobs] for output in outputs]
        return stats_from_prompt_logprobs(batch, per_sequence, top_k)
