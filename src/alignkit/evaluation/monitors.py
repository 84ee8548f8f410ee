"""Failure monitors that watch the logged metrics of a training run and warn or stop it.

Each monitor reads the rows the training loop logs (``{"loss": ..., "kl": ..., ...}``), keeps a short
window of the keys it needs, ignores rows without them, and returns an ``Event`` when its failure shows.
``MonitorSet.on_log`` is the hook the loop calls; it returns "stop" when a monitor whose action is
"stop" fires. A monitor whose action is "adjust" has the run apply its remedy (``MonitorSet.adjuster``, e.g.
the online stages raise their KL coefficient), and the event row records the values before and after. Each
monitor declares the keys it reads (``keys``): the first training row a run logs must carry them all, or the
run fails there (``BlindMonitorError``) instead of being watched by a monitor that can never fire.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import numpy as np

from alignkit.errors import AlignkitError
from alignkit.evaluation.metrics import pearson

logger = logging.getLogger(__name__)

# warn: log the event; stop: end the run (with its checkpoint and final model); adjust: the run's remedy
# (``MonitorSet.adjuster``; the online stages raise their KL coefficient) and go on.
Action = Literal["warn", "stop", "adjust"]


@dataclass
class Event:
    """One firing of a monitor: written to metrics.jsonl as ``{"event": monitor, ...}`` by ``to_row``."""

    step: int
    monitor: str
    message: str
    action: Action
    values: dict

    def to_row(self) -> dict:
        return {
            "event": self.monitor,
            "step": self.step,
            "action": self.action,
            "message": self.message,
            "values": self.values,
        }


class Monitor(Protocol):
    """What ``MonitorSet`` needs of a monitor: a name, an action, the logged keys it reads (every one must be
    in the run's first training row; a stand-in that reads nothing declares ``()``) and ``update`` (None
    while healthy)."""

    name: str
    action: Action
    keys: tuple[str, ...]

    def update(self, step: int, row: dict) -> Event | None: ...


def _value(row: dict, key: str) -> float | None:
    """The row's number under ``key``; None when absent, not a number, or NaN/inf (which would poison a
    window's fit; non-finite steps are NonFiniteMonitor's concern)."""
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _slope(steps: list[float], values: list[float]) -> float:
    """Least-squares slope of values against step, per step; 0.0 with fewer than two distinct steps."""
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    dx = x - x.mean()
    denom = float((dx * dx).sum())
    return float((dx * (y - y.mean())).sum() / denom) if denom > 0 else 0.0


def _event(monitor: Monitor, step: int, message: str, **values: float) -> Event:
    return Event(step, monitor.name, message, monitor.action, {k: float(v) for k, v in values.items()})


@dataclass
class RewardHackingMonitor:
    """Reward rising for the wrong reason (Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization"; Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF").

    (a) "reward/mean" rises over the window while it moves with "len/mean" (Pearson over the window),
        or with the mean of a per-step "reward_length_corr" when every row in the window provides one;
    (b) the proxy "reward/mean" rises while a held-out "gold_reward/mean" falls over the gold window.

    (a) needs "reward/mean" and "len/mean"; (b) is declared (``gold``) only where a gold scorer feeds it.
    """

    window: int = 20  # rows fitted for (a): fewer and a correlation of noise is often above 0.8
    max_length_corr: float = 0.8  # reward and length moving this much in lockstep means length is paid
    min_reward_slope: float = 0.0  # (a) and (b) need a reward that rises at all
    gold_window: int = 5  # rows with a gold reward (eval steps) fitted for (b); they are logged rarely
    min_gold_drop: float = 0.1  # fitted gold fall over the gold window; ignores jitter of a few hundredths
    action: Action = "warn"  # a correlation is evidence, not proof: a person looks at the samples
    # The action of (b) alone; None: ``action``. A falling gold score is the over-optimisation itself, so a run
    # may stop on it (keeping its best-gold weights) while only warning, or adjusting, on (a).
    gold_action: Action | None = None
    # The run logs "gold_reward/mean" (a gold scorer is configured), from its first row on: (b) is then checked.
    gold: bool = False
    name: str = "reward_hacking"
    _rows: deque = field(init=False, repr=False)
    _gold: deque = field(init=False, repr=False)

    @property
    def keys(self) -> tuple[str, ...]:
        return ("reward/mean", "len/mean") + (("gold_reward/mean",) if self.gold else ())

    def __post_init__(self):
        self._rows = deque(maxlen=self.window)  # (step, reward, length or nan, provided corr or nan)
        self._gold = deque(maxlen=self.gold_window)  # (step, proxy reward, gold reward)

    def update(self, step: int, row: dict) -> Event | None:
        reward, length = _value(row, "reward/mean"), _value(row, "len/mean")
        corr, gold = _value(row, "reward_length_corr"), _value(row, "gold_reward/mean")
        if reward is None:
            return None
        if length is not None or corr is not None:
            self._rows.append(
                (step, reward, math.nan if length is None else length, math.nan if corr is None else corr)
            )
        if gold is not None:
            self._gold.append((step, reward, gold))
        return self._length_hacking(step) or self._gold_divergence(step)

    def _length_hacking(self, step: int) -> Event | None:
        if len(self._rows) < self.window:
            return None
        steps, rewards, lengths, corrs = (list(c) for c in zip(*self._rows))
        slope = _slope(steps, rewards)
        if slope <= self.min_reward_slope:
            return None
        if all(math.isfinite(c) for c in corrs):
            corr = float(np.mean(corrs))
        elif all(math.isfinite(n) for n in lengths):
            corr = pearson(rewards, lengths)
        else:
            return None
        if corr <= self.max_length_corr:
            return None
        msg = (
            f"reward rising ({slope:+.4f}/step) in step with response length "
            f"(correlation {corr:.2f} > {self.max_length_corr}) over the last {self.window} rows"
        )
        return _event(self, step, msg, reward_slope=slope, reward_length_corr=corr)

    def _gold_divergence(self, step: int) -> Event | None:
        if len(self._gold) < self.gold_window:
            return None
        steps, proxy, gold = (list(c) for c in zip(*self._gold))
        proxy_slope, gold_slope = _slope(steps, proxy), _slope(steps, gold)
        gold_drop = -gold_slope * (steps[-1] - steps[0])  # fitted fall across the window
        if proxy_slope <= self.min_reward_slope or gold_drop < self.min_gold_drop:
            return None
        msg = f"proxy reward rising ({proxy_slope:+.4f}/step) while gold reward fell {gold_drop:.3f}"
        event = _event(self, step, msg, proxy_slope=proxy_slope, gold_slope=gold_slope, gold_drop=gold_drop)
        event.action = self.gold_action or self.action
        return event


def is_gold_divergence(event: Event) -> bool:
    """Whether ``event`` is RewardHackingMonitor's proxy-up, gold-down firing (b) (its values name the gold drop)."""
    return event.monitor == RewardHackingMonitor.name and "gold_drop" in event.values


