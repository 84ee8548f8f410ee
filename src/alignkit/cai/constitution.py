"""The constitution of Constitutional AI (Bai et al. 2022, arXiv:2212.08073): a YAML list of principles,
each with a critique request and a revision request (the supervised critique -> revision phase), a
comparison instruction (the AI-feedback judge of the RL phase) and a priority that settles conflicts.
An optional ``guidelines:`` list gives written rulings for edge cases where principles conflict (the second
remedy, after the priority order): shown to the judge with the principles they apply to, and applied by the
program checks where a guideline names a ``check`` (``alignkit.cai.guidelines``).
"""

from __future__ import annotations

import importlib.resources
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from alignkit.config import ConfigError

DEFAULT_CONSTITUTION = "alignkit/assets/constitution.yaml"
_TEXT_FIELDS = ("critique_request", "revision_request", "comparison")


@dataclass(frozen=True)
class Principle:
    id: str
    priority: int  # higher wins when principles applied to one comparison disagree
    critique_request: str  # asks the model to criticise its latest reply under this principle
    revision_request: str  # asks the model to rewrite that reply in the light of the critique
    comparison: str  # the question the judge answers about two replies, e.g. "Which response is ...?"
    checkable: str | None = None  # a note on how the principle could be checked without a model


@dataclass(frozen=True)
class Guideline:
    """A written ruling for an edge case, e.g. "Quoting a word the user asked about is not rudeness"."""

    id: str
    text: str  # shown to the judge after the comparison question of each principle it applies to
    applies_to: tuple[str, ...]  # principle ids
    check: str | None = None  # the program rule that applies it (alignkit.cai.guidelines.GUIDELINE_CHECKS)


@dataclass(frozen=True)
class Constitution:
    name: str
    description: str
    conflict_rule: str  # the rule in words, as the file states it (what `combine_principles` implements)
    principles: tuple[Principle, ...]
    source: str  # the file it was read from
    guidelines: tuple[Guideline, ...] = ()

    def guidelines_for(self, principle_id: str) -> list[Guideline]:
        return [g for g in self.guidelines if principle_id in g.applies_to]

    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def crc32(self) -> int:
        """A checksum of the principles' text: an output resumes only under the constitution it began with."""
        return zlib.crc32(repr(self.principles).encode("utf-8"))

    def select(self, ids: list[str] | None) -> Constitution:
        """The same constitution with only the principles ``ids`` (None or empty keeps them all)."""
        if not ids:
            return self
        unknown = [i for i in ids if i not in self.ids()]
        if unknown:
            raise ConfigError(
                f"principles: {unknown} not in the constitution {self.source}; it has {self.ids()}"
            )
        kept = tuple(p for p in self.principles if p.id in ids)
        return Constitution(
            self.name, self.description, self.conflict_rule, kept, self.source, self.guidelines
        )

    def sample(self, k: int, rng: np.random.Generator) -> list[Principle]:
        """``k`` distinct principles drawn uniformly (all of them when k >= their number), in draw order."""
        if k < 1:
            raise ValueError(f"need at least one principle per draw, got {k}")
        order = rng.permutation(len(self.principles))[: min(k, len(self.principles))]
        return [self.principles[i] for i in order]


def load_constitution(path: str | os.PathLike | None = None) -> Constitution:
    """Read and check a constitution YAML file; None reads the default shipped with alignkit.

    Every problem is a ``ConfigError`` that names the file, the principle and the field.
    """
    if path is None:
        with importlib.resources.as_file(
            importlib.resources.files("alignkit") / "assets" / "constitution.yaml"
        ) as default:
            return _parse(yaml.safe_load(default.read_text(encoding="utf-8")), DEFAULT_CONSTITUTION)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"constitution file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"constitution {path} is not valid YAML: {e}") from None
    return _parse(data, str(path))


def _parse(data, source: str) -> Constitution:
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"constitution {source}: {problem}")

    if not isinstance(data, dict):
        raise bad("expected a mapping with a 'principles' list")
    items = data.get("principles")
    if not isinstance(items, list) or not items:
        raise bad("'principles' must be a non-empty list")
    principles, seen = [], set()
    for n, item in enumerate(items):
        where = f"principle {n + 1}" + (f" ('{item.get('id')}')" if isinstance(item, dict) else "")
        if not isinstance(item, dict):
            raise bad(f"{where} must be a mapping")
        pid = item.get("id")
        if not isinstance(pid, str) or not pid.strip():
            raise bad(f"{where}: field 'id' must be a non-empty string")
        if pid in seen:
            raise bad(f"{where}: id '{pid}' appears twice")
        seen.add(pid)
        priority = item.get("priority")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise bad(f"{where}: field 'priority' must be an integer, got {priority!r}")
        for name in _TEXT_FIELDS:
            if not isinstance(item.get(name), str) or not item[name].strip():
                raise bad(f"{where}: field '{name}' must be a non-empty string")
        unknown = set(item) - {"id", "priority", "checkable", *_TEXT_FIELDS}
        if unknown:
            raise bad(f"{where}: unknown field(s) {sorted(unknown)}")
        checkable = item.get("checkable")
        principles.append(
            Principle(
                pid,
                priority,
                *(item[name].strip() for name in _TEXT_FIELDS),
                str(checkable) if checkable is not None else None,
            )
        )
    return Constitution(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")).strip(),
        conflict_rule=str(data.get("conflict_rule", "")).strip(),
        principles=tuple(principles),
        source=source,
        guidelines=_parse_guidelines(data.get("guidelines"), seen, bad),
    )


def _parse_guidelines(items, principle_ids: set[str], bad) -> tuple[Guideline, ...]:
    """The optional ``guidelines:`` list: each an id, a text, the principle ids it applies to and optionally a
    program ``check`` (checked against alignkit.cai.guidelines when a ranker uses it, so this file stays free
    of the checks)."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise bad("'guidelines' must be a list")
    guidelines, seen = [], set()
    for n, item in enumerate(items):
        where = f"guideline {n + 1}" + (f" ('{item.get('id')}')" if isinstance(item, dict) else "")
        if not isinstance(item, dict):
            raise bad(f"{where} must be a mapping")
        gid, text, applies = item.get("id"), item.get("text"), item.get("applies_to")
        if not isinstance(gid, str) or not gid.strip() or gid in seen:
            raise bad(f"{where}: field 'id' must be a non-empty string used once")
        seen.add(gid)
        if not isinstance(text, str) or not text.strip():
            raise bad(f"{where}: field 'text' must be a non-empty string")
        if not isinstance(applies, list) or not applies or not all(isinstance(a, str) for a in applies):
            raise bad(f"{where}: field 'applies_to' must be a non-empty list of principle ids")
        unknown_ids = [a for a in applies if a not in principle_ids]
        if unknown_ids:
            raise bad(f"{where}: applies_to names {unknown_ids}, not principles of this constitution")
        check = item.get("check")
        if check is not None and (not isinstance(check, str) or not check.strip()):
            raise bad(f"{where}: field 'check' must be a string naming a program check")
        unknown = set(item) - {"id", "text", "applies_to", "check"}
        if unknown:
            raise bad(f"{where}: unknown field(s) {sorted(unknown)}")
        guidelines.append(Guideline(gid, text.strip(), tuple(applies), check))
    return tuple(guidelines)
