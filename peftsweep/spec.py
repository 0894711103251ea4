"""The sweep spec: a YAML file validated by pydantic models.

Every default of a sweep lives here, once, with its reason. Validation errors name the field path
(``methods.1.lr_max: …``) and nothing starts on a bad spec. Heavy libraries are not imported here, so
``peftsweep --help`` and validation stay fast.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from peftsweep import search_spaces
from peftsweep.vocab import FORMAT_ROLES, ChatLoss, DataFormat, direction, metric_names


class SpecError(ValueError):
    """A spec that cannot be used; the message lists every problem with its field path."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. NaN and ±inf are errors too:
    # `.inf` is valid YAML, passes `gt=0`, and would only fail inside Optuna or a trial.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _ints_fit_64_bits(cls, value: Any) -> Any:
        # YAML ints are unbounded; a huge one would pass `gt=0` and overflow only inside a trial.
        if _beyond_int64(value):
            raise ValueError("integers must lie in [-2**63, 2**63) (torch, Ray and tokenizers take C int64)")
        return value


def _beyond_int64(value: Any) -> bool:
    """Whether ``value`` is, or a list/tuple/dict value holds, an int that a C int64 cannot take."""
    if isinstance(value, int):
        return not -(2**63) <= value < 2**63
    if isinstance(value, list | tuple):
        return any(_beyond_int64(v) for v in value)
    if isinstance(value, dict):
        return any(_beyond_int64(v) for v in value.values())
    return False


# Every int field is strict: YAML `true` is not 1 (`max_steps: true` would train one step) and `1.5` is not 1.
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
# Optuna's TPE sampler seeds numpy, which takes [0, 2**32); torch takes that range too.
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]


def _fields_fit_format(fields: dict[str, str], info: ValidationInfo) -> dict[str, str]:
    """``fields`` maps roles of the section's ``format`` to non-empty column names."""
    fmt = info.data.get("format")
    if fmt is None:  # the format itself is invalid and reported under its own name
        return fields
    unknown = sorted(set(fields) - set(FORMAT_ROLES[fmt]))
    if unknown:
        raise ValueError(f"format {fmt!r} has no role {unknown}; its roles are {list(FORMAT_ROLES[fmt])}")
    empty = sorted(role for role, column in fields.items() if not column)
    if empty:
        raise ValueError(f"role(s) {empty} need a non-empty column name")
    return fields


class DataSpec(_Strict):
    """Where the task's examples come from and how their columns map onto the format's roles."""

    # builtin:NAME, a .json/.jsonl/.csv/.parquet file, a directory of split files, or hf:<dataset id>[:config]
    task: str = "builtin:arith-sub"  # the built-in CPU task on which LR matters
    format: DataFormat = "prompt_completion"  # decides the prompt template and the task metrics
    fields: dict[str, str] = Field(default_factory=dict)  # role -> column name; unset roles: format defaults
    # train/validation/test fractions when the task is one file; 80/10/10 is the fine-tuning guide's default
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: Seed = 0  # the split is a pure function of this seed and the data
    max_eval_examples: PositiveInt = 200  # greedy-generation eval cost per eval point; 200 → 0.5 % resolution
    # chat: every assistant turn is a target (what chat SFT trainers do; a multi-turn row teaches all its
    # answers), or last_assistant: only the final one (templates that rewrite earlier turns, e.g. Qwen3's)
    chat_loss: ChatLoss = "all_assistant"
    # Largest row of a local file (a JSONL line, a CSV record's cells, a JSON/Parquet row as JSON), also for
    # the forgetting data. 1 MiB is ~2000× the default max_length of 512 tokens: a longer row is a broken
    # export (a whole file on one line), and training would tokenize all of it only to truncate it.
    max_row_bytes: PositiveInt = 2**20

    _check_fields = field_validator("fields")(_fields_fit_format)

    @model_validator(mode="after")
    def _split_is_a_partition(self) -> DataSpec:
        if any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0:
            raise ValueError(
                f"split {list(self.split)} must be 3 non-negative fractions summing to 1, train > 0"
            )
        return self


