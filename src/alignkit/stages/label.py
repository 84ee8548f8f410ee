"""`alignkit label serve|tokens|export input=prefs.export.jsonl`: people rank model responses in a web app.

- ``label tokens input=... add_labeler=NAME [admin=true]`` prints a fresh token for NAME, once (stored hashed).
- ``label serve input=... [add_labeler=NAME] [host=127.0.0.1 port=8765]`` serves the labeling app
  (``alignkit.labeling.app``) over the input: a ``build-prefs ranker=export`` file or any prompt + responses JSONL.
- ``label export input=... [output=...] [pairs=best-worst|all] [agreement=majority|unanimous]`` writes the
  preference pairs ``alignkit dpo`` / ``rm`` / ``kto`` read (``alignkit.labeling.export``), and prints how
  much the labelers agree (``alignkit.labeling.agreement``).
- ``label import input=<export of Label Studio or Argilla> format=label-studio|argilla`` writes the same pairs
  from labels made in those tools (``alignkit.labeling.importers``).

The labels live in a database (``alignkit.labeling.storage``): SQLite beside the input unless ``db=`` gives a
SQLAlchemy URL.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignkit.config import ConfigError, doc_field, required
from alignkit.data.appendlog import write_jsonl
from alignkit.stages import Stage


@dataclass
class LabelConfig:
    """Serve the labeling app, hand out labeler tokens, or export the labels as preference pairs."""

    action: Literal["serve", "tokens", "export", "import"] = doc_field(
        "serve", "serve: the web app; tokens: a fresh token for add_labeler; export: write the pairs; "
        "import: pairs from a Label Studio or Argilla export.",
    )
    input: str = required(
        "The file to label: a build-prefs ranker=export file or prompt + responses JSONL; for import, the "
        "Label Studio / Argilla export (.json or .jsonl)."
    )
    db: str | None = doc_field(
        None, "SQLAlchemy URL of the label database; None: SQLite <input without .jsonl>.label.db beside it."
    )
    add_labeler: str | None = doc_field(
        None, "Create this labeler (or give them a fresh token) and print the token once; serve, tokens."
    )
    admin: bool = doc_field(False, "The labeler add_labeler creates may open the admin page (/admin).")
    host: str = doc_field("127.0.0.1", "Address to serve on; anything but loopback needs TLS in front.")
    port: int = doc_field(8765, "Port to serve on.", ge=1, le=65535)
    output: str | None = doc_field(None, "export: the pairs .jsonl; None: <input without .jsonl>.pairs.jsonl.")
    pairs: Literal["best-worst", "all"] = doc_field(
        "best-worst", "export: best group x worst group of each ranking, or every two responses."
    )
    agreement: Literal["majority", "unanimous"] = doc_field(
        "majority", "export, several labelers on one item: a pair needs more than half of them, or all."
    )
    overwrite: bool = doc_field(False, "export: replace an existing output instead of refusing it.")
    format: Literal["label-studio", "argilla"] | None = doc_field(
        None, "import: the tool that wrote input: Label Studio's pairwise JSON export, or Argilla's records."
    )
    prompt_field: str = doc_field("prompt", "import: the data field (Label Studio) or field (Argilla) of the prompt.")
    left_field: str = doc_field("text1", "import, label-studio: the data field of the left text (first in toName).")
    right_field: str = doc_field("text2", "import, label-studio: the data field of the right text.")
    question: str = doc_field("ranking", "import, argilla: the name of the RankingQuestion.")
    low_agreement: float = doc_field(
        0.5, "serve (admin page), export: list labelers whose pairwise agreement with the rest is below this.",
        ge=0.0, le=1.0,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def bind_warning(host: str) -> str | None:
    """What ``label serve`` warns of before serving on ``host``: anything but loopback sends tokens in clear."""
    if is_loopback(host):
        return None
    return (f"warning: serving on {host}, not loopback: tokens and labels travel in clear unless a "
            "TLS-terminating proxy is in front")  # fmt: skip


def output_path(cfg: LabelConfig) -> Path:
    if cfg.output:
        return Path(cfg.output).expanduser()
    path = Path(cfg.input).expanduser()
    return path.with_name(path.name.removesuffix(".jsonl").removesuffix(".json") + ".pairs.jsonl")


def run(cfg: LabelConfig) -> dict:
    from alignkit.labeling import storage

    if cfg.action == "import":
        return import_labels(cfg)
    items = storage.read_input(cfg.input)  # a malformed input stops here, before any database is made
    url = cfg.db or storage.default_url(cfg.input)
    engine = storage.open_db(url)
    storage.load_items(engine, items)
    summary: dict = {"stage": "label", "action": cfg.action, "db": url, "items": len(items)}
    if cfg.add_labeler:
        token = storage.add_labeler(engine, cfg.add_labeler, cfg.admin)
        # Printed once and never stored in clear: a lost token is replaced by running tokens again.
        print(f"labeler {cfg.add_labeler}{' (admin)' if cfg.admin else ''}: token {token}", flush=True)
        summary["labeler"] = cfg.add_labeler
    elif cfg.action == "tokens":
        raise ConfigError("label tokens needs add_labeler=<name>", ("add_labeler",))
    if cfg.action == "serve":
        serve(engine, cfg)
    elif cfg.action == "export":
        summary.update(export(engine, cfg))
    return summary


def serve(engine, cfg: LabelConfig) -> None:
    import uvicorn

    from alignkit.labeling.app import create_app

    warning = bind_warning(cfg.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"labeling at http://{cfg.host}:{cfg.port}/ (ctrl-c stops; every submit is already saved)", flush=True)
    uvicorn.run(create_app(engine, cfg.low_agreement), host=cfg.host, port=cfg.port, log_level="warning")


def export(engine, cfg: LabelConfig) -> dict:
    from alignkit.labeling.export import agreement_of, export_pairs

    output = output_path(cfg)
    if output.exists() and not cfg.overwrite:
        raise ConfigError(f"output: {output} already exists; pass overwrite=true to replace it", ("output",))
    rows, counts = export_pairs(engine, cfg.pairs, cfg.agreement)
    write_jsonl(output, rows)
    print(
        f"wrote {counts['pairs']} pairs ({cfg.pairs}, {cfg.agreement}) from {counts['items_with_pairs']} of "
        f"{counts['items']} items to {output}; left out: {counts['items_flagged']} flagged, "
        f"{counts['items_skipped_only']} only skipped, {counts['items_unlabeled']} unlabeled items, "
        f"{counts['pairs_undecided']} tied or split pairs",
        flush=True,
    )
    ag = agreement_of(engine, cfg.low_agreement)
    print(agreement_line(ag), flush=True)
    return {"output": str(output), **counts, "agreement": ag}


def import_labels(cfg: LabelConfig) -> dict:
    from alignkit.labeling.importers import import_pairs

    if cfg.format is None:
        raise ConfigError("label import needs format=label-studio or format=argilla", ("format",))
    output = output_path(cfg)
    if output.exists() and not cfg.overwrite:
        raise ConfigError(f"output: {output} already exists; pass overwrite=true to replace it", ("output",))
    rows, counts = import_pairs(cfg.input, cfg.format, cfg.pairs, cfg.agreement, cfg.prompt_field,
                                cfg.left_field, cfg.right_field, cfg.question)  # fmt: skip
    write_jsonl(output, rows)
    # Argilla's draft and discarded responses are not labels; saying how many keeps a half-finished project visible.
    unsubmitted = (f", {counts['labels_draft']} draft and {counts['labels_discarded']} discarded responses"
                   if cfg.format == "argilla" else "")  # fmt: skip
    print(f"wrote {counts['pairs']} pairs ({cfg.pairs}, {cfg.agreement}) from {counts['items_with_pairs']} of "
          f"{counts['items']} {cfg.format} items to {output}; left out: {counts['items_unlabeled']} unlabeled "
          f"items, {counts['pairs_undecided']} tied or split pairs{unsubmitted}", flush=True)  # fmt: skip
    return {"stage": "label", "action": "import", "format": cfg.format, "output": str(output), **counts}


def agreement_line(ag: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    low = ", ".join(ag["low_agreement"]) or "none"
    return (f"agreement over {ag['items_multi']} items with several rankings: pairwise {fmt(ag['pairwise_agreement'])}, "
            f"Krippendorff's alpha (interval, ranks) {fmt(ag['alpha'])}; below {ag['low_agreement_threshold']}: {low}")


STAGE = Stage("label", LabelConfig, run, positional="action", prints_results=True)
