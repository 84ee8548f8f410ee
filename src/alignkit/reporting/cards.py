"""Hugging Face cards for what alignkit writes: a model card (README.md) in every training run's final/, a
dataset card beside the data build-prefs / cai-label / cai-revise write, and the upload of final/ to the hub.
The cards are built with ``huggingface_hub``'s ModelCard / DatasetCard, so the metadata header is theirs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData

from alignkit.errors import AlignkitError

# The embedded default's upstream model and its license (SmolLM2's model card: Apache-2.0).
EMBEDDED_BASES = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
LICENSE_TODO = "# license: unknown to alignkit: set it to the base model's license before publishing"
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


class HubError(AlignkitError):
    """The hub could not be reached or refused the upload (push_to_hub)."""


# ---------------------------------------------------------------------------------------------
# What the cards say
# ---------------------------------------------------------------------------------------------


def hub_repo_id(name: str | None) -> str | None:
    """``name`` where it names a hub repo (``owner/name``, not a local path): the hub refuses a card whose
    base_model or datasets is anything else."""
    if not name or Path(name).expanduser().exists():
        return None
    return name if name.count("/") == 1 and not name.startswith((".", "/", "~")) else None


def hub_dataset_id(source: str | None) -> str | None:
    """``source`` where it names a hub dataset (a hub repo id without a data-file suffix)."""
    return None if source and source.endswith(_DATA_SUFFIXES) else hub_repo_id(source)


def base_model_and_license(model: str) -> tuple[str, str | None]:
    """The base model as the hub names it, and its license where a local card says it: the embedded
    default's known one, a local model directory's README.md, or a hub model's README.md already in the
    local cache (never a network call)."""
    if model in EMBEDDED_BASES:
        return EMBEDDED_BASES[model]
    path = Path(model).expanduser()
    readme: str | Path | None = path / "README.md" if path.is_dir() else None
    if readme is None and model.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "README.md")
        readme = cached if isinstance(cached, str) else None
    if readme is None or not Path(readme).is_file():
        return model, None
    license_ = ModelCard.load(readme).data.license
    return model, license_ if isinstance(license_, str) else None


def method_of(config: dict, stage: str) -> str:
    """The training method: the stage, or its objective where a stage has several (dpo's loss)."""
    return str(config.get("loss") or stage) if stage in ("dpo", "ipo", "orpo") else stage


def heldout_figures(summary: dict) -> dict:
    """The summary's held-out figures: eval_* and gold_* fields, and the eval metrics logged last."""
    figures = {k: v for k, v in summary.items() if k.startswith(("eval_", "gold_")) and v is not None}
    return figures


def _events(summary: dict) -> list[dict]:
    """The monitors' events: "monitor_events" in the offline stages' summary, "events" in the online ones'."""
    return list(summary.get("monitor_events") or summary.get("events") or [])


EVAL_COLUMNS = ["metric", "policy", "reference"]


def eval_table_rows(eval_result: dict) -> list[list]:
    """The policy-vs-reference table of an eval.json (``alignkit eval``): a [metric, policy, reference] row per
    figure (a mean for a figure with a spread; None where the reference has none)."""
    policy, reference = eval_result.get("policy") or {}, eval_result.get("reference_stats") or {}
    rows = []
    for key, value in policy.items():
        if isinstance(value, dict | list):
            if isinstance(value, dict) and "mean" in value:
                rows.append([key, value.get("mean"), (reference.get(key) or {}).get("mean")])
            continue
        rows.append([key, value, reference.get(key)])
    return rows


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_num(v) for v in row) + " |" for row in rows])


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _yaml_block(value: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(value, sort_keys=False, allow_unicode=True).rstrip() + "\n```"


def _with_license_comment(card_data: ModelCardData | DatasetCardData, license_: str | None) -> str:
    """The metadata header's YAML; without a known license a comment tells the user to fill it in."""
    text = card_data.to_yaml()
    return text if license_ else f"{text}\n{LICENSE_TODO}"


def model_card(config: dict, summary: dict, eval_result: dict | None = None) -> str:
    """The card of a run's final/ (README.md's text): from its config.yaml (as a dict), summary.json and
    eval.json if any. Text, not a ModelCard: a ModelCard writes its header again from its data, which drops
    the license comment."""
    stage = str(summary.get("stage") or "alignkit")
    method = method_of(config, stage)
    base, license_ = base_model_and_license(str(config.get("model") or summary.get("model")))
    datasets = [d for d in (hub_dataset_id(config.get("train_data")),) if d]
    data = ModelCardData(
        base_model=hub_repo_id(base),  # a local model folder is named in the text below, not in the header
        library_name="alignkit",
        tags=sorted({"alignkit", method, stage}),
        datasets=datasets or None,
        license=license_,
    )
    parts = [
        f"# {Path(str(summary.get('run_dir') or 'model')).name}",
        f"Trained with [alignkit](https://github.com/) `alignkit {stage}` ({method}) from `{base}`"
        f" on `{config.get('train_data') or 'the prompts shipped with alignkit'}`.",
        "## Training configuration\n\n" + _yaml_block(config),
    ]
    heldout = heldout_figures(summary)
    if heldout:
        parts.append("## Held-out results\n\n" + _yaml_block(heldout))
    if summary.get("final_metrics"):
        parts.append("## Last logged training metrics\n\n" + _yaml_block(summary["final_metrics"]))
    if eval_result:
        parts.append("## Evaluation (`alignkit eval`)\n\n" + markdown_table(EVAL_COLUMNS, eval_table_rows(eval_result)))
    events = _events(summary)
    parts.append(
        "## Monitor events\n\n"
        + ("\n".join(f"- {json.dumps(e, sort_keys=True)}" for e in events) if events else "None fired.")
    )
    return _checked(
        ModelCard, f"---\n{_with_license_comment(data, license_)}\n---\n\n" + "\n\n".join(parts) + "\n"
    )


def _checked(card_class: type, text: str) -> str:
    """``text``, once huggingface_hub has parsed it as a card (a header it cannot read fails here)."""
    card_class(text)
    return text


def write_model_card(run_path: Path) -> Path | None:
    """<run>/final/README.md from the run folder's config.yaml, summary.json and eval.json (where present);
    None where the run has no final/ yet."""
    final = run_path / "final"
    if not final.is_dir():
        return None
    config = read_yaml(run_path / "config.yaml")
    summary = json.loads((run_path / "summary.json").read_text(encoding="utf-8"))
    eval_path = run_path / "eval.json"
    eval_result = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None
    path = final / "README.md"
    path.write_text(model_card(config, summary, eval_result), encoding="utf-8")
    return path


def dataset_card_path(output: Path) -> Path:
    """``pairs.card.md`` for ``pairs.jsonl``, beside it as its ``pairs.summary.json`` is: several outputs may
    share one folder, where a README.md would be overwritten by the next one."""
    return output.with_suffix(".card.md")


def write_dataset_card(output: Path, stage: str, config: dict, summary: dict) -> Path:
    """The dataset card of a file build-prefs / cai-label / cai-revise wrote, beside it."""
    sources = [d for d in (hub_dataset_id(config.get(k)) for k in ("prompts", "data", "input")) if d]
    data = DatasetCardData(
        tags=sorted({"alignkit", stage}),
        source_datasets=sources or None,
        configs=[{"config_name": "default", "data_files": output.name}],
    )
    body = [
        f"# {output.name}",
        f"Written by `alignkit {stage}`.",
        "## Configuration\n\n" + _yaml_block(config),
        "## Summary\n\n" + _yaml_block(summary),
    ]
    header = _with_license_comment(data, None)
    path = dataset_card_path(output)
    path.write_text(
        _checked(DatasetCard, f"---\n{header}\n---\n\n" + "\n\n".join(body) + "\n"), encoding="utf-8"
    )
    return path


def read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# The hub
# ---------------------------------------------------------------------------------------------


def _api() -> HfApi:
    # HF_ENDPOINT read now, not when huggingface_hub was imported: a test (or a user) may point it elsewhere.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


_BEFORE_TRAINING = "check the network, HF_TOKEN (or `hf auth login`) and hub_model_id, or set push_to_hub=false"


def _hub_error(repo_id: str, what: str, err: Exception, advice: str = _BEFORE_TRAINING) -> HubError:
    # All of the client's lines, joined: the hub's own reason (a refused card header, a missing permission)
    # comes after its first line.
    reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400]
    return HubError(
        f"push_to_hub: cannot {what} {repo_id!r} at {os.environ.get('HF_ENDPOINT') or 'huggingface.co'} "
        f"({type(err).__name__}: {reason}); {advice}"
    )


