"""Conformance tests every registered method must pass, on tiny random-init Llama and GPT-2 (Conv1D) models.

Adding a method = one module in peftsweep/search_spaces/ + one row in METHODS below. A row states what the
method promises; (method, architecture) pairs the method declares unsupported (or that need CUDA here) are
not skipped silently: test_declared_rejections_are_real checks that they really fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from peftsweep import search_spaces
from peftsweep.search_spaces import AdapterHParams, export_trained, get_method, load_trained
from peftsweep.spec import SpecError, parse_spec
from tests.search_spaces.tiny_models import MODELS, tiny_llama

REPO = Path(__file__).resolve().parents[2]
RANK = 8
ATOL = 1e-4
TOTAL_STEPS = 20  # AdaLoRA's schedule needs it; 20 puts its budgeting phase inside the 5-step training below


@dataclass(frozen=True)
class Row:
    """What one method promises; the defaults fit a plain PEFT LoRA-style adapter."""

    name: str
    # Substrings of which every trainable parameter name contains one: proves only the method's own
    # parameters train (for full FT: the base's own names).
    trainable: tuple[str, ...] = (".lora_",)
    mutates_base: bool = False  # init moves base weights: snapshot + rank-2r plain-LoRA export
    preserves_step0: bool = True  # step-0 outputs equal the base's (False: prompt/prefix methods)
    peft_adapter: bool = True  # the export is a PEFT adapter dir (adapter_config.json)
    reload_atol: float = 1e-5  # exported → load_trained on a fresh base → same logits (measured ≤ 4e-6)
    trains_lm_head: bool = False  # only full fine-tuning moves the output layer


PROMPT = ("prompt_encoder.",)
METHODS: list[Row] = [
    Row("lora"),
    Row("dora"),
    Row("rslora"),
    Row("pissa", mutates_base=True),
    Row("milora", mutates_base=True),
    Row("olora", mutates_base=True),
    Row("initab", mutates_base=True),
    Row("adalora"),
    Row("vera", trainable=(".vera_lambda_",)),
    Row("loha", trainable=(".hada_",)),
    Row("lokr", trainable=(".lokr_",)),
    Row("ia3", trainable=(".ia3_l",)),
    Row("qlora"),  # CUDA only: on CPU its rows check the rejection
    # Random virtual tokens change the output from step 0; honest rows say so.
    Row("prompt_tuning", trainable=PROMPT, preserves_step0=False),
    Row("prefix_tuning", trainable=PROMPT, preserves_step0=False),
    Row("ptuning", trainable=PROMPT, preserves_step0=False),
    # Non-PEFT methods: exported their own way, loaded by search_spaces.load_trained.
    Row("fullft", trainable=("",), peft_adapter=False, trains_lm_head=True),
    Row("bitfit", trainable=(".bias",), peft_adapter=False),
    # The pruned export folds the open gates into the weights (float32 re-association): 1e-4 tolerance.
    Row("finegates", trainable=(".bias", ".finegates."), peft_adapter=False, reload_atol=1e-4),
]

pytestmark = [
    # Expected: PEFT switches GPT-2's Conv1D layers to fan_in_fan_out=True itself and says so.
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    # peft 0.21.2 still calls a transformers 5.x API that is deprecated; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # PEFT's advice to convert OLoRA to plain LoRA: the export does exactly that.
    pytest.mark.filterwarnings("ignore:OLoRA changes the base weights:UserWarning"),
    # Prompt methods in generate: PEFT drops the position ids generate passes and builds its own.
    pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning"),
]


def rejection(method: str, model: str) -> str | None:
    """Why `method` cannot run on `model` here (declared unsupported, or needs CUDA we lack), else None."""
    return get_method(method).rejection(model, cuda=torch.cuda.is_available())


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))


def hparams(**options: object) -> AdapterHParams:
    """alpha = 2r so the scaling is not 1."""
    return AdapterHParams(rank=RANK, alpha=2 * RANK, options=options, total_steps=TOTAL_STEPS)


def build(method: str, model: str, workdir: Path, **options: object) -> tuple[Any, PreTrainedModel]:
    """The adapted model and an untouched copy of its base; a declared-unsupported pair is skipped here
    (test_declared_rejections_are_real covers it)."""
    if why := rejection(method, model):
        pytest.skip(why)
    return get_method(method).apply(MODELS[model](), hparams(**options), workdir), MODELS[model]()


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at the real token positions (prompt tuning also returns its virtual tokens' logits first)."""
    with torch.no_grad():
        return model(tokens).logits[:, -tokens.shape[1] :]


