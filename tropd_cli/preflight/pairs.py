"""Preflight checks of the pair: do the teacher's and the student's tokenizers agree, and can the prompts be read?

Read from tokenizers and model configs alone (no weights):

- vocabulary: the tokenizers' token -> id maps must be equal. Embedding rows are not compared: padded
  vocabularies differ inside one family (Qwen2.5: 151936 vs 152064 rows for the same tokenizer); each
  model only needs at least as many rows as its tokenizer has tokens;
- EOS and pad tokens: a student that stops on another token than the teacher learns never to stop;
- chat template: prompts are formatted with the student's template and scored by the teacher, so both
  must have one and it must be the same; and whether the templates read `enable_thinking`;
- prompts: a prepared folder must have been made with the student's tokenizer.

Each check returns a `Check`; none prints or raises. Kept apart from `memory.py` because these checks
compare two tokenizers, while the memory model sizes one run.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from tropd_cli.config import RunConfig
from tropd_cli.data import is_generator
from tropd_cli.data.prepared import PreparedFolder
from tropd_cli.data.rows import template_reads_thinking
from tropd_cli.engine.objectives import get_objective
from tropd_cli.errors import TropdError
from tropd_cli.models import check_safetensors


@dataclass
class Check:
    """One preflight result: what was found, and the one-line error or warning if any."""

    name: str
    detail: str
    error: str | None = None
    warning: str | None = None

    @property
    def status(self) -> str:
        return "fail" if self.error else "warn" if self.warning else "ok"


def special_token_check(label: str, teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                        attribute: str) -> Check:
    """The teacher's and the student's `eos`/`pad` token must be the same token with the same id."""
    tokens = [getattr(tok, f"{attribute}_token") for tok in (teacher, student)]
    ids = [getattr(tok, f"{attribute}_token_id") for tok in (teacher, student)]
    if tokens[0] == tokens[1] and ids[0] == ids[1]:
        return Check(f"{label} token", f"{tokens[0]!r} (id {ids[0]})")
    same_token = tokens[0] == tokens[1]  # then only the ids differ: show them
    teacher_text, student_text = (f"{token!r} (id {token_id}, {role})" if same_token else f"{token!r} ({role})"
                                  for token, token_id, role in zip(tokens, ids, ("teacher", "student")))
    return Check(f"{label} token", "differ",
                 error=f"teacher and student {label} tokens differ: {teacher_text} vs {student_text}")


def vocabulary_check(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> Check:
    """Equal token -> id maps (added tokens included); the error names the first token that differs."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab == student_vocab:
        return Check("vocabulary", f"{len(teacher_vocab)} tokens, identical")
    differing = [token for token in teacher_vocab.keys() | student_vocab.keys()
                 if teacher_vocab.get(token) != student_vocab.get(token)]
    token = min(differing, key=lambda t: (min(i for i in (teacher_vocab.get(t), student_vocab.get(t))
                                              if i is not None), t))

    def where(vocab: dict[str, int]) -> str:
        return f"id {vocab[token]}" if token in vocab else "absent"

    return Check("vocabulary", "differ", error=(
        f"teacher and student vocabularies differ: {len(teacher_vocab)} tokens (teacher) vs "
        f"{len(student_vocab)} tokens (student); first difference {token!r}: {where(teacher_vocab)} (teacher) "
        f"vs {where(student_vocab)} (student)"))


def embedding_check(tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase],
                    configs: tuple[PretrainedConfig, PretrainedConfig]) -> Check:
    """Each model needs an embedding row for every token of its tokenizer; padding rows may differ."""
    rows = [config.get_text_config().vocab_size for config in configs]
    detail = f"{rows[0]} (teacher), {rows[1]} (student)"
    for role, tokenizer, row_count in zip(("teacher", "student"), tokenizers, rows):
        if len(tokenizer) > row_count:
            return Check("embedding rows", detail, error=(
                f"the {role} tokenizer has more tokens than its model has embedding rows: {len(tokenizer)} "
                f"(tokenizer) vs {row_count} (model)"))
    return Check("embedding rows", detail)


def _template_text(template: str | dict | None) -> str | None:
    if isinstance(template, dict):  # named templates: compare them all, in a stable order
        return "\n".join(f"{name}: {text}" for name, text in sorted(template.items()))
    return template