def check_hub(repo_id: str, private: bool = False, advice: str = _BEFORE_TRAINING) -> None:
    """Create (or find) the model repo before training, so an offline or unauthorised run fails at once."""
    try:
        _api().create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    except Exception as err:  # every failure of the client (network, auth, offline mode) is the user's to fix
        raise _hub_error(repo_id, "create or reach", err, advice) from err


@dataclass(frozen=True)
class HubPush:
    """Where push_final put final/: summary.json's "pushed_to"."""

    repo_id: str
    repo_url: str
    commit_url: str
    commit: str  # the commit's id (sha)


def push_final(final_dir: Path, repo_id: str, private: bool = False) -> HubPush:
    """Upload final/ (weights, tokenizer, README.md card) to the hub model repo in one commit on main."""
    # After training, "set push_to_hub=false" would mean training again: say how to upload what is kept.
    advice = f"the trained model is kept in {final_dir}: upload it with `hf upload {repo_id} {final_dir}`"
    check_hub(repo_id, private, advice)
    try:
        commit = _api().upload_folder(
            repo_id=repo_id, folder_path=str(final_dir), commit_message="alignkit: upload final/"
        )
    except Exception as err:
        raise _hub_error(repo_id, "upload final/ to", err, advice) from err
    return HubPush(repo_id, str(commit.repo_url), commit.commit_url, commit.oid)