@dataclass
class ModeCollapseMonitor:
    """Samples losing their diversity: distinct-n (Li et al. 2016) or policy entropy falling below a
    fraction of its starting value (the collapse RLHF and DPO policies show; Kirk et al. 2024,
    "Understanding the Effects of RLHF on LLM Generalisation and Diversity")."""

    keys: tuple[str, ...] = ("distinct_2", "entropy")  # each watched on its own
    min_fraction: float = 0.5  # losing half the starting diversity is far beyond step-to-step noise
    baseline_rows: int = 1  # the baseline is the mean of the first k observations of each key
    action: Action = "warn"  # a narrower policy may be what the objective wants; a person decides
    name: str = "mode_collapse"
    _first: dict = field(init=False, repr=False)

    def __post_init__(self):
        self._first = {key: [] for key in self.keys}

    def update(self, step: int, row: dict) -> Event | None:
        for key in self.keys:
            value = _value(row, key)
            if value is None:
                continue
            first = self._first[key]
            if len(first) < self.baseline_rows:
                first.append(value)
                continue
            baseline = sum(first) / len(first)
            if baseline > 0 and value < self.min_fraction * baseline:
                msg = f"{key} fell to {value:.4g}, below {self.min_fraction} x its baseline {baseline:.4g}"
                return _event(self, step, msg, value=value, baseline=baseline)
        return None


