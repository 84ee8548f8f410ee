"""Precision: what dtype=auto picks per use (and ALIGNKIT_FAST_BF16), mixed precision training that trains (fp32
master weights, bf16 compute) against pure bf16 that barely moves, the fp32 heads and log-probs under autocast,
FSDP in bf16, and generation in bf16. Every test asks for bf16 explicitly, so they run on any CPU (bf16 is only
slower where it is emulated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import PROMPTS, _launch, _ppo_args, _write

from alignkit.cli import main
from alignkit.config import ConfigError, TrainConfig
from alignkit.data.tokenize import encode_prompt
from alignkit.losses.logprobs import completion_logprobs, naive_completion_logprobs
from alignkit.models import precision
from alignkit.models.forward import sequence_logprobs
from alignkit.models.generation import SamplingConfig, generate
from alignkit.models.loading import load_model
from alignkit.models.value import ValueModel
from alignkit.training.loop import check_weights_dtype

CPU = torch.device("cpu")
SFT_ROWS = [
    {"prompt": "what is the capital of france?", "completion": "the capital of france is paris."},
    {"prompt": "please write a short poem about the sea", "completion": "the sea and the sky are blue."},
] * 4


# --- what dtype=auto picks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("use", ["train", "generate", "score"])
def test_fast_bf16_variable_makes_auto_act_as_on_an_amx_cpu_or_one_without(monkeypatch, use):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # no AMX
    monkeypatch.delenv(precision.FAST_BF16_ENV, raising=False)
    assert precision.pick_dtype("auto", CPU, use) == torch.float32
    monkeypatch.setenv(precision.FAST_BF16_ENV, "1")
    assert precision.pick_dtype("auto", CPU, use) == precision.AUTO_WHERE_BF16_IS_FAST[use] == torch.bfloat16
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    monkeypatch.setenv(precision.FAST_BF16_ENV, "0")
    assert precision.pick_dtype("auto", CPU, use) == torch.float32
    assert precision.pick_dtype("bfloat16", CPU, use) == torch.bfloat16  # an explicit dtype is kept
    monkeypatch.setenv(precision.FAST_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="ALIGNKIT_FAST_BF16='yes'"):
        precision.pick_dtype("auto", CPU, use)


def test_training_precision_holds_fp32_weights_unless_pure_is_asked_for(monkeypatch):
    monkeypatch.setenv(precision.FAST_BF16_ENV, "1")
    mixed = precision.train_precision("auto", "mixed", CPU)
    assert (mixed.weights, mixed.compute, mixed.name) == (torch.float32, torch.bfloat16, "bfloat16-mixed")
    with mixed.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    pure = precision.train_precision("bfloat16", "pure", CPU)
    assert (pure.weights, pure.compute, pure.name) == (torch.bfloat16, torch.bfloat16, "bfloat16-pure")
    with pure.autocast():
        assert not torch.is_autocast_enabled("cpu")
    fp32 = precision.train_precision("float32", "pure", CPU)  # pure means nothing in fp32
    assert (fp32.weights, fp32.compute, fp32.name) == (torch.float32, torch.float32, "float32")
    with pytest.raises(ConfigError, match="precision must be"):
        precision.train_precision("auto", "half", CPU)


def test_loop_refuses_bf16_weights_under_mixed_precision(tiny_model_dir):
    """A stage that loaded its model in bf16 but trains in mixed precision would have no master weights."""
    model = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    prec = precision.of_config(TrainConfig(train_data="x", dtype="bfloat16"), CPU)
    with pytest.raises(ConfigError, match="trainable weights are bfloat16.*weights_dtype"):
        check_weights_dtype(model, prec)
    check_weights_dtype(model, precision.of_config(TrainConfig(train_data="x", dtype="bfloat16", precision="pure"), CPU))


# --- fp32 where precision matters --------------------------------------------------------------------------------


def test_chunked_logprobs_under_autocast_match_the_full_logits_path_in_value_and_gradient(tiny_model_dir):
    """Under bf16 autocast the chunked head's matmul runs in bf16 in the forward and again in the backward (the
    same dtype, so the recomputed softmax matches the kept logsumexp), and its log-softmax in fp32: values
    and gradients equal the full-logits path run under the same autocast to bf16's resolution, and the
    log-probs come back fp32."""
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    torch.manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (3, 12))
    attn, mask = torch.ones_like(ids), torch.zeros_like(ids)
    mask[:, 5:] = 1
    head = model.get_output_embeddings().weight
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        fast = completion_logprobs(hidden, head, ids, mask, chunk_size=5)
        grads.append(torch.autograd.grad(fast.sum.sum(), head, retain_graph=True)[0])
        logits = model.lm_head(hidden)
        slow, _ = naive_completion_logprobs(logits, ids, mask)
    grads.append(torch.autograd.grad(slow.sum(), head)[0])
    assert fast.sum.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(fast.sum, slow, atol=0.05, rtol=0.01)
    # The gradients agree to bf16 resolution (relative to their size), far closer than to a zero or a sign flip.
    assert (grads[0] - grads[1]).norm() < 0.02 * grads[1].norm()


def test_value_head_runs_in_fp32_under_autocast(tiny_model_dir):
    """The backbone's matmuls run in bf16, the value head (fp32) does not: its output is the fp32 head applied
    to the hidden states exactly."""
    value = ValueModel(load_model(str(tiny_model_dir), dtype="float32", device="cpu"))
    torch.nn.init.normal_(value.head.weight)
    ids = torch.randint(4, 100, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = value(ids, torch.ones_like(ids))
        hidden = value.backbone.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert values.dtype == torch.float32
    expected = hidden.float() @ value.head.weight[0] + value.head.bias
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


# --- training that trains: mixed against pure, at lr 1e-5 ----------------------------------------------------


def _sft_weight_change(model_dir: Path, tmp_path: Path, name: str, *extra: str) -> tuple[float, float]:
    """4 full fine-tuning SFT steps at lr 1e-5 (constant, no warmup); (fraction of weights changed, mean |dW|),
    each against the start in the final weights' own dtype."""
    data = _write(tmp_path, "sft.jsonl", SFT_ROWS)
    out = tmp_path / name
    args = [f"model={model_dir}", f"train_data={data}", f"output_dir={out}", "max_steps=4", "learning_rate=1e-5"]
    args += ["batch_size=4", "micro_batch_size=2", "lr_scheduler=constant", "progress=false", "tensorboard=false"]
    assert main(["sft", *args, *extra]) == 0
    start, final = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    n = sum(w.numel() for w in final.values())
    changed = sum((w != start[k].to(w.dtype)).sum().item() for k, w in final.items())
    moved = sum((w.float() - start[k].to(w.dtype).float()).abs().sum().item() for k, w in final.items())
    return changed / n, moved / n


