"""What the gold evaluations of an online run (``training.gold``, its gold_samples.jsonl) say about the policy
against the starting one: at each evaluation, the mean gold score's change from step 0's (as measured, and less
what the change in reply length alone predicts) and the gold win rate, each with a 95% percentile-bootstrap
interval over the held-out prompts. Every evaluation answers the same prompts in the same order, one sample each,
so the comparison is paired per prompt (the unit resampled).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignkit.evaluation.metrics import mean_ci, win_rate

SAMPLE_KEYS = ("step", "prompt", "response", "gold", "proxy")  # what training.gold writes per sample


def read_gold_samples(path: Path) -> dict[int, list[dict]]:
    """gold_samples.jsonl's rows by step, in file order; a line that is not JSON or lacks a key of SAMPLE_KEYS
    is an error naming the file and line."""
    by_step: dict[int, list[dict]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [k for k in SAMPLE_KEYS if k not in row]
            if missing:
                raise KeyError(", ".join(missing))
            by_step.setdefault(int(row["step"]), []).append(row)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: line {number} is not a gold sample row ({type(e).__name__}: {e})") from None
    return by_step


def length_slope(rows: list[dict]) -> float:
    """The least-squares slope of the gold score on the reply's length in characters over ``rows`` (0 when every
    reply is as long): how much of a gold change a length change alone would give, were the gold scorer's taste
    for length the same at every length."""
    lengths = np.array([len(r["response"]) for r in rows], dtype=np.float64)
    gold = np.array([float(r["gold"]) for r in rows])
    if lengths.size < 2 or np.ptp(lengths) == 0:
        return 0.0
    return float(np.polyfit(lengths, gold, 1)[0])


def gold_changes(by_step: dict[int, list[dict]], seed: int = 0) -> list[dict]:
    """One dict per evaluation after step 0, in step order: its mean gold and proxy score, the change of the mean
    gold score from step 0's (``change``, ``change_ci95``: the mean of the per-prompt differences), the same less
    what the replies' length change predicts (``length_adjusted_change`` and its ``_ci95``: each prompt's
    difference minus ``length_slope`` of step 0 x its difference in characters; a reward model that likes longer
    replies rewards a policy that writes longer ones), the mean length change (``length_change``, characters) and
    the gold win rate against step 0's sample of the same prompt (``win_rate``, ``win_rate_ci95``; a tie counts
    half), and the change of the mean proxy score on the same samples (``proxy_change``, ``proxy_change_ci95``).
    Empty without a step-0 evaluation (a run resumed past it keeps its rows; one started without gold has
    none). An evaluation whose prompts differ from step 0's (another gold_prompts) is an error, not a silent
    mismatch."""
    reference = by_step.get(0)
    if not reference:
        return []
    ref_gold = np.array([float(r["gold"]) for r in reference])
    ref_len = np.array([len(r["response"]) for r in reference], dtype=np.float64)
    slope = length_slope(reference)
    out = []
    for step in sorted(s for s in by_step if s > 0):
        rows = by_step[step]
        moved = change_between(by_step, 0, step, seed=seed)  # gold, proxy and length against step 0, paired
        gold = np.array([float(r["gold"]) for r in rows])
        length = np.array([len(r["response"]) for r in rows], dtype=np.float64)
        adjusted = mean_ci((gold - ref_gold - slope * (length - ref_len)).tolist(), seed=seed)
        wins = win_rate(gold.tolist(), ref_gold.tolist(), seed=seed)
        out.append(
            {
                "step": step,
                "gold": float(gold.mean()),
                "proxy": float(np.mean([float(r["proxy"]) for r in rows])),
                "change": moved["gold_change"],
                "change_ci95": moved["gold_change_ci95"],
                "length_change": moved["length_change"],
                "length_adjusted_change": adjusted.value,
                "length_adjusted_change_ci95": [adjusted.low, adjusted.high],
                "win_rate": wins.value,
                "win_rate_ci95": [wins.low, wins.high],
                "proxy_change": moved["proxy_change"],
                "proxy_change_ci95": moved["proxy_change_ci95"],
                "prompts": len(rows),
            }
        )
    return out


def change_between(by_step: dict[int, list[dict]], start: int, end: int, seed: int = 0) -> dict:
    """Evaluation ``end`` against evaluation ``start`` of the same run, paired per prompt: the change of the mean
    gold score and of the mean proxy score, each with its 95% bootstrap interval over the prompts, and of the
    mean reply length (characters). Over-optimisation reads as a gold change below 0 with a proxy change above."""
    a, b = by_step[start], by_step[end]
    if [r["prompt"] for r in a] != [r["prompt"] for r in b]:
        raise ValueError(f"gold samples of step {end} answer other prompts than step {start}'s: not comparable")

    def diff(key: str) -> list[float]:
        return [float(y[key]) - float(x[key]) for x, y in zip(a, b)]

    gold, proxy = mean_ci(diff("gold"), seed=seed), mean_ci(diff("proxy"), seed=seed)
    return {
        "from_step": start,
        "to_step": end,
        "gold_change": gold.value,
        "gold_change_ci95": [gold.low, gold.high],
        "proxy_change": proxy.value,
        "proxy_change_ci95": [proxy.low, proxy.high],
        "length_change": float(np.mean([len(y["response"]) - len(x["response"]) for x, y in zip(a, b)])),
    }


def gold_summary(path: Path | None, seed: int = 0) -> dict | None:
    """The summary's view of a run's gold samples (``path``): step 0's mean gold score, every evaluation's
    ``gold_changes``, the last and the best (highest mean gold) of them, and ``since_best``: the last evaluation
    against the best one (``change_between``; None when the last is the best). The best is picked after seeing
    every evaluation, so its score is the highest of several noisy ones and a fall from it reads larger than the
    policy's true change: a fall that later evaluations repeat, with the proxy rising, is the evidence of
    over-optimisation, not one interval. None without the file or a step-0 evaluation."""
    if path is None or not Path(path).is_file():
        return None
    by_step = read_gold_samples(path)
    changes = gold_changes(by_step, seed=seed)
    if not changes:
        return None
    best, last = max(changes, key=lambda c: c["gold"]), changes[-1]
    return {
        "reference_gold": float(np.mean([float(r["gold"]) for r in by_step[0]])),
        "length_slope": length_slope(by_step[0]),  # gold per character, step 0's replies
        "evaluations": changes,
        "last": last,
        "best": best,
        "since_best": None if best is last else change_between(by_step, best["step"], last["step"], seed=seed),
    }


def sqrt_kl_fit(
    runs: list[tuple[dict[int, list[dict]], dict[int, float]]], key: str = "gold", boots: int = 2000, seed: int = 0
) -> dict:
    """Does the change of the mean ``key`` score ("gold" or "proxy") bend down as the policy moves away from the
    start? A least-squares fit of every evaluation's change from its run's step 0 against d = sqrt(KL per
    response), change = a d + b d^2 (no intercept: no change at d = 0), pooled over ``runs`` (each its samples
    ``read_gold_samples`` and its KL per response by step), with a 95% percentile-bootstrap interval on b over the
    prompts (one resample of prompt indices applied to every run: they must answer the same prompts). b < 0 puts
    the peak at d = -a / 2b (``peak_kl`` = its square, nats; inf when b >= 0). Also Gao, Schulman & Hilton's form
    for RL, change = d (alpha - beta log d): ``gao_beta`` > 0 bends down, with its interval from the same
    resamples. Unlike a fall from the best evaluation, this picks no evaluation after seeing them. Steps without a
    KL are left out."""
    ds, changes, prompts = [], [], None
    for by_step, kl in runs:
        steps = sorted(s for s in by_step if s > 0 and s in kl)
        ref = np.array([float(r[key]) for r in by_step[0]])
        for step in steps:
            rows = by_step[step]
            if prompts is None:
                prompts = [r["prompt"] for r in rows]
            if [r["prompt"] for r in rows] != prompts:
                raise ValueError(f"gold samples of step {step} answer other prompts: the runs are not comparable")
            ds.append(np.sqrt(max(kl[step], 0.0)))
            changes.append(np.array([float(r[key]) for r in rows]) - ref)
    if len(ds) < 2:
        raise ValueError("a fit in sqrt(KL) needs at least two evaluations after step 0 with a KL")
    d, y = np.array(ds), np.stack(changes)  # (evaluations,), (evaluations, prompts)
    quadratic = np.stack([d, d**2], axis=1)
    gao = np.stack([d, d * np.log(np.maximum(d, 1e-12))], axis=1)  # alpha d + (-beta) d log d

    def fit(columns: np.ndarray) -> tuple[float, float, float]:
        mean = y[:, columns].mean(axis=1)
        a, b = np.linalg.lstsq(quadratic, mean, rcond=None)[0]
        return float(a), float(b), -float(np.linalg.lstsq(gao, mean, rcond=None)[0][1])

    n = y.shape[1]
    a, b, beta = fit(np.arange(n))
    rng = np.random.default_rng(seed)
    resampled = np.array([fit(rng.integers(0, n, n))[1:] for _ in range(boots)])
    (b_low, beta_low), (b_high, beta_high) = np.percentile(resampled, [2.5, 97.5], axis=0)
    return {
        "a": a,
        "b": b,
        "b_ci95": [float(b_low), float(b_high)],
        "peak_kl": (a / (2 * b)) ** 2 if b < 0 else float("inf"),
        "gao_beta": beta,
        "gao_beta_ci95": [float(beta_low), float(beta_high)],
        "evaluations": len(ds),
    }
