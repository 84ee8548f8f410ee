"""Parity of alignkit's preference losses with TRL 1.16's own code on identical inputs, and the places where
TRL deliberately computes something else, each tested as a difference.

How TRL is called. Its DPO and KTO losses live inside ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``,
which run the model themselves. We call those methods on trainers made with ``object.__new__`` that carry only
the attributes the methods read, single-process (gathers are identities, as with one process). For loss-level
parity the model is ``LookupLM``: it returns, like a model patched with TRL's fused LM head, per-token log-probs
whose sum over a sequence is a number we choose. For "same model, same batch" the policy and reference are the
tiny Llama from conftest, patched with TRL's own ``add_fused_lm_head``, so TRL computes the log-probs too.
ORPO's ``odds_ratio_loss`` and ``concatenated_forward`` are methods reading two or three attributes; called the
same way. Nothing of TRL's is re-implemented here.

Deliberate differences from TRL 1.16 (each has a test below):
- DPO label smoothing: TRL's "sigmoid" loss ignores ``label_smoothing``; its ``label_smoothing`` feeds robust DPO
  (Chowdhury et al. 2024) and EXO, which are other losses. Ours is conservative DPO (Mitchell 2023), which TRL
  computes only inside its "aot" loss (identical to it for a batch of one).
- IPO: TRL's DPOTrainer always divides the log-ratios by the completion length; ours uses what it is given
  (the alignkit trainer passes averages by default). TRL logs the rewards of the *summed* log-ratios for IPO;
  ours are of the inputs (per token when averaged).
- ORPO: TRL's NLL term is one cross-entropy over all chosen tokens of the micro-batch, prompt included; ours is
  each example's completion-only mean NLL. TRL's "losses" are beta * log sigmoid (sign flipped, weighted) and its
  ``log1mexp`` has a NaN gradient near mean log-prob 0 and -inf at 0; ours is finite.
- KTO: losses in batch order (TRL orders desirable first); a batch of one is an error in ``mismatched_indices``
  while TRL pairs a trailing single example with its own completion. z0 is the same: mean over the KL pairs,
  clamped at 0, no gradient (TRL averages per-rank means after a gather; with one process they coincide).
- Reduction, all losses: TRL returns the micro-batch mean and ignores ``num_items_in_batch``; ours are
  per-example and the alignkit loop divides their sum by the optimiser batch's item count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl import DPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head  # noqa: E402

from alignkit.losses.kto import kto_loss, kto_reference_point, mismatched_indices  # noqa: E402
from alignkit.losses.preference import dpo_loss, ipo_loss, orpo_loss  # noqa: E402

from conftest import build_tiny_model  # noqa: E402

TOL = 1e-6


def close(actual, expected, tol: float = TOL) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float32)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=tol, atol=tol)


class OneProcess:
    """The accelerator as a single process sees it: gathers return their input."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model


