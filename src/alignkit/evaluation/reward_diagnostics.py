"""Does a reward model prefer the better reply, or just the shorter (or longer) one? Pure functions over each
held-out pair's (chosen_reward, rejected_reward, chosen_len, rejected_len): accuracy beside the length-rule
and log-prob baselines, accuracy in length buckets, the reward's correlation with length, agreement with the
length rule, and Bradley-Terry calibration. Used by `alignkit rm`, `alignkit score` (pairs) and
`alignkit rm-eval`.

Conventions: lengths are reply tokens; a tie (equal rewards, equal lengths) counts half, as in AlpacaEval's
win rate; every interval is a 95% percentile bootstrap over pairs (``metrics.mean_ci``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from alignkit.evaluation.metrics import Estimate, mean_ci, pearson

# Length-matched bucket: |len_c - len_r| <= LENGTH_MATCH_TOLERANCE * max(len_c, len_r), i.e. the shorter reply
# is at least 80% as long as the longer one. Wide enough to hold a fair share of HH-RLHF pairs, narrow enough
# that the length rules sit near chance inside it.
LENGTH_MATCH_TOLERANCE = 0.2
# Warn when the model's accuracy interval reaches down to the better length rule's accuracy, or when it agrees
# with that rule on more than this share of pairs.
AGREEMENT_WARNING = 0.75
CALIBRATION_BINS = 5


def pair_outcomes(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> np.ndarray:
    """(N,) 1.0 where chosen scores higher, 0.0 where lower, 0.5 on a tie."""
    c, r = np.asarray(chosen_scores, dtype=np.float64), np.asarray(rejected_scores, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"{c.size} chosen scores but {r.size} rejected scores")
    return np.where(c == r, 0.5, (c > r).astype(np.float64))


def length_matched(
    chosen_len: Sequence[int], rejected_len: Sequence[int], tolerance: float = LENGTH_MATCH_TOLERANCE
) -> np.ndarray:
    """(N,) bool: the two replies are about as long as each other (see LENGTH_MATCH_TOLERANCE)."""
    c, r = np.asarray(chosen_len, dtype=np.float64), np.asarray(rejected_len, dtype=np.float64)
    return np.abs(c - r) <= tolerance * np.maximum(c, r)


def agreement(
    chosen_rewards: Sequence[float], rejected_rewards: Sequence[float], chosen_len, rejected_len, rule: str
) -> np.ndarray:
    """(N,) 1.0 where the model prefers the reply the length rule ("shorter" or "longer") prefers, 0.0 where
    it prefers the other, 0.5 where either the rewards or the lengths tie."""
    model = np.sign(np.asarray(chosen_rewards, np.float64) - np.asarray(rejected_rewards, np.float64))
    sign = -1.0 if rule == "shorter" else 1.0
    by_length = np.sign(sign * (np.asarray(chosen_len, np.float64) - np.asarray(rejected_len, np.float64)))
    return np.where((model == 0) | (by_length == 0), 0.5, (model == by_length).astype(np.float64))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (as scipy.stats.rankdata 'average')."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    return pearson(average_ranks(x).tolist(), average_ranks(y).tolist())


def correlation_ci(
    x: Sequence[float], y: Sequence[float], method: str, n_boot: int = 1000, seed: int = 0
) -> Estimate:
    """Pearson ("pearson") or Spearman ("spearman") correlation with a percentile-bootstrap 95% interval."""
    f = pearson if method == "pearson" else spearman
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = [f(xa[i].tolist(), ya[i].tolist()) for i in rng.integers(0, xa.size, (n_boot, xa.size))]
    low, high = np.quantile(boots, [0.025, 0.975])
    return Estimate(f(xa.tolist(), ya.tolist()), float(low), float(high), int(xa.size))


@dataclass
class CalibrationBin:
    low: float  # confidence range [low, high)
    high: float
    n: int
    # None when the bin is empty (null in summary.json: NaN is not JSON)
    confidence: float | None  # mean max(p, 1 - p), p = sigmoid(r_c - r_r)
    accuracy: float | None  # share of its pairs where the model prefers chosen (ties half)


def calibration(
    chosen_rewards: Sequence[float], rejected_rewards: Sequence[float], n_bins: int = CALIBRATION_BINS
) -> tuple[list[CalibrationBin], float]:
    """Bradley-Terry calibration: bins of the model's confidence max(p, 1 - p), p = sigmoid(r_c - r_r), and
    the expected calibration error ECE = sum_b n_b / N * |accuracy_b - confidence_b| (Guo et al. 2017).

    The label is always "chosen", so p itself would be compared with an accuracy of 1 in every bin; the
    confidence in the side the model picks, against how often that pick is right, is the usual reading.
    """
    gap = np.asarray(chosen_rewards, np.float64) - np.asarray(rejected_rewards, np.float64)
    p = 0.5 * (1.0 + np.tanh(gap / 2.0))  # sigmoid without overflow
    confidence = np.maximum(p, 1.0 - p)  # (N,) in [0.5, 1]
    correct = np.where(gap == 0, 0.5, (gap > 0).astype(np.float64))
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)  # 1.0 -> last bin
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = index == b
        n = int(sel.sum())
        conf = float(confidence[sel].mean()) if n else None
        acc = float(correct[sel].mean()) if n else None
        if n:
            ece += n / gap.size * abs(acc - conf)
        bins.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), n, conf, acc))
    return bins, float(ece)


def _est(values: np.ndarray, seed: int) -> dict | None:
    if values.size == 0:
        return None
    e = mean_ci(values.tolist(), seed=seed)
    return {"value": e.value, "ci95": [e.low, e.high], "n": e.n}


@dataclass
class RewardDiagnostics:
    """What `diagnose` finds; ``to_dict`` is the JSON written into summary.json and rm-eval's outputs."""

    n_pairs: int
    accuracy: dict  # {"value", "ci95", "n"}
    baselines: dict  # name -> {"value", "ci95", "n"}: prefer_shorter, prefer_longer, [base_logprob]
    length_rule: str  # "shorter" or "longer": the better length rule on these pairs
    buckets: dict  # "length_matched" / "length_differs" -> {"rule", "n", "accuracy", "length_rule_accuracy"}
    length_correlation: dict  # "pearson" / "spearman" -> {"value", "ci95", "n"} over all 2N replies
    agreement_with_length_rule: dict  # {"value", "ci95", "n"}
    calibration: list[dict]
    ece: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def diagnose(
    chosen_rewards: Sequence[float],
    rejected_rewards: Sequence[float],
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
    chosen_logprob: Sequence[float] | None = None,
    rejected_logprob: Sequence[float] | None = None,
    seed: int = 0,
) -> RewardDiagnostics:
    """Every diagnostic of a reward model on N held-out pairs. ``*_logprob``: the base model's mean log-prob
    of each reply, for the zero-shot baseline (optional)."""
    n = len(chosen_rewards)
    if not n or not (len(rejected_rewards) == len(chosen_len) == len(rejected_len) == n):
        raise ValueError("diagnose needs N >= 1 pairs with a reward and a length for each side")
    correct = pair_outcomes(chosen_rewards, rejected_rewards)
    c_len, r_len = np.asarray(chosen_len, np.float64), np.asarray(rejected_len, np.float64)
    shorter, longer = pair_outcomes(-c_len, -r_len), pair_outcomes(c_len, r_len)
    baselines = {"prefer_shorter": _est(shorter, seed), "prefer_longer": _est(longer, seed)}
    if chosen_logprob is not None and rejected_logprob is not None:
        baselines["base_logprob"] = _est(pair_outcomes(chosen_logprob, rejected_logprob), seed)
    # The better of the two length rules on these very pairs: a generous baseline, chosen after the fact.
    rule = "shorter" if shorter.mean() >= longer.mean() else "longer"
    rule_correct = shorter if rule == "shorter" else longer
    matched = length_matched(c_len, r_len)
    buckets = {}
    for name, sel, text in (
        ("length_matched", matched, f"|len_c - len_r| <= {LENGTH_MATCH_TOLERANCE:g} * max(len_c, len_r)"),
        ("length_differs", ~matched, f"|len_c - len_r| > {LENGTH_MATCH_TOLERANCE:g} * max(len_c, len_r)"),
    ):
        buckets[name] = {
            "rule": text,
            "n": int(sel.sum()),
            "accuracy": _est(correct[sel], seed),
            "length_rule_accuracy": _est(rule_correct[sel], seed),
        }
    rewards = np.concatenate(
        [np.asarray(chosen_rewards, np.float64), np.asarray(rejected_rewards, np.float64)]
    )  # (2N,)
    lengths = np.concatenate([c_len, r_len])
    correlation = {}
    for method in ("pearson", "spearman"):
        e = correlation_ci(rewards, lengths, method, seed=seed)
        correlation[method] = {"value": e.value, "ci95": [e.low, e.high], "n": e.n}
    agree = _est(agreement(chosen_rewards, rejected_rewards, c_len, r_len, rule), seed)
    bins, ece = calibration(chosen_rewards, rejected_rewards)
    acc = _est(correct, seed)
    rule_acc = baselines[f"prefer_{rule}"]["value"]
    warnings = []
    if acc["ci95"][0] <= rule_acc:
        warnings.append(
            f"the reward model barely beats the length rule: accuracy {acc['value']:.3f} "
            f"[{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] reaches down to prefer-{rule}'s {rule_acc:.3f}"
        )
    if agree["value"] > AGREEMENT_WARNING:
        warnings.append(
            f"the reward model agrees with 'prefer the {rule} reply' on {agree['value']:.0%} of pairs "
            f"(> {AGREEMENT_WARNING:.0%}): it may have learned length rather than preference"
        )
    return RewardDiagnostics(
        n_pairs=n,
        accuracy=acc,
        baselines=baselines,
        length_rule=rule,
        buckets=buckets,
        length_correlation=correlation,
        agreement_with_length_rule=agree,
        calibration=[asdict(b) for b in bins],
        ece=ece,
        warnings=warnings,
    )