def train(method: str, model: Any, tokens: torch.Tensor, steps: int, lr: float) -> None:
    """A plain AdamW loop with the method's hooks, in the order trainables/loop.py calls them."""
    recipe = get_method(method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        loss = model(tokens, labels=tokens).loss
        (loss + recipe.extra_loss(model) if recipe.extra_loss else loss).backward()
        if recipe.after_backward:
            recipe.after_backward(model, step)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


methods = pytest.mark.parametrize("row", METHODS, ids=[row.name for row in METHODS])
models = pytest.mark.parametrize("model", list(MODELS))


def test_table_covers_every_registered_method() -> None:
    rows = [row.name for row in METHODS]
    assert len(rows) == len(set(rows)), "a method has two rows"
    registered = set(search_spaces.method_names())
    assert set(rows) <= registered, sorted(set(rows) - registered)
    assert registered == set(rows), sorted(registered - set(rows))


REJECTED = [(row, model) for row in METHODS for model in MODELS if rejection(row.name, model)]


@pytest.mark.parametrize(("row", "model"), REJECTED, ids=[f"{model}-{row.name}" for row, model in REJECTED])
def test_declared_rejections_are_real(row: Row, model: str, tmp_path: Path, tokens: torch.Tensor) -> None:
    """A declared-unsupported pair must really fail (apply, or else the first training step): the
    declarations are facts, not a way to skip the other tests (which skip exactly these pairs)."""
    with pytest.raises((NotImplementedError, TypeError, RuntimeError, ValueError)):
        peft_model = get_method(row.name).apply(MODELS[model](), hparams(), tmp_path)
        train(row.name, peft_model, tokens, steps=1, lr=1e-3)


@methods
@models
def test_apply_trains_only_adapter_params(row: Row, model: str, tmp_path: Path) -> None:
    peft_model, _ = build(row.name, model, tmp_path)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(any(marker in n for marker in row.trainable) for n in trainable), trainable
    if not row.trains_lm_head:
        assert not any("lm_head" in n for n in trainable)  # all-linear leaves the output layer alone
    # DDP/DeepSpeed broadcast parameters at start-up and reject non-contiguous ones (SVD inits on Conv1D).
    assert all(p.is_contiguous() for p in peft_model.parameters())
    assert (tmp_path / "initial").is_dir() == row.mutates_base
    if row.mutates_base:  # else PEFT's conversion would decompose the residual base a second time on export
        snapshot = json.loads((tmp_path / "initial" / "adapter_config.json").read_text())
        assert snapshot["init_lora_weights"] is True


@methods
@models
def test_step0_logits_match_base(row: Row, model: str, tmp_path: Path, tokens: torch.Tensor) -> None:
    peft_model, base = build(row.name, model, tmp_path)
    expected = logits(base, tokens)
    gap = (logits(peft_model, tokens) - expected).abs().max().item()
    if row.preserves_step0:
        assert gap <= ATOL, gap
    else:  # the row says the output changes at step 0: make sure that is still true, not a stale claim
        assert gap > ATOL, gap
    if row.peft_adapter:
        with peft_model.disable_adapter():
            residual_gap = (logits(peft_model, tokens) - expected).abs().max().item()
        # Mutating inits must really have moved the base weights, else the check above proves nothing.
        assert (residual_gap > 1e-3) == row.mutates_base, residual_gap


@methods
@models
def test_one_adamw_step_changes_only_trainable_params(
    row: Row, model: str, tmp_path: Path, tokens: torch.Tensor
) -> None:
    peft_model, _ = build(row.name, model, tmp_path)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    train(row.name, peft_model, tokens, steps=1, lr=1e-3)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert changed, "the step changed nothing"
    assert changed <= trainable, sorted(changed - trainable)


@methods
@models
def test_export_reloads_on_a_fresh_base(row: Row, model: str, tmp_path: Path, tokens: torch.Tensor) -> None:
    workdir, out_dir = tmp_path / "work", tmp_path / "adapter"
    workdir.mkdir()
    peft_model, base = build(row.name, model, workdir)
    base_logits = logits(base, tokens)
    # The top of the method's own default range: the adapter really moves in 5 steps.
    train(row.name, peft_model, tokens, steps=5, lr=get_method(row.name).lr_range[1])
    trained = logits(peft_model, tokens)
    assert (trained - base_logits).abs().max() > 0.1
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]

    peft_model.train()  # a mid-training checkpoint: the export must leave the model as it found it
    meta = export_trained(row.name, peft_model, out_dir, workdir)
    assert meta["method"] == row.name and meta["trainable_params"] > 0
    assert all(m.training for m in peft_model.modules())
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == trainable
    if row.peft_adapter:
        assert list(peft_model.peft_config) == ["default"]
    peft_model.eval()
    torch.testing.assert_close(logits(peft_model, tokens), trained, atol=0, rtol=0)

    if row.peft_adapter:
        assert (out_dir / "adapter_model.safetensors").is_file()
        config = json.loads((out_dir / "adapter_config.json").read_text())
        if row.mutates_base:  # mutated inits become a rank-2r plain LoRA delta on the original base
            assert peft_model.peft_config["default"].r == RANK  # the rank-2r config is for the export only
            assert (config["r"], config["init_lora_weights"]) == (2 * RANK, True)
    reloaded = load_trained(base, out_dir).eval()
    torch.testing.assert_close(logits(reloaded, tokens), trained, atol=row.reload_atol, rtol=0)