class LookupLM(torch.nn.Module):
    """Stands in for a causal LM with TRL's fused LM head: row r's log-prob is ``logps[input_ids[r, 0]]``.

    It is placed on the first label position and the others get 0, so the per-sequence sum TRL takes is
    exactly the chosen number, whatever the completion mask says about the length.
    """

    is_gradient_checkpointing = False

    def __init__(self, logps: list[float]):
        super().__init__()
        self.logps = torch.nn.Parameter(torch.tensor(logps, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head, "TRL 1.16 calls its models with the fused LM head"
        n_rows, seq_len = input_ids.shape
        first = self.logps[input_ids[:, 0]].unsqueeze(1)  # (N, 1)
        log_probs = torch.cat([first, first.new_zeros(n_rows, seq_len - 2)], dim=1)  # (N, T - 1)
        zeros = torch.zeros_like(log_probs.detach())
        return FusedCausalLMOutput(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def _common_trainer_state(trainer, model) -> None:
    trainer.model = model
    trainer.ref_model = None
    trainer.accelerator = OneProcess()
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1


def make_dpo_trainer(model, loss_type: str, beta: float, label_smoothing: float = 0.0, ref_model=None):
    trainer = object.__new__(DPOTrainer)
    _common_trainer_state(trainer, model)
    trainer.ref_model = ref_model
    trainer.precompute_ref_logps = ref_model is None  # reference log-probs come in the batch
    trainer.ld_alpha = None
    trainer.f_divergence_type = "reverse_kl"
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer.use_weighting = False
    return trainer


def completion_mask(lengths: list[int]) -> torch.Tensor:
    """(N, 1 + max length): one prompt token, then each row's completion tokens, then padding."""
    width = 1 + max(lengths)
    return torch.tensor([[0] + [1] * n + [0] * (width - 1 - n) for n in lengths])


def trl_dpo(loss_type, beta, chosen, rejected, ref_chosen, ref_rejected, label_smoothing=0.0, lengths=None):
    """TRL's DPO-family loss (micro-batch mean), its logged metrics and the LookupLM it read the policy from."""
    n = len(chosen)
    # The batch is [chosen rows; rejected rows], as TRL's collator builds it.
    model = LookupLM(chosen + rejected)
    mask = completion_mask(lengths or [2] * (2 * n))
    input_ids = torch.arange(2 * n).unsqueeze(1).expand_as(mask).contiguous()
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": mask,
        "ref_chosen_logps": torch.tensor(ref_chosen),
        "ref_rejected_logps": torch.tensor(ref_rejected),
    }
    trainer = make_dpo_trainer(model, loss_type, beta, label_smoothing)
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}, model


# Per-sequence (summed) log-probs of four pairs: policy chosen, policy rejected, reference chosen and rejected.
PC = [-10.0, -3.0, -50.0, -7.5]
PR = [-12.0, -4.0, -40.0, -7.0]
RC = [-11.0, -3.5, -45.0, -9.0]
RR = [-11.0, -3.2, -44.0, -6.0]


def ours_dpo(beta, label_smoothing=0.0):
    args = [torch.tensor(x) for x in (PC, PR, RC, RR)]
    return dpo_loss(*args, beta=beta, label_smoothing=label_smoothing)


# --- DPO -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl_per_example(beta):
    """TRL "sigmoid" on one example at a time gives per-example losses and rewards; on the batch, the mean."""
    ours = ours_dpo(beta)
    for i in range(len(PC)):
        loss, metrics, _ = trl_dpo("sigmoid", beta, [PC[i]], [PR[i]], [RC[i]], [RR[i]])
        close(loss, ours.losses[i])
        close(metrics["rewards/chosen"], ours.chosen_rewards[i])
        close(metrics["rewards/rejected"], ours.rejected_rewards[i])
    loss, metrics, _ = trl_dpo("sigmoid", beta, PC, PR, RC, RR)
    close(loss, ours.losses.mean())  # TRL reduces to the micro-batch mean; ours stays per example
    close(metrics["rewards/margins"], (ours.chosen_rewards - ours.rejected_rewards).mean())


def test_dpo_gradient_matches_trl():
    """Same gradient wrt the policy log-probs: d(TRL mean)/d logp == d(mean of ours)/d logp."""
    trl_loss, _, model = trl_dpo("sigmoid", 0.1, PC, PR, RC, RR)
    trl_loss.backward()
    policy = torch.tensor(PC + PR, requires_grad=True)  # (2B,) chosen then rejected, like the model's table
    n = len(PC)
    dpo_loss(policy[:n], policy[n:], torch.tensor(RC), torch.tensor(RR), beta=0.1).losses.mean().backward()
    close(model.logps.grad, policy.grad)


def test_dpo_label_smoothing_matches_trl_conservative_form():
    """Conservative DPO in TRL 1.16 exists only inside its "aot" loss:
    -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d) with d the sorted log-ratio gap, which for a batch
    of one is exactly h. So per example, TRL "aot" == ours with label_smoothing."""
    ours = ours_dpo(0.1, label_smoothing=0.2)
    for i in range(len(PC)):
        loss, *_ = trl_dpo("aot", 0.1, [PC[i]], [PR[i]], [RC[i]], [RR[i]], label_smoothing=0.2)
        close(loss, ours.losses[i])


def test_trl_sigmoid_ignores_label_smoothing_and_robust_is_another_loss():
    """Difference. Inputs -10, -12, -11, -11 (h = 2), beta 0.1, eps 0.1. L(x) = -log sigmoid(x).
    Ours (conservative): 0.9 L(0.2) + 0.1 L(-0.2) = 0.9 * 0.5981388694 + 0.1 * 0.7981388694 = 0.6181388694.
    TRL "sigmoid" with label_smoothing 0.1: plain L(0.2) = 0.5981388694 (smoothing ignored).
    TRL "robust" (rDPO): (0.9 L(0.2) - 0.1 L(-0.2)) / (1 - 0.2) = (0.5383249825 - 0.0798138869) / 0.8
    = 0.5731388694.
    """
    args = ([-10.0], [-12.0], [-11.0], [-11.0])
    ours = dpo_loss(*(torch.tensor(a) for a in args), beta=0.1, label_smoothing=0.1).losses
    close(ours, [0.6181388694])
    close(trl_dpo("sigmoid", 0.1, *args, label_smoothing=0.1)[0], 0.5981388694)
    close(trl_dpo("robust", 0.1, *args, label_smoothing=0.1)[0], 0.5731388694)


# --- IPO -------------------------------------------------------------------------------------------------

CHOSEN_LENGTHS, REJECTED_LENGTHS = [4, 1, 20, 3], [2, 5, 16, 3]


def test_ipo_on_token_averaged_logps_matches_trl():
    """TRL divides each sequence's summed log-ratio by its completion length, then (h - 1/(2 beta))^2.
    Ours on token-averaged inputs (each log-prob divided by its completion's length) is the same number."""
    lengths = CHOSEN_LENGTHS + REJECTED_LENGTHS
    chosen_n, rejected_n = (
        torch.tensor(CHOSEN_LENGTHS, dtype=torch.float32),
        torch.tensor(REJECTED_LENGTHS) * 1.0,
    )
    ours = ipo_loss(
        torch.tensor(PC) / chosen_n,
        torch.tensor(PR) / rejected_n,
        torch.tensor(RC) / chosen_n,
        torch.tensor(RR) / rejected_n,
        beta=0.1,
    )
    for i in range(len(PC)):
        one = [CHOSEN_LENGTHS[i], REJECTED_LENGTHS[i]]
        loss, metrics, _ = trl_dpo("ipo", 0.1, [PC[i]], [PR[i]], [RC[i]], [RR[i]], lengths=one)
        close(loss, ours.losses[i])
        # Difference: TRL logs rewards of the summed log-ratios even for IPO; ours are of the (averaged) inputs.
        close(metrics["rewards/chosen"], ours.chosen_rewards[i] * CHOSEN_LENGTHS[i])
    loss, *_ = trl_dpo("ipo", 0.1, PC, PR, RC, RR, lengths=lengths)
    close(loss, ours.losses.mean())


def test_ipo_on_summed_logps_differs_from_trl():
    """Difference. First example, summed inputs: h = (-10 + 11) - (-12 + 11) = 2, ours = (2 - 5)^2 = 9.
    TRL always averages: chosen log-ratio 1 / 4 tokens = 0.25, rejected -1 / 2 tokens = -0.5, h = 0.75,
    loss = (0.75 - 5)^2 = 18.0625."""
    ours = ipo_loss(*(torch.tensor([x[0]]) for x in (PC, PR, RC, RR)), beta=0.1).losses
    close(ours, [9.0])
    trl, *_ = trl_dpo("ipo", 0.1, [PC[0]], [PR[0]], [RC[0]], [RR[0]], lengths=[4, 2])
    close(trl, 18.0625)


# --- DPO with a real model: TRL's log-prob routine vs a plain gather ------------------------------------


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def right_padded(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, completion_mask (N, T), right-padded, completion tokens marked."""
    width = max(len(p) + len(c) for p, c in rows)
    ids, attention, completion = [], [], []
    for prompt_ids, completion_ids in rows:
        pad = width - len(prompt_ids) - len(completion_ids)
        ids.append(prompt_ids + completion_ids + [pad_id] * pad)
        attention.append([1] * (len(prompt_ids) + len(completion_ids)) + [0] * pad)
        completion.append([0] * len(prompt_ids) + [1] * len(completion_ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(attention),
        "completion_mask": torch.tensor(completion),
    }


def token_logps(model, batch) -> torch.Tensor:
    """(N, T - 1) log p(token t+1 | tokens <= t), by a plain gather over log_softmax of the full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, T, V)
    log_probs = logits[:, :-1].float().log_softmax(-1)  # (N, T - 1, V)
    return log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # (N, T - 1)


PROMPTS = ["what is the capital of france?", "please write a short poem about", "the quick brown fox"]
CHOSEN = [" the capital of france is paris.", " the sea and the sky", " jumps over the lazy dog"]
REJECTED = [" i am sorry, but i cannot help.", " 0 1 2 3", " is a helpful answer to your question"]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside TRL
def test_dpo_same_model_same_batch(tiny_tokenizer):
    """Policy and reference: two tiny Llamas (seeds 0 and 1). TRL 1.16 computes log-probs with its fused LM
    head (``add_fused_lm_head`` then ``model(..., labels, fused_lm_head=True).log_probs``), reachable as plain
    functions; the DPO loss is TRL's full ``_compute_loss``. Ours: plain gather + ``dpo_loss``. Per-sequence
    log-probs, loss, mean rewards and the policy's parameter gradients agree."""
    pad = tiny_tokenizer.pad_token_id
    rows = [encode_pair(tiny_tokenizer, p, c) for p, c in zip(PROMPTS, CHOSEN)]
    rows += [encode_pair(tiny_tokenizer, p, r) for p, r in zip(PROMPTS, REJECTED)]
    batch = right_padded(rows, pad)  # (2B, T): chosen rows, then rejected rows, as TRL's collator orders them
    n = len(PROMPTS)
    policy = build_tiny_model(len(tiny_tokenizer), seed=0).train()
    reference = build_tiny_model(len(tiny_tokenizer), seed=1).eval()

    # Ours, before TRL patches the models' forward.
    mask = batch["completion_mask"][:, 1:]  # (2B, T - 1): which next-token predictions are completion tokens
    policy_logps = (token_logps(policy, batch) * mask).sum(-1)  # (2B,)
    with torch.no_grad():
        reference_logps = (token_logps(reference, batch) * mask).sum(-1)  # (2B,)
    ours = dpo_loss(policy_logps[:n], policy_logps[n:], reference_logps[:n], reference_logps[n:], beta=0.1)
    ours_grads = torch.autograd.grad(ours.losses.mean(), list(policy.parameters()))

    add_fused_lm_head(
        policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1")
    )  # as DPOTrainer does
    add_fused_lm_head(reference)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        trl_logps = policy(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
        ).log_probs.sum(-1)  # (2B,)
    close(trl_logps, policy_logps.detach(), tol=1e-5)  # sums of ~10-20 log-probs around -6 each

    trainer = make_dpo_trainer(policy, "sigmoid", 0.1, ref_model=reference)
    trl_loss = trainer._compute_loss(policy, batch, return_outputs=False)
    close(trl_loss, ours.losses.mean().detach())
    metrics = trainer._metrics["train"]
    close(metrics["rewards/chosen"][-1], ours.chosen_rewards.mean())
    close(metrics["rewards/rejected"][-1], ours.rejected_rewards.mean())
    trl_grads = torch.autograd.grad(trl_loss, list(policy.parameters()))
    for ours_grad, trl_grad in zip(ours_grads, trl_grads):
        torch.testing.assert_close(trl_grad, ours_grad, rtol=1e-4, atol=1e-7)


# --- ORPO ------------------------------------------------------------------------------------------------


def make_orpo_trainer(beta: float, pad_id: int = 0):
    trainer = object.__new__(ORPOTrainer)
    trainer.beta = beta  # TRL's name for ORPO's lambda
    trainer.accelerator = OneProcess()
    trainer.is_encoder_decoder = False
    trainer.padding_value = pad_id
    trainer.aux_loss_enabled = False
    return trainer


MEAN_CHOSEN = [-math.log(2), -0.1, -1.5, -0.02, -3.0]
MEAN_REJECTED = [-math.log(4), -0.3, -1.2, -2.5, -0.01]


def test_orpo_odds_ratio_matches_trl():
    """TRL's odds_ratio_loss returns beta * log sigmoid(log odds ratio) per example (the weighted L_OR with its
    sign flipped, subtracted from the NLL later), mean log sigmoid, and mean log odds ratio."""
    chosen, rejected = torch.tensor(MEAN_CHOSEN), torch.tensor(MEAN_REJECTED)
    ours = orpo_loss(chosen, rejected, -chosen, lam=0.1)
    trl_losses, _, _, trl_mean_log_sigmoid, trl_mean_log_odds = make_orpo_trainer(0.1).odds_ratio_loss(
        chosen, rejected
    )
    close(-trl_losses, 0.1 * ours.or_loss)
    close(-trl_mean_log_sigmoid, ours.or_loss.mean())
    close(trl_mean_log_odds, ours.log_odds_ratio.mean())


def test_orpo_near_zero_trl_gradient_is_nan_ours_is_finite():
    """Difference. Mean log-prob -1e-8: TRL's log1mexp gives the right value (-18.4207) but, built from one
    torch.where over both branches, a NaN gradient (0 * inf from the branch not taken). At exactly 0 it gives
    -inf. Ours: finite value and gradient in both cases."""
    x = torch.tensor([-1e-8, 0.0], requires_grad=True)
    trl_value = trl_log1mexp(x)
    close(trl_value[0], -18.4206807440, tol=1e-5)
    assert trl_value[1].item() == -math.inf
    trl_value.sum().backward()
    assert torch.isnan(x.grad).all()

    chosen = torch.tensor([-1e-8, 0.0], requires_grad=True)
    ours = orpo_loss(chosen, torch.tensor([-math.log(2)] * 2), torch.zeros(2))
    ours.losses.sum().backward()
    assert torch.isfinite(ours.log_odds_ratio).all() and torch.isfinite(chosen.grad).all()


def test_orpo_nll_differs_from_trl(tiny_tokenizer):
    """Difference, on the tiny model: TRL's ``concatenated_forward`` returns the same mean completion log-probs
    as our gather, but its NLL is one cross-entropy over every chosen token of the batch, prompt included
    (token-weighted), while ours is each example's completion-only mean NLL (then averaged over examples).
    The odds-ratio part agrees, so the whole gap in the total loss is the NLL definition."""
    pad = tiny_tokenizer.pad_token_id
    chosen_rows = [encode_pair(tiny_tokenizer, p, c) for p, c in zip(PROMPTS, CHOSEN)]
    rejected_rows = [encode_pair(tiny_tokenizer, p, r) for p, r in zip(PROMPTS, REJECTED)]
    chosen, rejected = right_padded(chosen_rows, pad), right_padded(rejected_rows, pad)
    model = build_tiny_model(len(tiny_tokenizer), seed=0)
    with (
        torch.no_grad()
    ):  # sharper logits (the head is tied), so token log-probs spread like a trained model's
        model.get_output_embeddings().weight.mul_(10.0)

    def trl_side(side):
        labels = side["input_ids"].masked_fill(side["completion_mask"] == 0, -100)
        return {"input_ids": side["input_ids"], "attention_mask": side["attention_mask"], "labels": labels}

    batch = {f"chosen_{k}": v for k, v in trl_side(chosen).items()}
    batch |= {f"rejected_{k}": v for k, v in trl_side(rejected).items()}
    with torch.no_grad():
        trl_chosen, trl_rejected, _, _, trl_nll = make_orpo_trainer(0.1, pad).concatenated_forward(
            model, batch
        )
        chosen_token_logps, rejected_token_logps = token_logps(model, chosen), token_logps(model, rejected)
    chosen_mask, rejected_mask = chosen["completion_mask"][:, 1:], rejected["completion_mask"][:, 1:]
    ours_chosen = (chosen_token_logps * chosen_mask).sum(-1) / chosen_mask.sum(-1)  # (B,)
    ours_rejected = (rejected_token_logps * rejected_mask).sum(-1) / rejected_mask.sum(-1)  # (B,)
    close(trl_chosen, ours_chosen, tol=1e-5)
    close(trl_rejected, ours_rejected, tol=1e-5)

    # TRL's NLL: all real chosen tokens after the first (prompt and completion), one token-weighted mean.
    every_token = chosen["attention_mask"][:, 1:]
    close(trl_nll, -(chosen_token_logps * every_token).sum() / every_token.sum(), tol=1e-5)
    ours = orpo_loss(ours_chosen, ours_rejected, -ours_chosen, lam=0.1)
    assert abs(trl_nll.item() - ours.nll.mean().item()) > 1e-2  # prompt tokens and weighting really matter

    trl_or, *_ = make_orpo_trainer(0.1, pad).odds_ratio_loss(trl_chosen, trl_rejected)
    trl_total = trl_nll - trl_or.mean()  # TRL's get_batch_loss_metrics
    close(trl_total - ours.losses.mean(), trl_nll - ours.nll.mean(), tol=1e-5)


# --- KTO -------------------------------------------------------------------------------------------------

KTO_POLICY = [-10.0, -12.0, -3.0, -30.0, -8.0]
KTO_REFERENCE = [-11.0, -11.0, -3.5, -28.0, -8.2]
KTO_LABELS = [True, False, True, False, False]
KL_REFERENCE = [-9.0, -13.0, -4.0, -29.0, -7.0]
KL_POLICY_NEGATIVE = [-10.0, -13.5, -4.5, -29.0, -7.5]  # mean(policy - reference) = -2.5 / 5 = -0.5 -> z0 = 0
KL_POLICY_POSITIVE = [-8.0, -12.0, -4.0, -27.5, -6.5]  # mean(policy - reference) = 4 / 5 = 0.8 -> z0 = 0.8


def make_kto_trainer(model, beta, desirable_weight, undesirable_weight):
    trainer = object.__new__(KTOTrainer)
    _common_trainer_state(trainer, model)
    trainer.precompute_ref_logps = True  # reference log-probs come in the batch
    trainer.calculate_KL = True
    trainer.loss_type = "kto"
    trainer.beta = beta
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    return trainer


def trl_kto(rows: list[int], kl_policy, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """TRL's KTO loss (mean over ``rows``) with the KL term over all the KL pairs, and its model."""
    n = len(KTO_POLICY)
    model = LookupLM(KTO_POLICY + kl_policy)  # ids 0..n-1: own completions, n..2n-1: the mismatched pairs
    index = torch.tensor(rows)
    kl_index = torch.arange(n, 2 * n)
    ones = torch.ones(len(rows), 3, dtype=torch.long)
    batch = {
        "input_ids": index[:, None] * ones,
        "attention_mask": ones,
        "completion_mask": torch.tensor([[0, 1, 1]]) * ones,
        "label": torch.tensor(KTO_LABELS)[index],
        "ref_logps": torch.tensor(KTO_REFERENCE)[index],
        "KL_input_ids": kl_index[:, None] * torch.ones(n, 3, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, 3, dtype=torch.long),
        "KL_completion_mask": torch.tensor([[0, 1, 1]] * n),
        "ref_KL_logps": torch.tensor(KL_REFERENCE),
    }
    trainer = make_kto_trainer(model, beta, desirable_weight, undesirable_weight)
    loss = trainer._compute_loss(model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}, model


@pytest.mark.parametrize("kl_policy, z0", [(KL_POLICY_NEGATIVE, 0.0), (KL_POLICY_POSITIVE, 0.8)])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_matches_trl(kl_policy, z0, weights):
    """Per example (TRL run on one example at a time with the whole KL batch), z0 as logged, the batch mean,
    and the gradient: TRL's KL forward runs without gradient, ours detaches z0, so neither gets one there."""
    desirable_weight, undesirable_weight = weights
    policy = torch.tensor(KTO_POLICY, requires_grad=True)
    kl_policy_logps = torch.tensor(kl_policy, requires_grad=True)
    ours = kto_loss(
        policy,
        torch.tensor(KTO_REFERENCE),
        torch.tensor(KTO_LABELS),
        kto_reference_point((kl_policy_logps - torch.tensor(KL_REFERENCE)).sum(), len(KL_REFERENCE)),
        beta=0.1,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    close(ours.kl, z0)
    for i in range(len(KTO_POLICY)):
        loss, metrics, _ = trl_kto([i], kl_policy, 0.1, desirable_weight, undesirable_weight)
        close(loss, ours.losses[i])
        close(metrics["kl"], ours.kl)
        side = "chosen" if KTO_LABELS[i] else "rejected"
        close(metrics[f"rewards/{side}"], ours.rewards[i])
    loss, _, model = trl_kto(
        list(range(len(KTO_POLICY))), kl_policy, 0.1, desirable_weight, undesirable_weight
    )
    close(loss, ours.losses.mean())
    loss.backward()
    ours.losses.mean().backward()
    close(model.logps.grad[: len(KTO_POLICY)], policy.grad)
    close(model.logps.grad[len(KTO_POLICY) :], torch.zeros(len(KTO_POLICY)))
    assert kl_policy_logps.grad is None


def test_kto_mismatched_pairs_match_trl_rotation(tiny_tokenizer):
    """TRL builds the KL completions in its dataset preparation by rotating completions by one within each
    block of ``per_device_train_batch_size``; ``mismatched_indices`` is the same rotation.
    Difference: a trailing block of one example gets its own completion in TRL (so its "KL" is its own
    reward); ours refuses a batch of one."""
    from datasets import Dataset

    completions = ["paris", "the sea", "the sky", "a fox", "the dog", "0 1 2", "sorry", "a poem", "lazy"]
    dataset = Dataset.from_dict(
        {
            "prompt": [f"question {i}?" for i in range(9)],
            "completion": completions,
            "label": [True, False] * 4 + [True],
        }
    )
    trainer = object.__new__(KTOTrainer)
    trainer._tokenizer = tiny_tokenizer
    trainer.calculate_KL = True
    trainer.desirable_weight = trainer.undesirable_weight = 1.0
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=4)
    prepared = trainer._prepare_dataset(dataset, tiny_tokenizer, args, "eval")
    own, kl = prepared["completion_ids"], prepared["KL_completion_ids"]
    for start in (0, 4):  # two full blocks of 4
        block = own[start : start + 4]
        assert kl[start : start + 4] == [block[j] for j in mismatched_indices(4).tolist()]
    assert kl[8] == own[8]  # TRL: the last example, alone in its block, is paired with itself
    with pytest.raises(ValueError):
        mismatched_indices(1)
