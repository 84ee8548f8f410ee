"""Append-only output with a progress ledger: long generation jobs resume without losing or redoing work.

A job writes each finished unit (a prompt's pairs, a revision) to the output and then one entry to
`<output>.progress.jsonl`, both synced to disk; the ledger's first line holds the settings. On restart
`resume` keeps exactly the finished units, drops a torn last line or a half-written unit, and refuses to
continue with other settings. Used by build-prefs, cai-revise and cai-label, which also share the steps around
it here: the output's name (``jsonl_output``), the settings the ledger records (``content_settings``), a fresh
start (``remove_output``), the finished entries (``ledger_entries``) and the summary (``write_summary``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, config_to_dict


def progress_path(output: Path) -> Path:
    return output.with_suffix(".progress.jsonl")


def summary_path(output: Path) -> Path:
    return output.with_suffix(".summary.json")


def jsonl_output(output: str, appended: str) -> Path:
    """``output`` as a path; an error unless it names a .jsonl file (``appended``: how the stage appends to
    it, for the message)."""
    if Path(output).suffix != ".jsonl":
        raise ConfigError(f"output must be a .jsonl file (it is appended to {appended}), got {output}")
    return Path(output)


def content_settings(cfg: Any, names: Collection[str], **derived: Any) -> dict:
    """The settings that decide what the output holds, as its ledger records them: the config fields
    ``names``, then ``derived`` ones (a hash of the constitution's text), then a sampling stage's
    generation_backend when it is not hf (vLLM draws other samples; an hf output begun before the backend was
    recorded resumes)."""
    settings = {k: v for k, v in config_to_dict(cfg).items() if k in names} | derived
    if getattr(cfg, "generation_backend", "hf") != "hf":
        settings["generation_backend"] = cfg.generation_backend
    return settings


def remove_output(output: Path) -> None:
    """Start afresh (overwrite=true): the output and its ledger go."""
    for path in (output, progress_path(output)):
        path.unlink(missing_ok=True)


def ledger_entries(output: Path) -> list[dict]:
    """The ledger's entry of every finished unit (this run's and earlier runs'), without the settings line."""
    return [json.loads(line) for line in complete_lines(progress_path(output))[1:]]


def write_summary(output: Path, summary: dict) -> None:
    """``<output>.summary.json``, written whole or not at all (a temporary file moved into place)."""
    path = summary_path(output)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of ``path``; a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return text[: text.rfind("\n") + 1].splitlines()


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as a whole JSONL file at ``path`` (its folder made if missing), written to a temporary file and
    moved into place: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _rewrite(path, [json.dumps(row) for row in rows])


def resume(output: Path, settings: dict, renamed: dict[str, str] | None = None) -> dict[int, dict]:
    """Finished prompts of an earlier run of the same settings (prompt_row -> its counts), with the output
    cut back to exactly their lines: lines of a prompt the run was writing when it stopped are dropped.
    ``renamed``: old -> new names of settings renamed since (an older alignkit's ledger compares under the new,
    except a name ``settings`` still spells: build-prefs resumes a ledger in its old reward spelling)."""
    ledger = progress_path(output)
    if not ledger.exists():
        if output.exists() and output.stat().st_size:
            raise ConfigError(
                f"output: {output} exists but has no {ledger.name} to resume from; use another output, "
                "or overwrite=true to start it afresh"
            )
        return {}
    entries = [json.loads(line) for line in complete_lines(ledger)]
    if not entries and not (output.exists() and output.stat().st_size):
        ledger.unlink()  # killed before the first prompt finished: nothing to keep
        return {}
    recorded = entries[0].get("settings") if entries else None
    if isinstance(recorded, dict):
        recorded = {k if k in settings else (renamed or {}).get(k, k): v for k, v in recorded.items()}
    if recorded != settings:
        old = recorded if isinstance(recorded, dict) else {}
        changed = [k for k in settings if old.get(k) != settings[k]]
        raise ConfigError(
            f"output: {output} was started with other settings ({', '.join(changed) or 'unreadable'}: "
            f"{[old.get(k) for k in changed]} then, {[settings[k] for k in changed]} now); resume with the "
            "same settings, use another output, or overwrite=true"
        )
    done = {e["prompt_row"]: e for e in entries[1:]}
    lines = complete_lines(output)
    kept = [line for line in lines if json.loads(line)["prompt_row"] in done]
    written: dict[int, int] = {}
    for line in kept:
        row = json.loads(line)["prompt_row"]
        written[row] = written.get(row, 0) + 1
    broken = [r for r, e in done.items() if written.get(r, 0) != e["n_lines"]]
    if broken:
        raise ConfigError(
            f"output: {output} does not hold the lines {ledger.name} records for prompt rows {broken[:5]}; "
            "it was edited or truncated. Use another output, or overwrite=true"
        )
    # Rewritten with the kept lines only: drops the lines of an unfinished prompt and torn last lines.
    _rewrite(output, kept)
    _rewrite(ledger, [json.dumps(e) for e in entries])
    return done


class Writer:
    """Appends one prompt's lines to the output, then its entry to the progress file, each synced to disk.

    The entry goes last, so a kill between the two leaves lines of an unlisted prompt, which ``resume``
    removes before that prompt is redone.
    """

    def __init__(self, output: Path, settings: dict, fresh: bool):
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = open(output, "a", encoding="utf-8")
        self.ledger = open(progress_path(output), "a", encoding="utf-8")
        if fresh:
            self._append(self.ledger, [{"settings": settings}])

    def add_prompt(self, prompt_row: int, lines: list[dict], counts: dict) -> None:
        self._append(self.output, lines)
        self._append(self.ledger, [{"prompt_row": prompt_row, "n_lines": len(lines), **counts}])

    @staticmethod
    def _append(f, rows: list[dict]) -> None:
        if rows:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self.output.close()
        self.ledger.close()
