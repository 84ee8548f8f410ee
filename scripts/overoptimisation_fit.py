"""Print the sqrt(KL) fit of gold and proxy change (alignkit.evaluation.gold_change.sqrt_kl_fit) for one run, or
pooled over several runs that answered the same held-out prompts:

    python scripts/overoptimisation_fit.py <run_dir> [<run_dir> ...]

Each run_dir is an online run with gold evaluations (gold_samples.jsonl, and metrics.jsonl's
gold_kl/per_response)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit.evaluation.gold_change import read_gold_samples, sqrt_kl_fit


def load(run: Path) -> tuple[dict, dict]:
    kl = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "gold_kl/per_response" in row:
            kl[int(row["step"])] = float(row["gold_kl/per_response"])
    return read_gold_samples(run / "gold_samples.jsonl"), kl


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    runs = [load(Path(a)) for a in argv]
    for key in ("gold", "proxy"):
        f = sqrt_kl_fit(runs, key=key)
        print(
            f"{key}: b {f['b']:+.4f} [{f['b_ci95'][0]:+.4f}, {f['b_ci95'][1]:+.4f}], peak at KL {f['peak_kl']:.0f} "
            f"nats; Gao beta {f['gao_beta']:+.4f} [{f['gao_beta_ci95'][0]:+.4f}, {f['gao_beta_ci95'][1]:+.4f}] "
            f"({f['evaluations']} evaluations; change = a d + b d^2 and d (alpha - beta log d), d = sqrt(KL))"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