def chat_template_check(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                        allow_mismatch: bool = False) -> Check:
    """Both tokenizers have a chat template, and it is the same (a difference only warns when
    `allow_mismatch`, teacher.allow_template_mismatch)."""
    texts = [_template_text(tok.chat_template) for tok in (teacher, student)]
    if texts[0] is not None and texts[0] == texts[1]:
        return Check("chat template", f"identical ({len(texts[0])} characters)")
    if texts[0] is None or texts[1] is None:
        described = ["missing" if text is None else f"{len(text)} characters" for text in texts]
        who = "teacher and student tokenizers have" if texts[0] is None and texts[1] is None else \
            f"the {'teacher' if texts[0] is None else 'student'} tokenizer has"
        return Check("chat template", "missing", error=(
            f"{who} no chat template: {described[0]} (teacher) vs {described[1]} (student)"))
    at = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(map(len, texts)))
    snippets = [text[max(0, at - 10):at + 20] for text in texts]
    message = (f"teacher and student chat templates differ at character {at}: {snippets[0]!r} (teacher) vs "
               f"{snippets[1]!r} (student)")
    if allow_mismatch:
        return Check("chat template", "differ", warning=f"{message} (allowed by teacher.allow_template_mismatch)")
    return Check("chat template", "differ", error=message)


def tokenizer_checks(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                     configs: tuple[PretrainedConfig, PretrainedConfig], allow_template_mismatch: bool = False
                     ) -> list[Check]:
    """Vocabulary, embedding rows, EOS, pad and chat template, in that order."""
    return [vocabulary_check(teacher, student), embedding_check((teacher, student), configs),
            special_token_check("EOS", teacher, student, "eos"), special_token_check("pad", teacher, student, "pad"),
            chat_template_check(teacher, student, allow_template_mismatch)]