class ForgettingSpec(_Strict):
    """General held-out data whose loss is measured before and after fine-tuning (the forgetting check)."""

    task: str  # same kinds of source as data.task, e.g. builtin:arith-add (the base's own skill)
    format: DataFormat = "prompt_completion"
    fields: dict[str, str] = Field(default_factory=dict)
    max_examples: PositiveInt = 200  # one teacher-forced pass per eval point; cheap next to generation
    # Constraint: a trial whose general loss rises by more than this scores as the worst. None: log only
    max_increase: PositiveFloat | None = None

    _check_fields = field_validator("fields")(_fields_fit_format)


class EvalSpec(_Strict):
    """How eval points generate answers (batched; greedy unless several samples per prompt are asked for)."""

    batch_size: PositiveInt = 64  # prompts generated at once; bounded by memory of long generations
    max_new_tokens: PositiveInt | None = None  # None: longest reference + 1, enough to see EOS after it
    samples: PositiveInt = 1  # generations per prompt; 1 = greedy decoding
    temperature: PositiveFloat = 0.8  # sampling temperature when samples > 1 (Codex paper's pass@k setting)
    pass_k: PositiveInt = 1  # k of pass@k (code format); needs samples >= k
    code_timeout_s: PositiveFloat = 5.0  # per generated program; an endless loop scores as a failure
    code_memory_mb: PositiveInt = 512  # address-space limit of a generated program

    @model_validator(mode="after")
    def _k_fits_samples(self) -> EvalSpec:
        if self.pass_k > self.samples:
            raise ValueError(f"pass_k ({self.pass_k}) needs samples >= pass_k (samples is {self.samples})")
        return self


