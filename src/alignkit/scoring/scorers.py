"""Reward scorers: one score per (prompt, response), from a function ``module:function`` or a reward model
written by `alignkit rm`, as every stage's ``reward=`` field names it. ppo and online-dpo train on these scores,
eval compares models with them, score writes them and build-prefs ranks with them. Errors name the field.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from alignkit.config import ConfigError
from alignkit.data.schemas import Prompt, PromptExample
from alignkit.errors import AlignkitError


class RewardFunctionError(AlignkitError, ValueError):
    """A user's reward function returned something that is not a finite number."""


class Scorer(Protocol):
    """Scores responses; higher is better. Prompts are given as in the data (text, or chat messages)."""

    name: str

    def score(
        self, prompts: list[Prompt], responses: list[str], columns: list[dict] | None = None
    ) -> list[float]:
        """One score per response; ``columns``: each prompt's row columns, for rewards that read them."""
        ...


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string: text as it is, chat messages as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class FunctionScorer:
    """A programmatic reward ``module:function``, called as function(prompt: str, response: str, **columns) ->
    float.

    Parameters after the first two are filled by name from the prompt's row (``PromptExample.columns``), as TRL
    passes dataset columns to reward functions: ``def exact_answer(prompt, response, answer)`` receives each
    row's 'answer'. A parameter without a default is a column every row must have (``check_columns`` refuses
    the file before any model loads); one with a default is filled where the row has it; ``**kwargs`` receives
    every column. ``field`` is the config field the spec came from (``reward``); the module is imported from
    sys.path.
    """

    def __init__(self, spec: str, field: str):
        module_name, sep, function_name = spec.partition(":")
        if not sep or not module_name or not function_name:
            raise ConfigError(f"{field} must be written 'module:function', got '{spec}'")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise  # the module exists but one of its own imports is missing: show the real error
            raise ConfigError(f"{field}: no module named '{module_name}' (from {field}={spec})") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            what = "" if function is None else f" ({function_name} = {function!r} is not callable)"
            raise ConfigError(f"{field}: module '{module_name}' has no function '{function_name}'{what}")
        self.name, self.field, self.function = spec, field, function
        self.columns = _column_parameters(function, spec, field)

    @property
    def required_columns(self) -> list[str]:
        """The prompt-row columns every call needs: the function's extra parameters without a default."""
        return [p.name for p in self.columns.parameters if p.required]

    def score(
        self, prompts: list[Prompt], responses: list[str], columns: list[dict] | None = None
    ) -> list[float]:
        """One score per response; ``columns``: each prompt's row columns (None: the prompts have none)."""
        scores = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            keywords = self.keywords(columns[i] if columns is not None else None, i)
            returned = self.function(prompt_text(prompt), response, **keywords)
            try:
                value = float(returned)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise RewardFunctionError(
                    f"{self.field} {self.name} returned {returned!r} for response {i} ({response[:60]!r}); "
                    "it must return a finite number"
                )
            scores.append(value)
        return scores

    def keywords(self, row: dict | None, i: int) -> dict[str, Any]:
        """The keyword arguments of the call on prompt ``i`` from its row's columns ``row``."""
        row = row if row is not None else {}
        missing = [name for name in self.required_columns if name not in row]
        if missing:
            given = f"its columns are {sorted(row)}" if row else "no prompt columns were given"
            raise RewardFunctionError(
                f"{self.field} {self.name}: {_name_of(self.function)}() takes column '{missing[0]}' from the "
                f"prompt row, but prompt {i} has none ({given})"
            )
        if self.columns.takes_all:
            return {k: v for k, v in row.items() if k not in self.columns.positional}
        return {p.name: row[p.name] for p in self.columns.parameters if p.name in row}


@dataclass(frozen=True)
class ColumnParameter:
    name: str
    required: bool  # no default: every prompt row must have the column


@dataclass(frozen=True)
class ColumnParameters:
    """What a reward function takes beyond (prompt, response): parameters named after prompt-row columns."""

    parameters: tuple[ColumnParameter, ...] = ()
    takes_all: bool = False  # **kwargs: every column of the row
    positional: tuple[str, ...] = ()  # the names (prompt, response) bind to: never passed again as columns