@dataclass
class KLExplosionMonitor:
    """The policy running away from the reference: "kl" above a limit, or growing too fast.

    "kl" is read as logged by the stage; the PPO stage logs the mean per-sequence KL in nats (the sum of
    log p - log q over a response's tokens, the quantity the KL penalty of Ziegler et al. 2019 charges).
    """

    max_kl: float = (
        10.0  # per-sequence nats; healthy RLHF runs stay within a few, 10 means the text has drifted
    )
    window: int = 5  # rows the growth rate is fitted over
    max_growth_per_step: float = 1.0  # nats per step; a run adding a nat each step reaches the limit in 10
    # A KL the run was told to reach (PPO's kl_target): growth up to it is not alarming.
    allowed_kl: float = 0.0
    action: Action = "stop"  # past this point updates rarely come back; stop and keep the checkpoint
    name: str = "kl_explosion"
    keys: ClassVar[tuple[str, ...]] = ("kl",)
    _rows: deque = field(init=False, repr=False)

    def __post_init__(self):
        self._rows = deque(maxlen=self.window)

    def update(self, step: int, row: dict) -> Event | None:
        kl = row.get("kl")
        if isinstance(kl, bool) or not isinstance(kl, (int, float)):
            return None
        kl = float(kl)
        if not kl <= self.max_kl:  # written so that NaN (which compares False) and inf both fire
            return _event(self, step, f"kl {kl:.3f} above the limit {self.max_kl}", kl=kl)
        self._rows.append((step, kl))
        if len(self._rows) < self.window:
            return None
        growth = _slope(*(list(c) for c in zip(*self._rows)))
        if growth > self.max_growth_per_step and kl > self.allowed_kl:
            msg = f"kl growing {growth:.3f}/step over {self.window} rows (limit {self.max_growth_per_step})"
            return _event(self, step, msg, kl=kl, growth_per_step=growth)
        return None


@dataclass
class LikelihoodDisplacementMonitor:
    """DPO pushing the chosen responses' likelihood down while the margin grows: the loss improves by
    lowering both log-probs, moving mass to responses in neither set (Razin et al. 2024, "Unintentional
    Unalignment: Likelihood Displacement in DPO"; Pal et al. 2024, "Smaug", on DPO's failure mode).

    "logps/chosen" is read as logged: the DPO stage logs the per-sequence summed log-prob in nats; the margin
    is "rewards/margin" (DPO, IPO, ORPO and online DPO log both).
    """

    window: int = 20  # rows the trends are fitted over, so one noisy batch does not count as a trend
    min_drop: float = 5.0  # fitted fall of chosen log-prob (nats) across the window; ~e^5 less likely
    action: Action = "warn"  # the policy may still be fine on samples; check them before stopping
    name: str = "likelihood_displacement"
    keys: ClassVar[tuple[str, ...]] = ("logps/chosen", "rewards/margin")
    _rows: deque = field(init=False, repr=False)

    def __post_init__(self):
        self._rows = deque(maxlen=self.window)

    def signals(self, row: dict) -> tuple[float | None, float | None]:
        """The row's chosen log-prob (nats per sequence) and preference margin; None where it has none."""
        return _value(row, "logps/chosen"), _value(row, "rewards/margin")

    def update(self, step: int, row: dict) -> Event | None:
        chosen, margin = self.signals(row)
        if chosen is None or margin is None:
            return None
        self._rows.append((step, chosen, margin))
        if len(self._rows) < self.window:
            return None
        steps, chosens, margins = (list(c) for c in zip(*self._rows))
        chosen_slope, margin_slope = _slope(steps, chosens), _slope(steps, margins)
        drop = -chosen_slope * (steps[-1] - steps[0])
        if drop <= self.min_drop or margin_slope <= 0:
            return None
        msg = (
            f"chosen log-prob fell {drop:.2f} nats over {self.window} rows while the margin grew "
            f"({margin_slope:+.4f}/step)"
        )
        return _event(self, step, msg, chosen_drop=drop, chosen_slope=chosen_slope, margin_slope=margin_slope)


