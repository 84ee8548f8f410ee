"""Fuzzing the config loader: random keys, values, YAML documents and YAML text into ``load_config`` for several
stage config classes. Whatever goes in, what comes out is a config or a ``ConfigError`` (alignkit's own error,
a one-line message at the command line), never another exception; and a config that loads saves and loads
back equal. A fixed, derandomized example budget keeps the run short and the same on every machine."""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.config import (
    ConfigError,
    TrainConfig,
    config_fields,
    load_config,
    numeric_fields,
    save_config,
)
from alignkit.pipelines.quickstart import QuickstartConfig
from alignkit.stages.build_prefs import BuildPrefsConfig
from alignkit.stages.dpo import DPOConfig
from alignkit.stages.eval import EvalConfig
from alignkit.stages.kto import KTOConfig
from alignkit.stages.ppo import PPOConfig
from alignkit.stages.report import ReportConfig
from alignkit.stages.score import ScoreConfig

CLASSES = [
    TrainConfig,
    DPOConfig,
    KTOConfig,
    PPOConfig,
    ScoreConfig,
    BuildPrefsConfig,
    EvalConfig,
    ReportConfig,
    QuickstartConfig,
]
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,  # derandomized: nothing to replay, and no .hypothesis folder written into the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Values as YAML could hold them: scalars of every kind (edge numbers included), nested lists and mappings.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**32, 2**64, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, -0.1, 1e-300, 1e308]),
    st.text(max_size=12),
    st.sampled_from(["null", "none", "~", "", "true", "no", "1e-5", "nan", ".inf", "-.inf", "0x10", "1_000"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def field_names(cls) -> list[str]:
    return [f.name for f in config_fields(cls)]


def keys_of(cls) -> st.SearchStrategy[str]:
    """Mostly the class's own field names, its numbers' half the time (so values reach the coercion, the range
    checks and the class's check()), some near misses and some noise."""
    names = field_names(cls)
    kinds = {
        "number": st.sampled_from(numeric_fields(cls) or names),
        "field": st.sampled_from(names),
        "near": st.sampled_from(names).map(lambda n: n[:-1] or n),
        "noise": st.text(alphabet=string.ascii_letters + "_-. ", min_size=1, max_size=10),
    }
    return st.sampled_from(["number"] * 4 + ["field"] * 4 + ["near", "noise"]).flatmap(kinds.__getitem__)


# Numbers near the edges of the declared ranges (0, 1, 2, the halves) and past them; any other value too.
EDGES = st.sampled_from(
    [0, 1, 2, -1, 0.0, 0.5, 1.0, 1.5, -0.1, 2**32 - 1, 2**32, 10**400, float("nan"), float("inf"), "1e400"]
)
EDGY = st.one_of(EDGES, EDGES, EDGES, st.integers(min_value=-3, max_value=10**6), st.floats(-2, 2), VALUES)


def required_fields(cls) -> dict[str, str]:
    return {f.name: "x" for f in config_fields(cls) if f.metadata.get("required")}


def settings_of(cls) -> st.SearchStrategy[dict]:
    """A dict of settings for ``cls``: usually its required fields, then a few random keys and values."""
    base = st.sampled_from([required_fields(cls)] * 4 + [{}])
    extra = st.dictionaries(keys_of(cls), EDGY, max_size=4)
    return st.tuples(base, extra).map(lambda be: {**be[0], **be[1]})


def outcome(cls, *args, **kwargs):
    """``load_config``'s result, or None when it refused with a ConfigError. Anything else propagates and
    fails the test."""
    try:
        cfg = load_config(cls, *args, **kwargs)
    except ConfigError as e:
        assert str(e)  # a message for the user, never empty
        return None
    assert isinstance(cfg, cls)
    return cfg


def assert_round_trip(cfg, tmp_path_factory) -> None:
    """A config that loaded saves (config.yaml of a run) and loads back equal."""
    path = tmp_path_factory.mktemp("saved") / "config.yaml"
    save_config(cfg, path)
    assert load_config(type(cfg), path) == cfg


@FUZZ
@given(data=st.data())
def test_random_keyword_arguments(data, tmp_path_factory):
    cls = data.draw(st.sampled_from(CLASSES))
    kwargs = data.draw(settings_of(cls))
    cfg = outcome(cls, None, [], **kwargs)
    if cfg is not None:
        assert_round_trip(cfg, tmp_path_factory)


def _override_value() -> st.SearchStrategy[str]:
    """Command-line text: YAML dumps of random values, and raw text with YAML's special characters."""
    dumped = EDGY.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip())
    return st.one_of(dumped.map(lambda t: t.removesuffix("...").strip()), st.text(max_size=20))


@FUZZ
@given(data=st.data())
def test_random_command_line_overrides(data, tmp_path_factory):
    cls = data.draw(st.sampled_from(CLASSES))
    pairs = st.tuples(keys_of(cls), _override_value()).map(lambda kv: f"{kv[0]}={kv[1]}")
    malformed = st.text(max_size=15)  # no '=' at all, dashes, spaces
    overrides = data.draw(st.lists(st.one_of(pairs, pairs, pairs, malformed), max_size=4))
    required = [f"{k}={v}" for k, v in required_fields(cls).items()]
    cfg = outcome(cls, None, data.draw(st.sampled_from([required, required, []])) + overrides)
    if cfg is not None:
        assert_round_trip(cfg, tmp_path_factory)


@FUZZ
@given(data=st.data())
def test_random_yaml_documents(data, tmp_path_factory):
    """Documents of any shape (a mapping of fields, a list, a scalar), dumped by PyYAML and read back."""
    cls = data.draw(st.sampled_from(CLASSES))
    document = data.draw(st.one_of(settings_of(cls), settings_of(cls), settings_of(cls), VALUES))
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    overrides = data.draw(st.lists(st.tuples(keys_of(cls), _override_value()), max_size=2))
    cfg = outcome(cls, path, [f"{k}={v}" for k, v in overrides])
    if cfg is not None:
        assert_round_trip(cfg, tmp_path_factory)


# Pieces of YAML syntax that a hand-edited file may hold, right or wrong: anchors, aliases, merges, tags (Python
# ones included, which safe loading must refuse), block scalars, flow collections, directives, tabs.
YAML_PIECES = st.sampled_from(
    [
        ": ",
        ":",
        "- ",
        "? ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "&a ",
        "*a",
        "<<: *a",
        "!!binary ",
        "!!str ",
        "!!int ",
        "!!float ",
        "!!python/object:os.system ",
        "!!python/name:os.system ",
        "|",
        ">-",
        "---",
        "...",
        "%YAML 1.1",
        "%TAG ! x",
        "#",
        "'",
        '"',
        "\\",
        "\t",
        "  ",
        "\n",
        "\n  ",
        "\n- ",
        "null",
        "~",
        "yes",
        "1e-5",
        ".nan",
        "-.inf",
        "0o17",
        "2024-01-01",
        "2024-13-45",
        "12:30:00",
        "9" * 30,
        "=",
        "\x00",
        "\x85",
        "\u2028",
        "é",
    ]
)


def yaml_lines(cls) -> st.SearchStrategy[str]:
    """Lines as a hand-edited file may hold them: mostly `key: value` with a field's name and a value's text,
    some indented (nested, or a mistake), some with YAML syntax pieces or noise instead."""
    value_text = st.one_of(EDGY.map(str), _override_value(), YAML_PIECES, st.text(max_size=8))
    entry = st.tuples(
        st.sampled_from(["", "", "", "  ", "- ", "\t"]),
        keys_of(cls),
        st.sampled_from([": ", ":"]),
        value_text,
    )
    line = st.one_of(
        entry.map("".join), entry.map("".join), entry.map("".join), YAML_PIECES, st.text(max_size=10)
    )
    return st.lists(line, max_size=12).map("\n".join)


@FUZZ
@given(data=st.data())
def test_random_yaml_text(data, tmp_path_factory):
    """Text built from field names, values and YAML syntax, written to a file as it is, after the required
    fields (usually) so that the text's own settings are what decides."""
    cls = data.draw(st.sampled_from(CLASSES))
    head = "".join(
        f"{k}: {v}\n" for k, v in data.draw(st.sampled_from([required_fields(cls)] * 3 + [{}])).items()
    )
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(head + data.draw(yaml_lines(cls)), encoding="utf-8")
    cfg = outcome(cls, path)
    if cfg is not None:
        assert_round_trip(cfg, tmp_path_factory)


@pytest.mark.parametrize("depth", [50, 5000])
def test_deeply_nested_yaml_is_a_config_error_or_a_config(tmp_path, depth):
    """Nesting deep enough to exhaust Python's recursion in the parser is reported, not a RecursionError."""
    path = tmp_path / "deep.yaml"
    path.write_text("train_data: d\nlora_target_modules: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError):
        load_config(TrainConfig, path)