@methods
@models
def test_generate_with_left_padding(row: Row, model: str, tmp_path: Path, tokens: torch.Tensor) -> None:
    """The evaluation's greedy `generate` (left-padded batch, as in trainables/metrics.py) works."""
    peft_model, _ = build(row.name, model, tmp_path)
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0  # one left-padded row
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=tokens, attention_mask=mask, do_sample=False, max_new_tokens=3, pad_token_id=0
        )
    assert out.shape == (tokens.shape[0], tokens.shape[1] + 3)
    assert torch.equal(out[:, : tokens.shape[1]], tokens)  # prompt echoed, virtual tokens not


# Which end of the base weight's spectrum each SVD init takes, and how exactly (randomized SVD: roughly).
SPECTRUM_CASES = [
    ("pissa", {"niter": None}, "largest", 1e-4),
    ("pissa", {}, "largest", 0.1),  # default niter=4 on a flat random spectrum: within ~5 %
    ("milora", {}, "smallest", 1e-4),
]


@pytest.mark.parametrize(("method", "options", "end", "rtol"), SPECTRUM_CASES)
@models
def test_svd_init_takes_the_right_singular_values(
    method: str, options: dict[str, object], end: str, rtol: float, model: str, tmp_path: Path
) -> None:
    base = MODELS[model]()
    base_modules = dict(base.named_modules())
    # Snapshot the weights first: apply mutates the base in place.
    originals = {
        n: m.weight.detach().clone() for n, m in base_modules.items() if n.endswith(("q_proj", "c_fc"))
    }
    peft_model = get_method(method).apply(base, hparams(**options), tmp_path)
    layers = dict(peft_model.base_model.model.named_modules())
    assert originals
    for name, weight in originals.items():
        layer = layers[name]
        s = torch.linalg.svdvals(weight)
        expected = s[:RANK] if end == "largest" else s[-RANK:]
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        got = torch.linalg.svdvals(delta.detach())[:RANK]
        torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
        if rtol < 1e-3:  # exact SVD: the residual keeps exactly the other singular values
            rest = s[RANK:] if end == "largest" else s[:-RANK]
            residual = torch.linalg.svdvals(layer.get_base_layer().weight.detach())[: rest.numel()]
            torch.testing.assert_close(residual, rest, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "init"), [({}, "pissa_niter_4"), ({"niter": None}, "pissa"), ({"niter": 0}, "pissa_niter_0")]
)
def test_pissa_niter_selects_the_svd(options: dict[str, object], init: str, tmp_path: Path) -> None:
    peft_model, _ = build("pissa", "llama", tmp_path, **options)
    assert peft_model.peft_config["default"].init_lora_weights == init


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(KeyError) as excinfo:
        get_method("lorra")
    for name in search_spaces.method_names():
        assert name in str(excinfo.value)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        search_spaces.register(get_method("lora"))