@dataclass
class KTOLikelihoodDisplacementMonitor(LikelihoodDisplacementMonitor):
    """Likelihood displacement on KTO's rows, its desirable completions in the chosen ones' place. KTO logs each
    class's sums and its share of the examples (see ``alignkit.stages.kto``), so a class mean is their ratio:
    the chosen log-prob is the desirable completions' mean, the margin the desirable minus the undesirable mean
    implicit reward. A row whose steps held no example of one class has neither."""

    keys: ClassVar[tuple[str, ...]] = (
        "logps/desirable_sum",
        "rewards/desirable_sum",
        "rewards/undesirable_sum",
        "count/desirable",
        "count/undesirable",
    )

    def signals(self, row: dict) -> tuple[float | None, float | None]:
        n_desirable, n_undesirable = _value(row, "count/desirable"), _value(row, "count/undesirable")
        logps, rewards = _value(row, "logps/desirable_sum"), _value(row, "rewards/desirable_sum")
        rewards_undesirable = _value(row, "rewards/undesirable_sum")
        if not n_desirable or not n_undesirable or None in (logps, rewards, rewards_undesirable):
            return None, None
        return logps / n_desirable, rewards / n_desirable - rewards_undesirable / n_undesirable


@dataclass
class SampleDriftMonitor:
    """Policy samples drifting from where training started: a stage-provided "sample_drift" above a limit. The
    offline stages log KL(start || policy) on the starting model's samples of a few held-out prompts, in nats
    per sequence (``alignkit.training.sample_watch``)."""

    max_drift: float = 5.0  # nats per sequence; the samples are then e^5 less likely under the data model
    action: Action = "warn"  # drift is expected to grow some; the limit marks where to look
    name: str = "sample_drift"
    keys: ClassVar[tuple[str, ...]] = ("sample_drift",)

    def update(self, step: int, row: dict) -> Event | None:
        drift = _value(row, "sample_drift")
        if drift is None or drift <= self.max_drift:
            return None
        return _event(
            self, step, f"sample_drift {drift:.3f} above the limit {self.max_drift}", sample_drift=drift
        )


@dataclass
class NonFiniteMonitor:
    """Steps skipped for a NaN/inf loss or gradient: "nonfinite_skipped" is the loop's cumulative count.

    Fires when the total reaches ``max_nonfinite`` or a streak reaches ``max_consecutive``. A streak is the
    count's growth over consecutive rows that each show growth; with rows logged every N steps it is an
    upper bound on consecutive skipped steps. With both at 3 the total decides; raise ``max_nonfinite``
    to tolerate scattered fp16 overflows while still stopping a run that keeps producing NaNs.
    """

    max_nonfinite: int = 3  # three NaN steps in a run of this size means diverged weights or data, not luck
    max_consecutive: int = 3  # three in a row: the weights are likely already NaN
    action: Action = "stop"  # further steps only waste compute on a broken state
    name: str = "nonfinite"
    keys: ClassVar[tuple[str, ...]] = ("nonfinite_skipped",)
    _last: int = field(default=0, init=False, repr=False)
    _streak: int = field(default=0, init=False, repr=False)

    def update(self, step: int, row: dict) -> Event | None:
        count = _value(row, "nonfinite_skipped")
        if count is None:
            return None
        total, grew = int(count), int(count) - self._last
        self._streak = self._streak + grew if grew > 0 else 0
        self._last = total
        if total >= self.max_nonfinite or self._streak >= self.max_consecutive:
            msg = f"{total} non-finite steps skipped ({self._streak} in the latest streak)"
            return _event(self, step, msg, nonfinite_skipped=total, streak=self._streak)
        return None


class BlindMonitorError(AlignkitError):
    """A monitor was registered on a run whose logged rows lack the keys it reads: it could never fire."""


def missing_keys(monitors: list[Monitor], row: dict) -> dict[str, list[str]]:
    """Monitor name -> the keys it declares that ``row`` lacks (a key logged as null counts as present: the
    stage logs it, that row had no value), for each monitor that lacks any."""
    missing = {monitor.name: [key for key in monitor.keys if key not in row] for monitor in monitors}
    return {name: keys for name, keys in missing.items() if keys}