def test_bf16_mixed_precision_moves_the_weights_as_fp32_does_and_pure_bf16_does_not(tiny_model_dir, tmp_path):
    """The issue's measurement, on the tiny model: full fine-tuning at lr 1e-5. Mixed precision (fp32 master
    weights, bf16 compute) changes >95% of the weights and moves them by 0.5x-2x what fp32 training does
    (measured: 100%, ratio 1.00); pure bf16 rounds most updates away (measured: 16% changed, 5x less movement)
    and warns that it does."""
    fp32_changed, fp32_moved = _sft_weight_change(tiny_model_dir, tmp_path, "fp32", "dtype=float32")
    mixed_changed, mixed_moved = _sft_weight_change(tiny_model_dir, tmp_path, "mixed", "dtype=bfloat16")
    with pytest.warns(UserWarning, match="precision=pure.*rounded away"):
        pure_changed, pure_moved = _sft_weight_change(
            tiny_model_dir, tmp_path, "pure", "dtype=bfloat16", "precision=pure"
        )
    assert fp32_changed > 0.95 and mixed_changed > 0.95
    assert 0.5 < mixed_moved / fp32_moved < 2.0
    assert pure_changed < 0.5 and pure_moved < 0.5 * fp32_moved


@pytest.mark.gpu
def test_gpu_auto_trains_in_bf16_mixed_precision_as_fp32_does(tiny_model_dir, tmp_path, monkeypatch):
    """On a bf16 GPU dtype=auto computes in bf16 with fp32 master weights, and moves the weights as fp32 does."""
    monkeypatch.delenv(precision.FAST_BF16_ENV, raising=False)
    assert precision.of_config(TrainConfig(train_data="x"), "cuda").name == "bfloat16-mixed"
    fp32_changed, fp32_moved = _sft_weight_change(tiny_model_dir, tmp_path, "fp32", "dtype=float32")
    auto_changed, auto_moved = _sft_weight_change(tiny_model_dir, tmp_path, "auto", "dtype=auto")
    assert auto_changed > 0.95 and 0.5 < auto_moved / fp32_moved < 2.0