def thinking_check(config: RunConfig, teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> Check:
    """Which templates read `enable_thinking`; data.thinking on a student template that ignores it warns."""
    reads = [template_reads_thinking(tok) for tok in (teacher, student)]
    detail = (f"enable_thinking read by the template: {'yes' if reads[0] else 'no'} (teacher), "
              f"{'yes' if reads[1] else 'no'} (student); data.thinking: "
              f"{'template default' if config.data.thinking is None else str(config.data.thinking).lower()}")
    if config.data.thinking is not None and not reads[1]:
        return Check("thinking mode", detail, warning=f"data.thinking={str(config.data.thinking).lower()} has no "
                     "effect: the student's chat template does not read enable_thinking")
    return Check("thinking mode", detail)


def prompts_check(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[Check, PreparedFolder | None]:
    """The prompt source: the toy tasks, or a prepared folder made with the student's tokenizer (returned
    when usable, so that the other checks read it once)."""
    if is_generator(config.data.prompts):
        return Check("prompts", "toy tasks (built-in generator)"), None
    try:
        folder = PreparedFolder.open(config.data.prompts)
        folder.check_tokenizer(tokenizer, config.student.model)
    except TropdError as error:
        return Check("prompts", "unusable", error=str(error)), None
    counts = folder.manifest.get("counts", {})
    drafts = "with teacher drafts" if folder.drafts is not None else "no teacher drafts"
    return Check("prompts", f"{config.data.prompts}: {counts.get('train', '?')} train prompts, {drafts}"), folder


def objective_check(config: RunConfig, configs: tuple[PretrainedConfig, PretrainedConfig]) -> Check:
    """The objective's teacher top-k must fit the student's vocabulary head (the teacher's forward pass
    returns everything an objective can need of the teacher)."""
    spec = get_objective(config.objective.name)
    top_k, rows = spec.top_k(config.objective), configs[1].get_text_config().vocab_size
    if top_k > rows:
        return Check("objective", spec.name, error=f"objective.{spec.top_k_option}={top_k} is larger than the "
                     f"vocabulary ({rows} tokens)")
    return Check("objective", f"{spec.name}, teacher top-{top_k}")


def weights_check(config: RunConfig) -> Check:
    """Both models must have safetensors weights: tropd never unpickles weights (a pickle-only folder is
    refused here, with how to convert it, as distill's loader would refuse it). A served teacher's weights are the
    server's concern."""
    sections = (("teacher", config.teacher), ("student", config.student))
    for role, section in sections[config.teacher.backend == "server":]:
        try:
            check_safetensors(section.model)
        except TropdError as error:
            return Check("weights", "pickle only", error=f"{role} {error}")
    return Check("weights", "safetensors")


def sampling_check(config: RunConfig) -> Check:
    """Rollouts sampled at a temperature other than 1 or with top_p below 1 come from another policy than the
    temperature-1 log-probs that the trust test, r_t and rho_t use: a warning, not an error."""
    rollout = config.rollout
    detail = f"temperature {rollout.temperature:g}, top_p {rollout.top_p:g}"
    if rollout.temperature == 1 and rollout.top_p == 1:
        return Check("sampling", detail)
    return Check("sampling", detail, warning=(
        f"rollouts are sampled at {detail}, but r_t, rho_t and the trust test use the student's and teacher's "
        "temperature-1 log-probs (as in the paper); set rollout.temperature=1 and rollout.top_p=1 to match them"))


def engine_prompts(config: RunConfig) -> tuple[bool, bool]:
    """Whether an in-process vLLM engine generates from the training prompts (the student's rollouts, the teacher's
    samples) and from the held-out prompts (the student's answers, unless a QLoRA student's, which HF generates; the
    teacher's with eval.teacher)."""
    from tropd_cli.engine.rollout import student_eval_sampler

    teacher = config.teacher.backend == "vllm"
    held_out = config.eval.problems > 0 and (
        student_eval_sampler(config) == "vllm" or (teacher and config.eval.teacher))
    return config.rollout.backend == "vllm" or teacher, held_out


def engine_length_check(config: RunConfig, longest_training: int, longest_held_out: int | None) -> Check:
    """rollout.vllm_max_model_len must hold the longest prompt an engine is given plus rollout.max_new_tokens: vLLM
    refuses a longer prompt mid-run with its own error and cuts a response that runs past it (HF generate has no
    such limit)."""
    limit, new = config.rollout.vllm_max_model_len, config.rollout.max_new_tokens
    if limit is None:
        return Check("engine length", "the model's own maximum (rollout.vllm_max_model_len: null)")
    detail = f"rollout.vllm_max_model_len {limit}"
    for what, longest in (("training prompt", longest_training), ("held-out prompt", longest_held_out)):
        if longest is not None and longest + new > limit:
            return Check("engine length", detail, error=(
                f"rollout.vllm_max_model_len={limit} is too short for the longest {what} ({longest} tokens) plus "
                f"rollout.max_new_tokens={new}; raise it to at least {longest + new}, or null for the model's own "
                "maximum"))
    return Check("engine length", detail)


def backends_check(config: RunConfig, teacher_tokenizer: PreTrainedTokenizerBase) -> tuple[Check, str | None]:
    """The rollout and teacher backends can serve this run: vLLM is installed where one is asked for, the
    teacher backend returns what the objective needs (a served teacher gives log-probs and top-k only), and a
    teacher server answers, serves the teacher's vocabulary and gives the objective's top-k log-probs; also the
    id the server serves the teacher under (None without a server), which the run's scorer asks for."""
    from tropd_cli.engine.teacher import BACKEND_CAPABILITIES, backend_missing
    from tropd_cli.engine.vllm_engine import vllm_absent

    spec = get_objective(config.objective.name)
    model = None
    rollout, teacher = config.rollout.backend, config.teacher.backend
    detail = f"rollouts {rollout}, teacher {teacher}"
    missing = backend_missing(spec.teacher_needs(), BACKEND_CAPABILITIES[teacher])
    if missing:
        return Check("backends", detail, error=f"objective.name={spec.name} needs the teacher's {', '.join(missing)}, "
                     f"which teacher.backend={teacher} cannot return; use teacher.backend=hf"), None
    for setting in (f"rollout.backend={rollout}", f"teacher.backend={teacher}"):
        missing_vllm = vllm_absent(setting) if setting.endswith("=vllm") else None
        if missing_vllm:
            return Check("backends", detail, error=missing_vllm), model
    if teacher == "server":
        from tropd_cli.engine.teacher.server import ServerClient, api_key_from, check_server, teacher_names

        try:
            client = ServerClient(config.teacher.url, timeout_s=min(config.teacher.timeout_s, 10.0), retries=1,
                                  deadline_s=min(config.teacher.deadline_s, 30.0),
                                  api_key=api_key_from(config.teacher.api_key_env))
            names = teacher_names(config.teacher.model, config.teacher.served_model)
            model = check_server(client, teacher_tokenizer, spec.top_k(config.objective), spec.top_k_option, names)
            detail += f" ({model} at {client.url}, top-{spec.top_k(config.objective)} prompt log-probs)"
        except TropdError as error:
            return Check("backends", detail, error=str(error)), model
    if rollout == "vllm" and config.student.quantization != "none":
        # Measured on the toy lab (bench/results/qlora_vllm.md): uncorrected, 100 steps collapsed (K1 KL to the
        # teacher 1.00 with HF rollouts, 5.31 with vLLM's); with tis the KL matched and the accuracy still fell short.
        engine = ("vLLM 0.32 has no bitsandbytes loader: a QLoRA student's engine samples the unquantized base under "
                  "its adapter")
        if config.rollout.importance_correction == "none":
            return Check("backends", detail, error=f"{engine}, and without correction such runs collapsed on the toy "
                         "lab (bench/results/qlora_vllm.md); set rollout.importance_correction=tis, or "
                         "rollout.backend=hf (the student samples itself)"), model
        return Check("backends", detail, warning=f"{engine}; tis corrects the objective, but on the toy lab the "
                     "accuracy still fell short of rollout.backend=hf (bench/results/qlora_vllm.md)"), model
    return Check("backends", detail), model