class MethodSpec(_Strict):
    """One PEFT method and its search space; unset ranges fall back to the method's registry defaults."""

    name: str
    lr_min: PositiveFloat | None = None  # None: the method's default range (search_spaces registry)
    lr_max: PositiveFloat | None = None
    ranks: list[PositiveInt] | None = None  # None: the method's default rank choices
    alpha_over_rank: PositiveFloat = 1.0  # paper protocol: alpha = r
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # paper protocol: no adapter dropout
    target_modules: str | list[str] = "all-linear"  # paper protocol: every linear projection, not lm_head
    options: dict[str, Any] = Field(
        default_factory=dict
    )  # method-specific knobs, checked against the registry

    @field_validator("target_modules")
    @classmethod
    def _targets_named(cls, value: str | list[str]) -> str | list[str]:
        # PEFT would only refuse a blank target inside the trial.
        names = [value] if isinstance(value, str) else value
        if not names or not all(n.strip() for n in names):
            raise ValueError("name at least one module, none blank (default: all-linear)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        # `methods: [lora, pissa]` is shorthand for `[{name: lora}, {name: pissa}]`.
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fill_from_registry(self) -> MethodSpec:
        try:
            method = search_spaces.get_method(self.name)
        except KeyError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        options = method.merged_options(self.options)  # unknown knobs raise ValueError, naming them
        lr_min = self.lr_min if self.lr_min is not None else method.lr_range[0]
        lr_max = self.lr_max if self.lr_max is not None else method.lr_range[1]
        if lr_min >= lr_max:
            raise ValueError(f"lr_min ({lr_min:g}) must be below lr_max ({lr_max:g})")
        if not method.uses_rank:
            if self.ranks:
                raise ValueError(f"method {self.name!r} has no rank; remove 'ranks'")
            ranks: list[int] = []
        else:
            ranks = self.ranks if self.ranks is not None else list(method.ranks)
            if not ranks:
                raise ValueError("ranks must list at least one rank")
        object.__setattr__(self, "lr_min", lr_min)
        object.__setattr__(self, "lr_max", lr_max)
        object.__setattr__(self, "ranks", sorted(set(ranks)))
        object.__setattr__(self, "options", options)
        return self


class SearchSpec(_Strict):
    """How each method's study searches."""

    # The numbers below are what bench/search_sim.py measured best on the built-in task's ground-truth grid
    # (bench/README.md, "search_sim": each method's optimum found in 89.5-100 % of 200 replays, the grid's
    # verdict in 100 %, at ~1/10 of the grid's compute).
    # bracket: start-up LRs spread evenly over the log range, then halve the gap around the best LR until
    # worse neighbours close it on both sides (the LR response is unimodal with a cliff just above the peak);
    # tpe: Optuna's TPE after the same start-up (nightly runs, which continue the studies, use TPE).
    strategy: Literal["bracket", "tpe"] = "bracket"
    trials_per_method: PositiveInt = 8  # a cap: bracketing stops a method once its optimum is bracketed
    seed: Seed = 0  # seeds each method's sampler (start-up offset, TPE), so a sweep is repeatable
    metric: str | None = None  # None: the data format's main metric (exact_match for prompt_completion)
    mode: Literal["max", "min"] | None = None  # None: min for losses (eval_loss, forgetting), else max
    n_startup_trials: PositiveInt = 3  # spread a decade apart over a 3-decade range; 4 costs +15 %, no gain
    # bracket: LRs on a log grid of this many points over [lr_min, lr_max] (the paper protocol's 12, ~4 per
    # decade): a proposal snaps to an untried grid LR, so "bracketed" means both grid neighbours are worse.
    # None: continuous LRs.
    lr_grid: Annotated[int, Strict(), Field(ge=2)] | None = 12
    bracket_resolution: PositiveFloat = 0.3  # decades (at least one grid step): worse neighbours within it
    # Once bracketed, also try the other ranks at the best LR. Off: on the built-in task the largest rank is
    # never worse at a method's peak (rank matters far less than LR), and checking costs ~12 % more steps.
    check_ranks: bool = False
    early_stopping: Literal["asha", "none"] = "asha"  # ASHA stops hopeless LRs at early eval points
    # ASHA's rung signal. eval_loss separates LRs long before exact match does (which is ~0 at step 25);
    # None: the search metric. The study itself always optimises `metric`; stopped trials are PRUNED there.
    rung_metric: str | None = "eval_loss"
    grace_period_evals: PositiveInt = 1  # the first rung at the first eval point (step 25 by default)
    # ASHA keeps the top 1/reduction_factor at each rung; 1.5 keeps the peak (2 lost DoRA's in 22 % of runs)
    reduction_factor: float = Field(1.5, gt=1.0)
    # Multi-seed confirmation: each method's top-k configs re-run with extra seeds (training.seed + 1, ...),
    # raced: after each seed only the best 1/confirm_eta go on. A method's score is the mean over seeds of
    # its best config, and only configs with the most seeds compete (scoring.py). top-2 × 2 more seeds: the
    # chosen config stands on 3 seeds (paper protocol); top-1 missed LoRA's and DoRA's optimum in ~1/4.
    confirm_seeds: NonNegativeInt = 2
    confirm_top_k: PositiveInt = 2
    confirm_eta: float = Field(1.0, ge=1.0)
    # Welch's two-sided test over seeds decides "worse" vs "tie" against the best method (scoring.verdicts)
    verdict_alpha: float = Field(0.05, gt=0.0, lt=1.0)
    # A method whose first K search trials all fail with the same error stops (the sweep goes on with the
    # other methods): a systematic failure — a bad path, a base that does not fit — would only repeat for
    # the rest of its budget. None: never stop a method early.
    stop_after_failures: PositiveInt | None = 3
    # Start later methods where the reference (lora, else the first method) predicts: none | curvature (centre
    # the range at ref best LR × λ_ref/λ_method) | transfer (enqueue earlier bests, LR scaled by that ratio).
    lr_prior: Literal["none", "curvature", "transfer"] = "none"
    # Budgets beyond trials_per_method; when one is spent no new trial starts, running ones finish and report.
    max_wall_time_s: PositiveFloat | None = None  # whole sweep; split evenly over the methods still to run
    max_trial_seconds_per_method: PositiveFloat | None = None  # summed trial durations per method
    # The new best replaces the registered champion only if it wins by more than this (metric units) on the
    # same held-out rows; 0 = any strict improvement. Nightly sweeps: set it to the metric's seed noise.
    promotion_margin: NonNegativeFloat = 0.0

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or direction(self.metric or "")


class SamSpec(_Strict):
    """SAM / SL-SAM knobs (arXiv 2602.09395 defaults)."""

    rho: PositiveFloat = 0.01  # perturbation radius ρ
    sparsity: float = Field(0.2, gt=0.0, le=1.0)  # fraction of parameter tensors perturbed per step (sl_sam)
    bandit_lr: PositiveFloat = 1e-3  # EXP3 step size of the tensor-choosing bandit
    min_prob: float = Field(1e-3, gt=0.0, lt=1.0)  # floor of every tensor's selection probability


class GradualSpec(_Strict):
    """Gradual fine-tuning: the target anneals from the base model's distribution to the data's."""

    tau0: float = Field(0.0, ge=0.0, le=1.0)  # weight of the data at step 0; 0 = start from the base model
    anneal_fraction: float = Field(0.5, ge=0.0, le=1.0)  # τ reaches 1 after this fraction of the steps
    schedule: Literal["linear", "cosine"] = "linear"


class TrainingSpec(_Strict):
    """The per-trial training recipe (shared by every method, so comparisons are fair)."""

    max_steps: PositiveInt = 150  # optimizer steps; built-in task: best LRs reach ~0.7-0.9, 300 saturates
    batch_size: PositiveInt = 32  # micro-batch per worker; the built-in task is tuned for 32
    # examples per optimizer step over all workers; None: batch_size × workers (no gradient accumulation)
    global_batch_size: PositiveInt | None = None
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)  # paper protocol: 3 % warmup
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # paper protocol: cosine decay
    weight_decay: NonNegativeFloat = 0.0  # paper protocol
    max_grad_norm: NonNegativeFloat = 1.0  # HF Trainer default, used by the paper's code; 0 disables clipping
    max_length: PositiveInt = 512  # paper protocol; tokens beyond are truncated
    # eval + adapter checkpoint every N steps; ASHA's rungs are eval points, and the built-in task's loss
    # separates LRs by step 25
    eval_every: PositiveInt = 25
    keep_checkpoints: PositiveInt = 2  # best k checkpoints per trial (search metric); the last is kept too
    seed: Seed = 0  # seeds data order and adapter init of every trial (confirmation: seed + 1, + 2, ...)
    divergence_factor: PositiveFloat = 10.0  # loss above this × the first loss (or NaN/inf) → diverged, stop
    optimizer: Literal["adamw", "sam", "sl_sam"] = "adamw"  # paper protocol: AdamW
    sam: SamSpec = SamSpec()  # used by sam (every tensor perturbed) and sl_sam
    objective: Literal["cross_entropy", "gradual"] = "cross_entropy"
    gradual: GradualSpec = GradualSpec()  # used by objective: gradual
    # auto: plain torch AdamW at world size 1 (same losses as DeepSpeed, 1.14-1.18× its tokens/s measured
    # by bench/throughput.py, no JIT-op lock), DeepSpeed where it does something: several workers, ZeRO-3,
    # offload, bf16/fp16. torch | deepspeed force one (torch only with one worker per trial).
    engine: Literal["auto", "torch", "deepspeed"] = "auto"
    # Recompute each block's activations in the backward pass instead of keeping them: the kept activations
    # shrink to one per block, which is what lets a big base or long rows fit, for one more forward pass per
    # step. Off: the built-in tiny model needs no saving. Same losses either way.
    gradient_checkpointing: bool = False
    # The base's attention kernel (from_pretrained's attn_implementation). None: transformers' default (sdpa
    # where the architecture has it, else eager). flash_attention_2 needs CUDA, bf16/fp16 and flash-attn.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None

    @model_validator(mode="after")
    def _eval_fits(self) -> TrainingSpec:
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every ({self.eval_every}) must not exceed max_steps ({self.max_steps})")
        return self