class MonitorSet:
    """The monitors of one run behind the loop's ``on_log(step, row)`` hook.

    Every monitor sees every row (so its window keeps filling); an event from one monitor is kept only
    if that monitor has not fired within the last ``cooldown`` steps. Kept events go to ``events`` (and
    ``last_events`` for the latest row) and are logged as warnings. A kept "adjust" event calls ``adjuster``
    (set by the run: it applies the remedy and returns the values it changed, ``{"<name>_old": ...,
    "<name>_new": ...}``), which are added to the event's values.

    The first training row given to ``on_log`` (one carrying "lr", as ``replay`` counts them; evaluation and
    event rows do not) must carry every key each monitor declares, or ``on_log`` raises ``BlindMonitorError``
    naming ``stage``, the monitors and their missing keys. The stages log every key on every training row, or,
    for the keys of their samples (taken every ``sample_every`` steps), on the first row a process logs
    (``alignkit.training.sample_watch``): that row is where all of them should have appeared, after a resume
    too.
    """

    def __init__(self, monitors: list[Monitor], cooldown: int = 100, stage: str = "this run"):
        self.monitors = list(monitors)
        self.cooldown = cooldown
        self.adjuster: Callable[[Event], dict[str, float]] | None = None
        self.stage = stage
        self.events: list[Event] = []
        self.last_events: list[Event] = []
        self._last_fired: dict[int, int] = {}  # monitor index -> step of its latest kept event
        self._checked = False  # whether a training row has been checked for every declared key

    def replay(self, rows: list[dict]) -> None:
        """Feed a resumed run's monitors the rows it logged up to its checkpoint (its metrics.jsonl), so every
        window and cooldown is where the uninterrupted run's was and they fire at the same steps. The monitored
        rows are the training rows (they carry "lr"; evaluation rows do not); a monitor's event rows (they carry
        "action") restore its cooldown. Nothing is logged or fired again."""
        index = {monitor.name: i for i, monitor in enumerate(self.monitors)}
        for row in rows:
            if "event" in row:
                if "action" in row and row["event"] in index:
                    self._last_fired[index[row["event"]]] = row["step"]
            elif "lr" in row:
                for monitor in self.monitors:
                    monitor.update(row["step"], row)

    def check_keys(self, step: int, row: dict) -> None:
        """Raise ``BlindMonitorError`` if the training ``row`` (logged at ``step``) lacks a declared key."""
        missing = missing_keys(self.monitors, row)
        if missing:
            blind = "; ".join(f"{name} reads {', '.join(keys)}" for name, keys in missing.items())
            raise BlindMonitorError(
                f"{self.stage}: the first logged training row (step {step}) lacks keys its monitors read, so "
                f"they could never fire: {blind}. The row has: {', '.join(sorted(row))}"
            )

    def on_log(self, step: int, row: dict) -> str | None:
        """Feed one logged row to every monitor; "stop" when a monitor with action "stop" fired. The first
        training row is checked first (``check_keys``)."""
        if not self._checked and "lr" in row:
            self.check_keys(step, row)
            self._checked = True
        self.last_events = []
        for i, monitor in enumerate(self.monitors):
            event = monitor.update(step, row)
            if event is None:
                continue
            if i in self._last_fired and step - self._last_fired[i] < self.cooldown:
                continue
            self._last_fired[i] = step
            if event.action == "adjust":
                if self.adjuster is None:  # the stage checks this before its first step (needs_adjuster)
                    raise RuntimeError(f"monitor {event.monitor} has action 'adjust' but the run has no adjuster")
                event.values |= self.adjuster(event)
            self.last_events.append(event)
            logger.warning("step %d: %s (%s): %s", step, event.monitor, event.action, event.message)
        self.events.extend(self.last_events)
        return "stop" if any(e.action == "stop" for e in self.last_events) else None

    def needs_adjuster(self) -> list[str]:
        """The monitors (names) that can fire "adjust": a run that has nothing to adjust refuses them."""
        return [
            m.name
            for m in self.monitors
            if m.action == "adjust" or getattr(m, "gold_action", None) == "adjust"
        ]