@pytest.mark.parametrize(("method", "options"), [("lora", {"niter": 4}), ("pissa", {"niter": -1})])
def test_bad_options_are_refused(method: str, options: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="niter"):
        build(method, "llama", tmp_path, **options)


def test_plain_method_refuses_a_stale_snapshot(tmp_path: Path) -> None:
    (tmp_path / "initial").mkdir()
    with pytest.raises(FileExistsError):
        build("lora", "llama", tmp_path)


def test_registry_import_does_not_import_torch() -> None:
    code = (
        "import peftsweep.search_spaces as s, sys; assert s.method_names(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_initab_starts_with_both_factors_random(tmp_path: Path, tokens: torch.Tensor) -> None:
    """Init[AB]'s point: B is not zero (else it is plain LoRA), yet the output is unchanged (see the rows)."""
    peft_model, _ = build("initab", "llama", tmp_path)
    lora_b = [p for n, p in peft_model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)


def test_adalora_prunes_to_its_budget(tmp_path: Path, tokens: torch.Tensor) -> None:
    """after_backward drives AdaLoRA's schedule: by the end, target_ratio of the singular values are kept."""
    peft_model, _ = build("adalora", "llama", tmp_path)
    train("adalora", peft_model, tokens, steps=TOTAL_STEPS, lr=1e-3)
    kept = sum(sum(mask) for mask in peft_model.peft_config["default"].rank_pattern.values())
    lora_e = [p for n, p in peft_model.named_parameters() if ".lora_E." in n]
    assert kept == round(get_method("adalora").options["target_ratio"] * sum(p.numel() for p in lora_e))
    logits(peft_model, tokens)  # the forward the model is used with sees the pruned values as zero
    assert sum(int((p != 0).sum()) for p in lora_e) == kept


def test_adalora_needs_the_step_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="total optimizer steps"):
        get_method("adalora").apply(tiny_llama(), AdapterHParams(rank=RANK, alpha=RANK), tmp_path)


# --- spec-level checks of what the methods declare (peftsweep.spec reads the registry) ----------------------


def test_spec_rejects_qlora_without_cuda() -> None:
    with pytest.raises(SpecError, match=r"methods\.1: qlora needs a CUDA GPU: QLoRA quantises"):
        parse_spec({"name": "q", "methods": ["lora", "qlora"]})
    parse_spec({"name": "q", "methods": ["qlora"], "resources": {"gpus_per_worker": 1}})


@pytest.mark.parametrize("method", [m for m in search_spaces.method_names() if not get_method(m).uses_rank])
def test_spec_rejects_ranks_for_rankless_methods(method: str) -> None:
    with pytest.raises(SpecError, match="has no rank"):
        parse_spec({"name": "r", "methods": [{"name": method, "ranks": [4]}]})
    assert parse_spec({"name": "r", "methods": [method]}).methods[0].ranks == []


@pytest.mark.parametrize("method", ["olora", "loha", "lokr"])
def test_gpt2_unsupported_is_declared(method: str) -> None:
    why = get_method(method).rejection("gpt2", cuda=True)
    assert why and "Conv1D" in why
    assert get_method(method).rejection("llama", cuda=True) is None


def test_spec_caps_adalora_at_zero_stage_0() -> None:
    with pytest.raises(SpecError, match=r"methods\.0: adalora works up to ZeRO stage 0"):
        parse_spec({"name": "a", "methods": ["adalora"]})  # the default ZeRO-2
    parse_spec({"name": "a", "methods": ["adalora"], "resources": {"zero_stage": 0}})


@pytest.mark.parametrize(("method", "lr_range"), [("ia3", (1e-4, 1e-1)), ("prompt_tuning", (1e-4, 1e-1))])
def test_few_parameter_methods_search_higher_lrs(method: str, lr_range: tuple[float, float]) -> None:
    spec = parse_spec({"name": "l", "methods": [method]})
    assert (spec.methods[0].lr_min, spec.methods[0].lr_max) == lr_range