class ResourcesSpec(_Strict):
    """What one trial gets, and how many run at once."""

    workers_per_trial: PositiveInt = 1  # Ray Train workers (data parallel) per trial
    # auto: one worker → the loop runs inside the Tune trial on a warm, reused actor (no per-trial process
    # start: ~20 s a trial saved on 2 cores, bench/overhead.py); several → a Ray Train TorchTrainer job.
    # inline | train force one (inline only with one worker).
    executor: Literal["auto", "inline", "train"] = "auto"
    cpus_per_worker: PositiveFloat = 1.0  # fractional values let concurrent trials fit small machines
    gpus_per_worker: NonNegativeFloat = 0.0  # 0: CPU training (gloo); >0 needs CUDA on the workers
    max_concurrent_trials: PositiveInt = 2  # trials running at once, all methods together (they share slots)
    trial_driver_cpus: float = Field(0.05, gt=0.0)  # the Tune trial that drives Ray Train; Tune rejects 0
    zero_stage: Annotated[int, Strict()] = Field(2, ge=0, le=3)  # paper protocol (where DeepSpeed trains)
    offload_optimizer: bool = False  # DeepSpeed ZeRO optimizer-state offload to CPU (big bases on small GPUs)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32 on CPU (bf16 is ~2× slower there)
    max_worker_restarts: NonNegativeInt = 1  # a crashed worker group restarts from the last checkpoint
    # A worker with no progress (setup stage, step or report) for this long is killed by its watchdog and
    # restarted like a crashed one; far above a healthy base-model load or eval. None: no watchdog.
    hang_timeout_s: PositiveFloat | None = 3600.0
    # A trial whose set-up (base model load, adapter init, engine build) makes no progress for this long
    # fails with the stage named, instead of waiting on e.g. a lock nobody will release. A healthy stage takes
    # seconds to minutes; raise it for hub downloads of big bases. None: no limit.
    setup_timeout_s: PositiveFloat | None = 900.0

    @model_validator(mode="after")
    def _precision_fits_device(self) -> ResourcesSpec:
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            raise ValueError("precision 'fp16' needs GPUs (gpus_per_worker > 0); use fp32 or bf16 on CPU")
        if self.executor == "inline" and self.workers_per_trial > 1:
            raise ValueError(
                f"executor 'inline' runs one worker per trial, but workers_per_trial is "
                f"{self.workers_per_trial}; use 'train' (or 'auto') for multi-worker trials"
            )
        return self