def default_monitors(
    stage: str,
    cooldown: int = 100,
    kl_target: float | None = None,
    samples: bool = False,
    gold: bool = False,
    actions: dict[str, Action] | None = None,
    kl: bool = True,
    kl_limit: float = KLExplosionMonitor.max_kl,
) -> MonitorSet:
    """The monitors worth running for a stage: "sft", "rm", "dpo" (also "ipo", "kto", "orpo"), "ppo",
    "online-dpo" or "grpo"; only those whose keys the stage logs. ``actions`` replaces the action of the
    monitors it names (e.g. {"mode_collapse": "stop"}); "gold_divergence" names the reward-hacking monitor's
    proxy-vs-gold check.

    SFT watches only distinct-2: its token entropy falls by design as the loss falls. ``kl_target`` (PPO's
    adaptive KL control, nats per response) is a KL the run is meant to reach: the KL monitor lets it climb
    there at any speed, and its limit is at least twice the target. ``samples``: an offline stage samples
    held-out prompts as it trains (``sample_every``), which feeds mode collapse (distinct-2) and sample drift;
    without them those two are not registered. ``gold`` (ppo, online-dpo, grpo): a gold scorer's
    "gold_reward/mean" is logged, and the reward-hacking monitor watches proxy against gold too. ``kl`` (grpo): the stage logs "kl"
    (it loaded a reference); without, no KL monitor. ``kl_limit``: the KL monitor's limit, nats per response.
    """
    kl_monitor = KLExplosionMonitor(max_kl=kl_limit)
    if kl_target is not None:
        kl_monitor = KLExplosionMonitor(max_kl=max(kl_limit, 2 * kl_target), allowed_kl=kl_target)
    if stage == "sft":
        monitors = [NonFiniteMonitor()] + ([ModeCollapseMonitor(keys=("distinct_2",))] if samples else [])
    elif stage == "rm":
        monitors = [NonFiniteMonitor()]
    elif stage in ("dpo", "ipo", "kto", "orpo"):
        # KTO logs class sums and counts, not chosen/rejected: its displacement monitor reads those.
        displacement = KTOLikelihoodDisplacementMonitor() if stage == "kto" else LikelihoodDisplacementMonitor()
        monitors = [NonFiniteMonitor(), displacement]
        if samples:
            monitors += [SampleDriftMonitor(), ModeCollapseMonitor(keys=("distinct_2",))]
    elif stage == "ppo":
        # A PPO row is a whole iteration (minutes on a CPU) and carries its own in-batch reward-length
        # correlation over the iteration's samples: 5 rows of 32 samples whose correlations average above 0.8
        # (noise gives ~0 +- 1/sqrt(31) per row) are evidence enough, as soon as the KL monitor's 5 rows are.
        monitors = [
            NonFiniteMonitor(),
            kl_monitor,
            RewardHackingMonitor(window=5, gold=gold),
            ModeCollapseMonitor(),
        ]
    elif stage == "online-dpo":
        # A row is a round: its own samples (KL to the reference, score, length, distinct-2, as PPO's) and the
        # DPO updates on their pairs (the chosen side's log-prob and the margin, as offline DPO's). Samples
        # drifting from the data is not a failure here: the policy's own samples are the data.
        monitors = [
            NonFiniteMonitor(),
            kl_monitor,
            RewardHackingMonitor(window=5, gold=gold),  # a round's row carries its samples' correlation, as PPO's
            LikelihoodDisplacementMonitor(window=8),
            ModeCollapseMonitor(keys=("distinct_2",)),
        ]
    elif stage == "grpo":
        # A row is an iteration, as PPO's (its own samples' reward-length correlation, entropy, distinct-2). The KL
        # to the reference is logged only where one is loaded (``kl``: beta > 0 or a gold scorer).
        monitors = [NonFiniteMonitor(), *([kl_monitor] if kl else [])]
        monitors += [RewardHackingMonitor(window=5, gold=gold), ModeCollapseMonitor()]
    else:
        raise ValueError(
            f"no default monitors for stage {stage!r}; known: sft, rm, dpo, ipo, kto, orpo, ppo, online-dpo, grpo"
        )
    for monitor in monitors:
        if monitor.name in (actions or {}):
            monitor.action = actions[monitor.name]
        if isinstance(monitor, RewardHackingMonitor) and "gold_divergence" in (actions or {}):
            monitor.gold_action = actions["gold_divergence"]
    return MonitorSet(monitors, cooldown=cooldown, stage=stage)