def _ci(e: dict | None) -> str:
    return "-" if e is None else f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"


def table_rows(d: dict) -> list[tuple[str, str]]:
    """(label, value) rows of a ``RewardDiagnostics.to_dict()``, for the console, markdown and HTML."""
    rows = [("pairs", str(d["n_pairs"])), ("accuracy", _ci(d["accuracy"]))]
    for name, est in d["baselines"].items():
        rows.append((f"baseline: {name.replace('_', ' ')}", _ci(est)))
    for name, b in d["buckets"].items():
        rows.append(
            (
                f"{name.replace('_', ' ')} (n={b['n']})",
                f"{_ci(b['accuracy'])}; prefer-{d['length_rule']} {_ci(b['length_rule_accuracy'])}",
            )
        )
    for m, e in d["length_correlation"].items():
        low, high = e["ci95"]
        rows.append((f"corr(reward, length) {m}", f"{e['value']:+.3f} [{low:+.3f}, {high:+.3f}]"))
    rows.append(("length-matched rule", d["buckets"]["length_matched"]["rule"]))
    rows.append((f"agrees with prefer-{d['length_rule']}", _ci(d["agreement_with_length_rule"])))
    bins = "  ".join(
        f"{b['low']:.1f}-{b['high']:.1f}: n={b['n']}"
        + (f" conf {b['confidence']:.2f} acc {b['accuracy']:.2f}" if b["n"] else "")
        for b in d["calibration"]
    )
    rows.append(("calibration ECE", f"{d['ece']:.3f}"))
    rows.append(("calibration bins", bins))
    return rows


def format_text(d: dict, title: str) -> str:
    """A plain-text table for the console, with the warnings under it."""
    rows = table_rows(d)
    width = max(len(label) for label, _ in rows)
    lines = [title] + [f"  {label:<{width}}  {value}" for label, value in rows]
    lines += [f"  WARNING: {w}" for w in d["warnings"]]
    return "\n".join(lines)


def format_markdown(d: dict, title: str) -> str:
    """A markdown table (one per preference file in rm-eval), with the warnings under it."""
    lines = [f"### {title}", "", "| measure | value |", "|---|---|"]
    lines += [f"| {label} | {value.replace('|', '/')} |" for label, value in table_rows(d)]
    lines += [""] + [f"**Warning:** {w}" for w in d["warnings"]]
    return "\n".join(lines) + "\n"