class TrackingSpec(_Strict):
    """Where a sweep writes: everything under `root` by default, like MLflow's `mlruns/`."""

    root: Path = Path("peftsweep-runs")  # relative to the working directory; made absolute at load
    mlflow_uri: str | None = None  # None: sqlite:///<root>/mlflow.db (embedded, single writer: the driver)
    registry_name: str | None = None  # None: the sweep name
    optuna_storage: str | None = None  # None: sqlite:///<root>/optuna.db (one study per method)
    # The sweep's lock (one run at a time, orchestrator/lock.py) is stale after this long without a
    # heartbeat from its holder, which beats every minute: an hour of silence means its driver is gone (a
    # killed pod, a lost machine) where its pid cannot be checked. On the same host a dead pid breaks it.
    lock_max_age_s: PositiveFloat = 3600.0

    @field_validator("mlflow_uri", "optuna_storage")
    @classmethod
    def _uri_is_printable(cls, value: str | None) -> str | None:
        # These are first used after Ray started; a blank or control-character URI must fail here instead.
        if value and (not value.strip() or not value.isprintable()):
            raise ValueError(f"{value!r} is not a URI (blank, or with control characters)")
        return value

    @field_validator("registry_name")
    @classmethod
    def _registry_name_is_valid(cls, value: str | None) -> str | None:
        # MLflow's rule for registered model names, checked at the end of a sweep, i.e. after all training.
        if value is not None and (not value.strip() or "/" in value or ":" in value):
            raise ValueError("an MLflow registered model name must not be blank or contain '/' or ':'")
        return value

    @model_validator(mode="after")
    def _stores_are_separate(self) -> TrackingSpec:
        # MLflow and Optuna both keep their schema version in an `alembic_version` table: one database for
        # both makes the second one's migration fail (or worse, skip) on first use, after Ray started.
        if self.mlflow_uri and self.mlflow_uri == self.optuna_storage:
            raise ValueError(
                "tracking.mlflow_uri and tracking.optuna_storage are the same database; give each its own "
                "(e.g. postgresql://HOST/mlflow and postgresql://HOST/optuna): both keep an alembic_version "
                "table"
            )
        return self

    def mlflow_tracking_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    def optuna_storage_url(self) -> str:
        return self.optuna_storage or f"sqlite:///{self.root / 'optuna.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch: `$` would let a trailing newline through
