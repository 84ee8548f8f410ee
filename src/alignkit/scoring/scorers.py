"""Reward scorers: one score per (prompt, response), from a function ``module:function`` or a reward model
written by `alignkit rm`, as every stage's ``reward=`` field names it. ppo and online-dpo train on these scores,
eval compares models with them, score writes them and build-prefs ranks with them. Errors name the field.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Any, Protocol

from alignkit.config import ConfigError
from alignkit.data.schemas import Prompt
from alignkit.errors import AlignkitError


class RewardFunctionError(AlignkitError, ValueError):
    """A user's reward function returned something that is not a finite number."""


class Scorer(Protocol):
    """Scores responses; higher is better. Prompts are given as in the data (text, or chat messages)."""

    name: str

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]: ...


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string: text as it is, chat messages as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class FunctionScorer:
    """A programmatic reward ``module:function``, called as function(prompt: str, response: str) -> float.

    ``field`` is the config field the spec came from (``reward``); the module is
    imported from sys.path.
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
        _check_signature(function, spec, field)
        self.name, self.field, self.function = spec, field, function

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        scores = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            returned = self.function(prompt_text(prompt), response)
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


def _check_signature(function, spec: str, field: str) -> None:
    """A function that cannot be called as function(prompt, response) is refused now, before any model loads,
    rather than with a TypeError after the first generation."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C functions have no signature to read: trust them
        return
    try:
        signature.bind("prompt", "response")
    except TypeError as err:
        raise ConfigError(
            f"{field}={spec}: the function must accept (prompt: str, response: str) and return a float; "
            f"its signature is {_name_of(function)}{signature} ({err})"
        ) from None


def _name_of(function) -> str:
    return getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)


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

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        return self.reward_model.score(prompts, responses, batch_size=self.batch_size, progress=self.progress)


_FUNCTION_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def load_scorer(spec: str, field: str, **reward_model: Any) -> Scorer:
    """One config value that is either ``module:function`` or a reward model directory -> its Scorer.

    ``reward_model`` holds RewardModelScorer's keywords (dtype, device, trust_remote_code, batch_size,
    progress), used only when ``spec`` is a directory. A path that exists is never taken for a function.
    """
    if is_function_spec(spec):
        return FunctionScorer(spec, field)
    check_scorer(spec, field)
    return RewardModelScorer(str(Path(spec).expanduser()), **reward_model)


def reward_scorer(cfg: Any, device: Any, batch_size: int, progress: bool = False) -> Scorer:
    """The Scorer of a stage config's ``reward`` field (``load_scorer``); a reward model is loaded in
    ``cfg.dtype`` on ``device`` (trusting remote code as ``cfg.trust_remote_code`` says) and scores
    ``batch_size`` responses per forward pass, with a progress bar if ``progress``."""
    return load_scorer(
        cfg.reward,
        "reward",
        dtype=cfg.dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        batch_size=batch_size,
        progress=progress,
    )


def check_scorer(spec: str, field: str) -> None:
    """Refuses (ConfigError) what ``load_scorer`` would refuse, loading no model: a stage checks its reward
    before it creates its run folder or reads a model."""
    if is_function_spec(spec):
        FunctionScorer(spec, field)  # imports the module, finds the function, checks its signature
    elif not Path(spec).expanduser().is_dir():
        raise ConfigError(
            f"{field}: '{spec}' is neither 'module:function' (e.g. alignkit.scoring.rewards:politeness) "
            "nor a reward model directory"
        )


def is_function_spec(spec: str) -> bool:
    """``module:function`` rather than a directory: a path that exists is never taken for a function."""
    return bool(_FUNCTION_SPEC.fullmatch(spec)) and not Path(spec).exists()
