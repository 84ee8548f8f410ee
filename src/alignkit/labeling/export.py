"""Preference pairs from the labels: the JSONL that ``alignkit dpo``, ``rm`` and ``kto`` read as written
(``prompt``, ``chosen``, ``rejected``).

Per item, each labeler's ranking says of every two responses a > b, b > a or a tie. A pair (a, b) is written
with a chosen when ``majority`` (more than half of the labelers who ranked the item) or ``unanimous`` (all of
them) say a > b; ties and disagreements are left out and counted. Which pairs are candidates: ``best-worst``,
the best group x the worst group of any labeler's ranking; ``all``, every two responses. An item any labeler
flagged unsafe is left out whole; skipped items carry no ranking.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from alignkit.data.io import DataSourceError
from alignkit.labeling.agreement import agreement_stats, fractional_ranks
from alignkit.labeling.storage import Item, Label, Labeler, open_db
from alignkit.scoring.rankers import RankedPrompt

PairsMode = Literal["best-worst", "all"]
Agreement = Literal["majority", "unanimous"]


def scores(groups: list[list[int]]) -> dict[int, int]:
    """Response number -> rank score, higher is better: group k of G (best first) scores G - k."""
    return {number: len(groups) - k for k, group in enumerate(groups) for number in group}


def candidates(rankings: list[list[list[int]]], n: int, mode: PairsMode) -> set[tuple[int, int]]:
    """Unordered pairs (a < b) of response numbers to decide."""
    if mode == "all":
        return set(itertools.combinations(range(1, n + 1), 2))
    out: set[tuple[int, int]] = set()
    for groups in rankings:
        if len(groups) > 1:  # a ranking of one group ties everything: no best-vs-worst pair
            out |= {(min(a, b), max(a, b)) for a in groups[0] for b in groups[-1]}
    return out


def decide(rankings: list[list[list[int]]], a: int, b: int, agreement: Agreement) -> tuple[int, int] | None:
    """(chosen, rejected) when the labelers agree enough that one is better; None for a tie or a split."""
    votes = Counter()
    for groups in rankings:
        sc = scores(groups)
        votes[(a, b) if sc[a] > sc[b] else (b, a) if sc[b] > sc[a] else "tie"] += 1
    need = len(rankings) if agreement == "unanimous" else len(rankings) // 2 + 1
    for order in ((a, b), (b, a)):
        if votes[order] >= need:
            return order
    return None


def item_pairs(
    key: int, prompt, responses: list[str], rankings: list[list[list[int]]], mode: PairsMode,
    agreement: Agreement, counts: Counter,
) -> list[dict]:
    """The pair rows of one item from its labelers' rankings; undecided pairs are counted in ``counts``."""
    rows = []
    for a, b in sorted(candidates(rankings, len(responses), mode)):
        order = decide(rankings, a, b, agreement)
        if order is None or responses[order[0] - 1] == responses[order[1] - 1]:
            counts["pairs_undecided"] += 1  # a tie, a split vote, or two identical texts
            continue
        rows.append({
            "prompt": prompt,
            "chosen": responses[order[0] - 1],
            "rejected": responses[order[1] - 1],
            "prompt_row": key,
            "chosen_number": order[0],
            "rejected_number": order[1],
            "n_labelers": len(rankings),
        })  # fmt: skip
    counts["pairs"] += len(rows)
    counts["items_with_pairs"] += bool(rows)
    return rows


def new_counts() -> Counter:
    return Counter(items=0, items_unlabeled=0, items_flagged=0, items_skipped_only=0, items_with_pairs=0,
                   pairs=0, pairs_undecided=0, labels=0)  # fmt: skip


def labeled_items(engine: Engine) -> list[tuple[Item, list[Label]]]:
    """Every item with its labels, in item order."""
    with Session(engine) as s:
        labels_of: dict[int, list[Label]] = {}
        for label in s.scalars(select(Label).order_by(Label.item_id, Label.labeler_id)):
            labels_of.setdefault(label.item_id, []).append(label)
        items = list(s.scalars(select(Item).order_by(Item.id)))
        s.expunge_all()
    return [(item, labels_of.get(item.id, [])) for item in items]


def export_pairs(engine: Engine, mode: PairsMode, agreement: Agreement) -> tuple[list[dict], dict]:
    """The pair rows, and the counts of what was written and left out."""
    counts = new_counts()
    rows: list[dict] = []
    for item, labels in labeled_items(engine):
        counts["items"] += 1
        counts["labels"] += len(labels)
        if not labels:
            counts["items_unlabeled"] += 1
            continue
        if any(lb.kind == "flag" for lb in labels):
            counts["items_flagged"] += 1
            continue
        rankings = [json.loads(lb.ranking) for lb in labels if lb.kind == "ranked"]
        if not rankings:
            counts["items_skipped_only"] += 1
            continue
        rows += item_pairs(item.key, json.loads(item.prompt), json.loads(item.responses), rankings, mode,
                           agreement, counts)  # fmt: skip
    return rows, dict(counts)


def agreement_of(engine: Engine, threshold: float = 0.5, min_comparisons: int = 5) -> dict:
    """``agreement.agreement_stats`` over the database's rankings (flagged and skipped labels carry none)."""
    with Session(engine) as s:
        names = {row[0]: row[1] for row in s.execute(select(Labeler.id, Labeler.name))}
    items: dict[int, dict[str, list[list[int]]]] = {}
    sizes: dict[int, int] = {}
    for item, labels in labeled_items(engine):
        sizes[item.id] = len(json.loads(item.responses))
        items[item.id] = {names[lb.labeler_id]: json.loads(lb.ranking) for lb in labels if lb.kind == "ranked"}
    return agreement_stats(items, sizes, threshold, min_comparisons)


def is_label_db(spec: str) -> bool:
    """A label database rather than a file: a ``.label.db`` (or ``.db``) SQLite file or a SQLAlchemy URL."""
    return "://" in spec or spec.endswith(".db")


def db_url(spec: str) -> str:
    """The SQLAlchemy URL of ``spec``; a SQLite file that is not there is an error (not a new empty database)."""
    if "://" in spec:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataSourceError(f"human_rankings: label database {spec} not found")
    return f"sqlite:///{path.resolve()}"


def ranked_prompts(spec: str) -> tuple[list[RankedPrompt], int]:
    """The database's items as ``build-prefs ranker=human`` reads a ranked file: response k scores minus its
    mean fractional rank (1 = best) over the labelers who ranked the item, so one labeler's ranking scores
    as that ranking and several are averaged (equal means are ties). Items flagged unsafe by anyone, only
    skipped or not labeled are left out. Returns (ranked items, items in the database)."""
    engine = open_db(db_url(spec))
    out = []
    labeled = labeled_items(engine)
    for item, labels in labeled:
        rankings = [json.loads(lb.ranking) for lb in labels if lb.kind == "ranked"]
        if not rankings or any(lb.kind == "flag" for lb in labels):
            continue
        responses = json.loads(item.responses)
        ranks = [fractional_ranks(groups) for groups in rankings]
        scores: list[float | None] = [-sum(r[k] for r in ranks) / len(ranks) for k in range(1, len(responses) + 1)]
        out.append(RankedPrompt(item.key, json.loads(item.prompt), responses, scores, {}))
    return out, len(labeled)