# The name is part of directory names (a file name has at most 255 bytes) next to trial and method suffixes.
NAME_MAX_LENGTH = 100
# A base_model that is not a local directory goes to `from_pretrained` as a hub id: [owner/]name.
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class SweepSpec(_Strict):
    """A whole sweep: which base, which data, which methods, how to search, train, run and track."""

    name: str = Field(max_length=NAME_MAX_LENGTH)
    base_model: str = "builtin:tiny-arith"  # built-in pretrained tiny Llama; else a local dir or a hub id
    # Run Python code shipped with the base model (config auto_map): arbitrary code on every worker, so
    # off unless the spec says so, as in transformers.
    trust_remote_code: bool = False
    data: DataSpec = DataSpec()
    methods: list[MethodSpec] = Field(min_length=1)
    search: SearchSpec = SearchSpec()
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    evaluation: EvalSpec = EvalSpec()
    forgetting: ForgettingSpec | None = None  # None: no forgetting check
    # What saved adapters (adapter_config.json, the registry) name as their base, so they load on another
    # machine: None → base_model as the spec wrote it (parse_spec makes base_model itself absolute). Set it
    # to the hub id when training from a local mirror of a hub model.
    base_model_name: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("use letters, digits, '.', '_' or '-' (it names studies, runs and directories)")
        return value

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, value: list[MethodSpec]) -> list[MethodSpec]:
        names = [m.name for m in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"method(s) listed twice: {dupes}")
        return value

    @model_validator(mode="after")
    def _methods_fit_hardware(self) -> SweepSpec:
        # QLoRA-like methods need CUDA: refuse a CPU-only spec here rather than crash inside a trial.
        cuda = self.resources.gpus_per_worker > 0
        problems = [
            f"methods.{i}: {why} (set resources.gpus_per_worker > 0 on a GPU cluster)"
            for i, m in enumerate(self.methods)
            if (why := search_spaces.get_method(m.name).rejection(None, cuda=cuda))
        ]
        stage = self.resources.zero_stage
        problems += [
            f"methods.{i}: {m.name} works up to ZeRO stage {cap}, but resources.zero_stage is {stage}"
            for i, m in enumerate(self.methods)
            if stage > (cap := search_spaces.get_method(m.name).max_zero_stage)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _recipe_fits(self) -> SweepSpec:
        """Cross-section checks of the training recipe; each message names the fields to change."""
        problems = []
        allowed = list(metric_names(self.data.format)) + (["forgetting"] if self.forgetting else [])
        metric = self.search.metric or allowed[0]
        if metric not in allowed:
            problems.append(
                f"search.metric: {metric!r} is not a metric of data.format {self.data.format!r} {allowed}"
            )
        object.__setattr__(self, "search", self.search.model_copy(update={"metric": metric}))
        rung = self.search.rung_metric
        if rung is not None and rung not in allowed:
            problems.append(
                f"search.rung_metric: {rung!r} is not a metric of data.format {self.data.format!r} {allowed}"
            )
        tr, res = self.training, self.resources
        if tr.optimizer != "adamw" and res.zero_stage > 2:
            problems.append(
                f"training.optimizer: {tr.optimizer} works up to ZeRO stage 2 (its ascent gradient needs "
                f"unsharded weights), but resources.zero_stage is {res.zero_stage}"
            )
        if tr.objective == "gradual":
            problems += [
                f"methods.{i}: training.objective 'gradual' needs the base model's distribution from the "
                f"same weights, adapter switched off; {m.name} trains or rewrites the base weights"
                for i, m in enumerate(self.methods)
                if not search_spaces.get_method(m.name).separable
            ]
        if tr.engine == "torch" and res.workers_per_trial > 1:
            problems.append(
                f"training.engine: 'torch' trains one worker per trial, but resources.workers_per_trial is "
                f"{res.workers_per_trial}; use 'deepspeed' (or 'auto') for multi-worker trials"
            )
        if tr.engine == "torch" and (res.zero_stage == 3 or res.offload_optimizer or res.precision != "fp32"):
            problems.append(
                "training.engine: 'torch' trains fp32 without ZeRO-3 or offload; resources ask for "
                f"zero_stage {res.zero_stage}, offload_optimizer {res.offload_optimizer}, precision "
                f"{res.precision!r}: use 'deepspeed' (or 'auto')"
            )
        if tr.attn_implementation == "flash_attention_2" and res.gpus_per_worker == 0:
            problems.append(
                "training.attn_implementation: 'flash_attention_2' runs only on CUDA GPUs, but "
                "resources.gpus_per_worker is 0; use 'sdpa' (or leave it unset) on CPU"
            )
        elif tr.attn_implementation == "flash_attention_2" and res.precision == "fp32":
            problems.append(
                "training.attn_implementation: 'flash_attention_2' computes in bf16/fp16 only, but "
                "resources.precision is 'fp32'; set resources.precision: bf16 (or use 'sdpa')"
            )
        per_step = tr.batch_size * res.workers_per_trial
        if tr.global_batch_size is not None and tr.global_batch_size % per_step:
            problems.append(
                f"training.global_batch_size ({tr.global_batch_size}) must be a multiple of batch_size × "
                f"workers_per_trial ({per_step})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each worker (gradient accumulation to the global batch)."""
        per_step = self.training.batch_size * self.resources.workers_per_trial
        return (self.training.global_batch_size or per_step) // per_step

    def method(self, name: str) -> MethodSpec:
        return next(m for m in self.methods if m.name == name)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid sweep spec"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")  # whole-spec checks name their own fields
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<spec>", base_dir: Path | None = None) -> SweepSpec:
    """Validate a spec mapping, then resolve every local path in it against `base_dir` (default: the
    directory the command runs in), once, here on the driver: trials run in other working directories (and
    on other machines), so they must only ever see absolute paths."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a sweep spec must be a mapping, got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source)) from None
    base = (base_dir or Path.cwd()).resolve()
    try:
        root = (base / spec.tracking.root.expanduser()).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, ~unknown-user, a name too long
        raise SpecError(f"{source}: invalid sweep spec\n  tracking.root: {exc}") from None
    update: dict[str, Any] = {
        "tracking": spec.tracking.model_copy(update={"root": root}),
        "base_model": local_path(spec.base_model, base),
        "data": spec.data.model_copy(update={"task": local_path(spec.data.task, base)}),
    }
    if spec.forgetting is not None:
        task = local_path(spec.forgetting.task, base)
        update["forgetting"] = spec.forgetting.model_copy(update={"task": task})
    update["base_model_name"] = spec.base_model_name or spec.base_model
    return spec.model_copy(update=update)


def local_path(value: str, base: Path) -> str:
    """``value`` as an absolute path when it names a local file or directory (it starts with ``.``, ``/`` or
    ``~``, or exists under ``base``); unchanged when it is ``builtin:…``, ``hf:…``, a URL or a hub id, or
    when it cannot be a path at all (a NUL byte, ~unknown-user: `check_inputs` names the field)."""
    if not value or ":" in value.split("/", 1)[0]:  # builtin:…, hf:…, s3://…: a scheme, not a path
        return value
    try:
        if value.startswith((".", "/", "~")) or (base / value).exists():
            return str((base / Path(value).expanduser()).resolve())
    except (OSError, ValueError, RuntimeError):
        pass
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that rejects a key given twice in a mapping; PyYAML would keep the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by later keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML spec file. Tracking paths are relative to the working directory."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, ValueError) as exc:  # a directory, no permission, a name too long, a NUL byte
        raise SpecError(f"{path}: cannot read the spec file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError(f"{path}:{line}: not UTF-8 ({exc.reason}); save the spec as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: not valid YAML: nested too deeply") from None
    return parse_spec(data, source=str(path))