# --- FSDP in bf16 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["mixed", "pure"])
def test_fsdp_ppo_trains_in_bf16(tiny_model_dir, tmp_path, how):
    """PPO with full fine-tuning under FSDP in 2 processes in bf16 (the issue's crash: 'FSDP expects uniform
    original parameter dtype', fp32 value head beside a bf16 backbone). Mixed: every weight fp32 (one dtype per
    group), compute under autocast; pure: the bf16 backbone and the fp32 value head in groups of their own.
    One iteration trains: the policy and the value head move, and the value head stays fp32."""
    data = _write(tmp_path, "prompts.jsonl", PROMPTS)
    out = tmp_path / how
    args = _ppo_args(tiny_model_dir, data, out, "iterations=1", "dtype=bfloat16", f"precision={how}")
    _launch("ppo", args, fsdp=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_rank_share"] == pytest.approx(0.5, abs=0.01)
    weights = load_file(str(out / "checkpoints" / "step-000001" / "weights.safetensors"))
    assert weights["value.head.weight"].dtype == torch.float32 and weights["value.head.weight"].abs().sum() > 0
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    policy = {k.removeprefix("policy."): w for k, w in weights.items() if k.startswith("policy.")}
    assert {w.dtype for w in policy.values()} == {torch.float32 if how == "mixed" else torch.bfloat16}
    assert max((w.float() - start[k].to(w.dtype).float()).abs().max().item() for k, w in policy.items()) > 1e-4


# --- generation in bf16 -------------------------------------------------------------------------------------------


def test_generation_in_bf16_samples_what_fp32_scores_as_likely_as_bf16_does(tiny_model_dir, tiny_tokenizer):
    """Greedy generation on the model loaded in bf16 and on fp32 weights under bf16 autocast (PPO's sampling
    in mixed precision): both finish, and the log-probs of what they sampled, scored by the fp32 model, equal
    those the bf16 model gives them to bf16's resolution."""
    fp32 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16
    prompts = [encode_prompt(tiny_tokenizer, p["prompt"], None) for p in PROMPTS[:3]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = generate(fp32, tiny_tokenizer, prompts, sampling, progress=False)
    in_bf16 = generate(bf16, tiny_tokenizer, prompts, sampling, progress=False)
    for g in [*in_bf16, *under_autocast]:
        assert 0 < len(g.response_ids) <= 6
        ids = torch.tensor([g.prompt_ids + g.response_ids])  # (1, T)
        mask = torch.zeros_like(ids)
        mask[:, len(g.prompt_ids) :] = 1
        exact = sequence_logprobs(fp32, ids, torch.ones_like(ids), mask).token_logps
        approx = sequence_logprobs(bf16, ids, torch.ones_like(ids), mask).token_logps
        assert approx.dtype == torch.float32 and exact.shape == (len(g.response_ids),)
        torch.testing.assert_close(approx, exact, atol=0.05, rtol=0.02)
