"""The words both sides of a trial agree on: data formats and their roles, metric names and directions, the
keys a trial reports and the layout of its checkpoints.

Why a module of its own, at the bottom: the spec validates against these names, the trial side writes them
and the driver reads them back. Keeping them here (pure Python, no imports of ours) lets ``spec.py`` and
``orchestrator/tracking.py`` use them without importing the training code, and keeps the import graph one-way.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

# --- data ---

DataFormat = Literal["prompt_completion", "math", "classification", "qa", "instruction", "chat", "code"]
# Which assistant turns of a chat row carry loss: every one, or only the last (the one evaluation generates).
ChatLoss = Literal["all_assistant", "last_assistant"]
BUILTIN_PREFIX = "builtin:"  # task strings naming a packaged task, e.g. "builtin:arith-sub"
HF_PREFIX = "hf:"  # task strings naming a Hugging Face Hub dataset, e.g. "hf:openai/gsm8k:main"


class Role(NamedTuple):
    """One input column of a format: its default name (``fields`` may rename it) and whether it must exist."""

    column: str
    required: bool


FORMAT_ROLES: dict[str, dict[str, Role]] = {
    "prompt_completion": {"prompt": Role("prompt", True), "completion": Role("completion", True)},
    # The completion is the whole answer, reasoning included; the metric extracts the number after "####".
    "math": {"question": Role("question", True), "answer": Role("answer", True)},
    # A label may be a string, int or bool (written as str(label): 1 -> "1", True -> "True").
    "classification": {"text": Role("text", True), "label": Role("label", True)},
    # answers: a string, a list of strings, or SQuAD's {"text": [...], "answer_start": [...]}; the first
    # answer is the training completion, all of them are references.
    "qa": {
        "question": Role("question", True),
        "context": Role("context", False),
        "answers": Role("answers", True),
    },
    "instruction": {
        "instruction": Role("instruction", True),
        "input": Role("input", False),
        "output": Role("output", True),
    },
    # A conversation, per row either OpenAI-style [{"role", "content"}] (system/user/assistant) or ShareGPT
    # [{"from", "value"}] (system/human/gpt); it ends with the assistant turn that evaluation generates.
    "chat": {"messages": Role("messages", True)},
    # tests (assert statements, a string or a list of strings) are optional for training but needed by the
    # pass@k metric: see formats.has_tests().
    "code": {
        "prompt": Role("prompt", True),
        "completion": Role("completion", True),
        "tests": Role("tests", False),
    },
}
FORMATS: tuple[str, ...] = tuple(FORMAT_ROLES)

# --- metrics ---

ALWAYS: tuple[str, ...] = ("eval_loss",)
# Metric keys are MLflow metric names, hence "pass_at_k" rather than "pass@k". A format's first metric is its
# default search.metric. Free text (qa, instruction, chat) defaults to token F1: exact match scores a right
# answer worded differently as 0, so it stays flat until late in training and separates LRs poorly.
FORMAT_METRICS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("exact_match", "number_match", "token_f1"),
    "math": ("number_match", "exact_match"),
    "classification": ("accuracy", "macro_f1"),
    "qa": ("token_f1", "exact_match"),
    "instruction": ("token_f1", "exact_match"),
    "chat": ("token_f1", "exact_match"),
    "code": ("pass_at_k", "exact_match"),
}
LOWER_IS_BETTER: frozenset[str] = frozenset({"eval_loss", "forgetting"})


def metric_names(fmt: str) -> tuple[str, ...]:
    """Metrics a spec may optimise for data format ``fmt``: the format's task metrics plus ``eval_loss``."""
    try:
        return FORMAT_METRICS[fmt] + ALWAYS
    except KeyError:
        raise ValueError(f"unknown data format {fmt!r}; known: {sorted(FORMAT_METRICS)}") from None


def direction(metric: str) -> Literal["max", "min"]:
    """Whether a higher or a lower value of ``metric`` is better."""
    return "min" if metric in LOWER_IS_BETTER else "max"


# --- what a trial reports ---

STEP = "step"  # optimizer steps done at this report; Tune's and ASHA's time attribute
NODE_KEY, HOST_KEY = "node_id", "host"  # the Ray node and host of the reporting (rank-0) process
FAILURE_KEY = "failure"  # a trial that cannot go on says why (one line); the driver marks it failed
CHECKPOINT_PATH_KEY = "checkpoint_path"  # Ray Train's TuneReportCallback puts the checkpoint's path here
DIVERGED, OOM = "diverged", "oom"  # 1.0 when the trial stopped for that reason
# Everything a trial reports besides its format's task metrics; the driver logs those present.
TRIAL_METRICS: tuple[str, ...] = (
    "eval_loss",
    "train_loss",
    "lr",
    DIVERGED,
    OOM,  # the trial ran out of memory (failed, worst score; not retried)
    "trainable_params",
    "resumed_from_step",  # > 0: a lost worker was restarted from that step's checkpoint
    "adapter_bytes",
    "general_loss",  # forgetting check (spec.forgetting)
    "forgetting",
    "forgetting_violated",
    "perturbed_fraction",  # SL-SAM
    "tau",  # gradual objective
    "tokens_per_s",
    "setup_s",  # the trial's start to its first training step: base model, adapter, data, engine
    "peak_memory_mb",  # GPU only
)


def trial_metric_names(fmt: str) -> tuple[str, ...]:
    """Every metric name a trial on data format ``fmt`` can report: task metrics (validation and test), the
    rest of `TRIAL_METRICS`."""
    task = metric_names(fmt)
    return tuple(dict.fromkeys((*task, *TRIAL_METRICS, *(f"test_{m}" for m in task))))


# --- checkpoints ---

# A checkpoint holds the exported adapter at its top level (what MLflow logs) and the resume state below this
# subdirectory (optimizer moments, RNG, data position): never part of the product.
TRAINER_STATE = "trainer_state"

# --- how a trial ran ---

# a search trial (Optuna's) or a confirmation re-run of a top configuration with another seed
TrialRole = Literal["search", "confirm"]
Outcome = Literal["running", "completed", "stopped_early", "pruned", "diverged", "failed", "killed"]