def _column_parameters(function, spec: str, field: str) -> ColumnParameters:
    """The function's column parameters; a function that cannot be called as function(prompt, response,
    **columns) is refused now, before any model loads, rather than with a TypeError after the first generation."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C functions have no signature to read: trust them
        return ColumnParameters()
    try:
        bound = signature.bind_partial("prompt", "response")  # what is left unbound is filled from columns
    except TypeError as err:
        raise ConfigError(
            f"{field}={spec}: the function must accept (prompt: str, response: str) and return a float; "
            f"its signature is {_name_of(function)}{signature} ({err})"
        ) from None
    rest = [p for name, p in signature.parameters.items() if name not in bound.arguments]
    stuck = [p.name for p in rest if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if stuck:
        raise ConfigError(
            f"{field}={spec}: parameter '{stuck[0]}' of {_name_of(function)}{signature} is positional-only and "
            "has no default; extra parameters are filled by name from the prompt row's columns"
        )
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return ColumnParameters(
        tuple(ColumnParameter(p.name, p.default is p.empty) for p in rest if p.kind in named),
        any(p.kind is p.VAR_KEYWORD for p in rest),
        tuple(bound.arguments),
    )


def _name_of(function) -> str:
    return getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)


def check_columns(spec: str | list[str], examples: list[PromptExample], field: str, setting: str) -> None:
    """Refuses (ConfigError), before any model loads, prompt rows that lack a column a reward function of
    ``spec`` takes without a default: the error names the function, the column, the row and the file of
    ``setting`` (the config key the prompts came from)."""
    for one in spec if isinstance(spec, list) else [spec]:
        if not is_function_spec(one):
            continue  # a reward model reads the prompt and the response only
        scorer = FunctionScorer(one, field)
        for name in scorer.required_columns:
            lacking = next((ex for ex in examples if name not in ex.columns), None)
            if lacking is not None:
                others = ", ".join(sorted(lacking.columns)) or "none"
                raise ConfigError(
                    f"{field} {one}: {_name_of(scorer.function)}() takes column '{name}' from each prompt row, "
                    f"but row {lacking.ref.row} of {setting} {lacking.ref.source} has no '{name}' column (its "
                    f"other columns: {others})",
                    (field, setting),
                )


class RewardModelScorer:
    """A reward model written by `alignkit rm`; ``alignkit.models.reward`` is imported only when one is used.

    Each (prompt, response) is encoded as the policy sees it (``RewardModel.score``); ``batch_size`` responses
    go through one forward pass.
    """

    def __init__(
        self,
        path: str,
        *,
        dtype: str,
        device: Any,
        trust_remote_code: bool,
        batch_size: int,
        progress: bool = False,
    ):
        from alignkit.models.reward import load_reward_model

        self.reward_model = load_reward_model(
            path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.name = f"reward model {path}"
        self.batch_size, self.progress = batch_size, progress

    def score(
        self, prompts: list[Prompt], responses: list[str], columns: list[dict] | None = None
    ) -> list[float]:
        """One score per response; a reward model reads the prompt and the response only (``columns`` unused)."""
        return self.reward_model.score(prompts, responses, batch_size=self.batch_size, progress=self.progress)


_FUNCTION_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class WeightedScorer:
    """Several rewards summed with weights, ``reward=[a, b, ...]`` with ``reward_weights=[w_a, w_b, ...]``:
    score = sum_k w_k * reward_k (TRL's ``reward_weights``). ``score_parts`` also gives each reward's own
    (unweighted) scores, which the online stages log as ``reward/<name>``."""

    def __init__(self, parts: dict[str, Scorer], weights: list[float]):
        if len(weights) != len(parts):
            raise ValueError(f"{len(weights)} weights for {len(parts)} rewards")
        self.parts, self.weights = parts, weights
        self.name = " + ".join(f"{w:g} * {part.name}" for part, w in zip(parts.values(), weights))

    def score(
        self, prompts: list[Prompt], responses: list[str], columns: list[dict] | None = None
    ) -> list[float]:
        return self.score_parts(prompts, responses, columns).total

    def score_parts(
        self, prompts: list[Prompt], responses: list[str], columns: list[dict] | None = None
    ) -> PartScores:
        parts = {name: part.score(prompts, responses, columns) for name, part in self.parts.items()}
        total = [sum(w * s for w, s in zip(self.weights, each)) for each in zip(*parts.values())]
        return PartScores(total, parts)


@dataclass
class PartScores:
    """A reward's scores and, for a weighted sum, each of its rewards' own scores by name (else empty)."""

    total: list[float]
    parts: dict[str, list[float]]


def score_parts(
    scorer: Scorer, prompts: list[Prompt], responses: list[str], columns: list[dict] | None = None
) -> PartScores:
    """``scorer``'s scores, with each reward's own where it is a weighted sum (``WeightedScorer``)."""
    if isinstance(scorer, WeightedScorer):
        return scorer.score_parts(prompts, responses, columns)
    return PartScores(scorer.score(prompts, responses, columns), {})


# Keys a part's name must not take: reward/mean and reward/std are the summed reward's.
_RESERVED_PART_NAMES = ("mean", "std")


def part_names(specs: list[str]) -> list[str]:
    """A short name per reward of a list, for its ``reward/<name>`` key: a function's own name
    (``exact_answer``), or the whole spec where two would share one or it is a reserved key."""
    short = [spec.rpartition(":")[2] if is_function_spec(spec) else spec for spec in specs]
    return [
        spec if short.count(name) > 1 or name in _RESERVED_PART_NAMES else name
        for spec, name in zip(specs, short)
    ]


def load_scorer(
    spec: str | list[str], field: str, weights: list[float] | None = None, **reward_model: Any
) -> Scorer:
    """One config value that is either ``module:function`` or a reward model directory -> its Scorer; a list of
    them -> their sum with ``weights`` (None: all 1), a ``WeightedScorer``.

    ``reward_model`` holds RewardModelScorer's keywords (dtype, device, trust_remote_code, batch_size,
    progress), used only when a spec is a directory. A path that exists is never taken for a function.
    """
    if isinstance(spec, list):
        check_scorer(spec, field)  # all refusals before the first reward model loads
        parts = {name: load_scorer(one, field, **reward_model) for name, one in zip(part_names(spec), spec)}
        return WeightedScorer(parts, list(weights) if weights is not None else [1.0] * len(spec))
    if is_function_spec(spec):
        return FunctionScorer(spec, field)
    check_scorer(spec, field)
    return RewardModelScorer(str(Path(spec).expanduser()), **reward_model)


def reward_scorer(cfg: Any, device: Any, batch_size: int, progress: bool = False) -> Scorer:
    """The Scorer of a stage config's ``reward`` field (``load_scorer``, weighted by ``cfg.reward_weights``
    where the config has it); a reward model is loaded in ``cfg.dtype`` on ``device`` (trusting remote code as
    ``cfg.trust_remote_code`` says) and scores ``batch_size`` responses per forward pass, with a progress bar if
    ``progress``."""
    return load_scorer(
        cfg.reward,
        "reward",
        getattr(cfg, "reward_weights", None),
        dtype=cfg.dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        batch_size=batch_size,
        progress=progress,
    )


def check_scorer(spec: str | list[str], field: str) -> None:
    """Refuses (ConfigError) what ``load_scorer`` would refuse, loading no model: a stage checks its reward
    before it creates its run folder or reads a model."""
    if isinstance(spec, list):
        for one in spec:
            check_scorer(one, field)
    elif is_function_spec(spec):
        FunctionScorer(spec, field)  # imports the module, finds the function, checks its signature
    elif not Path(spec).expanduser().is_dir():
        raise ConfigError(
            f"{field}: '{spec}' is neither 'module:function' (e.g. alignkit.scoring.rewards:politeness) "
            "nor a reward model directory"
        )


def is_function_spec(spec: str) -> bool:
    """``module:function`` rather than a directory: a path that exists is never taken for a function."""
    return bool(_FUNCTION_SPEC.fullmatch(spec)) and not Path(spec).exists()
