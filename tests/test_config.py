"""Config machinery: YAML + key=value overrides + keyword arguments, type checks, errors that name the key,
the --help table and the save/load round trip."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
import yaml
from _fake_stage import FakeConfig

from alignkit.config import (
    ConfigError,
    Range,
    Retired,
    TrainConfig,
    TrainDataFields,
    _parse_yaml,
    config_aliases,
    config_help,
    config_to_dict,
    doc_field,
    field_range,
    load_config,
    numeric_fields,
    renamed_keys,
    save_config,
    validate_config,
    with_current_names,
)
from alignkit.errors import AlignkitError

FIELD_NAMES = [f.name for f in dataclasses.fields(TrainConfig)]


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def squash(text: str) -> str:
    """Whitespace collapsed, so docs wrapped over two lines still match as one string."""
    return " ".join(text.split())


def test_defaults_apply_when_nothing_overrides_them():
    """Only the required field given: every other field is the declared default."""
    cfg = load_config(TrainConfig, train_data="d.jsonl")
    assert cfg == TrainConfig(train_data="d.jsonl")
    assert (cfg.learning_rate, cfg.batch_size, cfg.lora, cfg.dtype) == (1e-5, 8, False, "auto")


def test_later_sources_win_yaml_then_overrides_then_kwargs(tmp_path):
    """YAML sets lr=3e-4, batch_size=4, seed=1; the override sets lr=1e-5; kwargs set seed=5.
    Expected: lr 1e-5 (override beats YAML), batch_size 4 (YAML only), seed 5 (kwargs beat YAML)."""
    path = write(tmp_path, "train_data: d.jsonl\nlearning_rate: 3.0e-4\nbatch_size: 4\nseed: 1\n")
    cfg = load_config(TrainConfig, path, ["learning_rate=1e-5"], seed=5)
    assert (cfg.learning_rate, cfg.batch_size, cfg.seed, cfg.train_data) == (1e-5, 4, 5, "d.jsonl")


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("learning_rate=1e-5", "learning_rate", 1e-5),  # YAML 1.1 reads 1e-5 as a string
        ("max_grad_norm=1", "max_grad_norm", 1.0),  # an int is a fine float
        ("max_grad_norm=null", "max_grad_norm", None),
        ("max_grad_norm=None", "max_grad_norm", None),  # the field docs say "None disables"
        ("lora=true", "lora", True),
        ("lora=no", "lora", False),
        ("lora=0", "lora", False),
        ("lora=YES", "lora", True),
        ("lora_target_modules=[q_proj,v_proj]", "lora_target_modules", ["q_proj", "v_proj"]),
        ("lora_target_modules=q_proj,v_proj", "lora_target_modules", ["q_proj", "v_proj"]),
        ("lora_target_modules=[]", "lora_target_modules", []),
        ("eval_data=null", "eval_data", None),
        ("eval_data=", "eval_data", None),
        ("max_steps=1e3", "max_steps", 1000),  # a whole number written as a float
        ("max_steps=12", "max_steps", 12),
        ("train_split=2024", "train_split", "2024"),  # text fields take the text, not YAML's int
        ("train_split='2024'", "train_split", "2024"),  # quotes are YAML's, stripped
        ("train_data=a=b.jsonl", "train_data", "a=b.jsonl"),  # split on the first '=' only
        ("output_dir=runs/my run #1", "output_dir", "runs/my run #1"),  # not a YAML comment here
        ("dtype=bfloat16", "dtype", "bfloat16"),
        ("on_bad_row=skip", "on_bad_row", "skip"),
        ("train_rows=[0,40]", "train_rows", (0, 40)),  # a YAML list becomes the (start, stop) tuple
    ],
)
def test_override_values_are_parsed_and_coerced(override, key, expected):
    cfg = load_config(TrainConfig, None, ["train_data=d.jsonl", override])
    value = getattr(cfg, key)
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_float_without_dot_becomes_float(tmp_path):
    """PyYAML follows YAML 1.1, where 1e-5 (no dot) is a string; the loader still gives a float."""
    assert yaml.safe_load("learning_rate: 1e-5") == {"learning_rate": "1e-5"}
    path = write(tmp_path, "train_data: d.jsonl\nlearning_rate: 1e-5\nlora: 1\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.lora is True


def test_unknown_key_suggests_the_near_field(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, ["train_data=d", "learnig_rate=1e-5"])
    assert str(info.value) == (
        "unknown config key 'learnig_rate' for TrainConfig; did you mean 'learning_rate'? (from the command line)"
    )
    path = write(tmp_path, "train_data: d\nbatchsize: 4\n")
    with pytest.raises(
        ConfigError, match=rf"'batchsize' .*did you mean 'batch_size'\? \(from {re.escape(str(path))}\)"
    ):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"'lorra' .*did you mean 'lora'\? \(from keyword arguments\)"):
        load_config(TrainConfig, train_data="d", lorra=True)


def test_unknown_key_without_near_match_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, ["train_data=d", "zzzqqq=1"])
    message = str(info.value)
    assert message.startswith(
        "unknown config key 'zzzqqq' for TrainConfig; valid keys are: model, trust_remote_code,"
    )
    assert "did you mean" not in message
    listed = message.split("valid keys are: ")[1].split(" (")[0].split(", ")
    assert listed == FIELD_NAMES


def test_missing_required_field_names_it_and_its_doc():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, ["learning_rate=1e-5"])
    assert str(info.value).splitlines() == [
        "missing required config field 'train_data' for TrainConfig: Training data: a .jsonl/.json/.parquet/.csv "
        "file, a saved dataset dir or a hub id.",
        "set it in the YAML file or on the command line, e.g. train_data=...",
    ]


@pytest.mark.parametrize("written", ["train_data=null", "train_data=", "train_data=~", "train_data=None"])
def test_required_field_given_as_null_is_reported_as_null_not_missing(written):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [written])
    assert str(info.value).splitlines()[0] == (
        "config key 'train_data' is null (from the command line); it is required: Training data: a "
        ".jsonl/.json/.parquet/.csv file, a saved dataset dir or a hub id."
    )


def test_required_field_null_in_yaml_names_the_file_and_missing_ones_stay_missing(tmp_path):
    """ScoreConfig has three required fields: input null in the file, output left out, reward given."""
    from alignkit.stages.score import ScoreConfig

    path = write(tmp_path, "reward: rm\ninput: null\n")
    with pytest.raises(ConfigError) as info:
        load_config(ScoreConfig, path)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"config key 'input' is null (from {path}); it is required: Rows to score")
    assert lines[1].startswith("missing required config field 'output' for ScoreConfig: Output .jsonl")
    assert lines[2] == "set it in the YAML file or on the command line, e.g. input=... output=..."


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "batch_size=2.5",
            "config key 'batch_size' for TrainConfig expects int, got 2.5 (from the command line)",
        ),
        (
            "batch_size=true",
            "config key 'batch_size' for TrainConfig expects int, got True (from the command line)",
        ),
        (
            "max_steps=abc",
            "config key 'max_steps' for TrainConfig expects int | None, got 'abc' (from the command line)",
        ),
        (
            "learning_rate=fast",
            "config key 'learning_rate' for TrainConfig expects float, got 'fast' (from the command line)",
        ),
        (
            "output_dir=null",
            "config key 'output_dir' for TrainConfig expects str, got None (from the command line)",
        ),
        (
            "train_rows=[0,1,2]",
            "config key 'train_rows' for TrainConfig expects tuple[int, int] | None, got [0, 1, 2] "
            "(from the command line)",
        ),
        ("lora=maybe", "config key 'lora' for TrainConfig expects bool, got 'maybe' (from the command line)"),
        ("lora=2", "config key 'lora' for TrainConfig expects bool, got 2 (from the command line)"),
        (
            "dtype=fp32",
            "config key 'dtype' for TrainConfig must be one of 'auto', 'float32', 'bfloat16', 'float16', "
            "got 'fp32' (from the command line)",
        ),
        (
            "lora_target_modules={a: 1}",
            "config key 'lora_target_modules' for TrainConfig expects list[str], got {'a': 1} (from the command line)",
        ),
    ],
)
def test_wrong_type_names_the_field_and_the_expected_type(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, ["train_data=d", override])
    assert str(info.value) == message


def test_yaml_number_for_a_text_field_is_an_error_that_says_to_quote_it(tmp_path):
    """In a YAML file `train_split: 2024` is an int; guessing the text (2024? 02024?) is not ours to do."""
    path = write(tmp_path, "train_data: d\ntrain_split: 2024\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert str(info.value) == (
        f"config key 'train_split' for TrainConfig expects str | None (quote numbers meant as text in YAML), "
        f"got 2024 (from {path})"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr", "expected an override of the form key=value (e.g. learning_rate=1e-5), got 'lr'"),
        ("=3", "expected an override of the form key=value (e.g. learning_rate=1e-5), got '=3'"),
        ("--lr=3", "unknown option '--lr=3': settings are written key=value without dashes, e.g. 'lr=3'"),
        ("--seed", "unknown option '--seed': settings are written key=value without dashes, e.g. 'seed=...'"),
    ],
)
def test_malformed_override_says_the_expected_form(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, ["train_data=d", override])
    assert str(info.value) == message


def test_yaml_file_problems_name_the_file(tmp_path):
    listing = write(tmp_path, "- train_data: d\n", "list.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, listing)
    assert (
        str(info.value)
        == f"config file {listing} must be a mapping of 'key: value' lines, but it holds a list"
    )

    with pytest.raises(ConfigError, match=f"config file not found: {re.escape(str(tmp_path / 'nope.yaml'))}"):
        load_config(TrainConfig, tmp_path / "nope.yaml")

    broken = write(tmp_path, "train_data: [d\n", "broken.yaml")
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(broken))} is not valid YAML"):
        load_config(TrainConfig, broken)

    # A file of comments only sets nothing.
    empty = write(tmp_path, "# nothing yet\n", "empty.yaml")
    assert load_config(TrainConfig, empty, ["train_data=d"]) == TrainConfig(train_data="d")


def test_plain_dataclass_field_without_default_is_required():
    """A field declared without doc_field/required and without a default is required too; `n` keeps 3."""

    @dataclasses.dataclass
    class Plain:
        name: str
        n: int = 3

    with pytest.raises(ConfigError) as info:
        load_config(Plain)
    assert str(info.value).splitlines()[0] == "missing required config field 'name' for Plain"
    assert load_config(Plain, None, ["name=x"]) == Plain(name="x", n=3)
    assert "  name  str   required\n" in config_help(Plain)


def test_config_error_is_a_value_error_and_an_alignkit_error():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, AlignkitError)


def test_subclass_default_and_own_fields():
    """FakeConfig overrides learning_rate's default (5e-6) and adds beta and mode."""
    cfg = load_config(FakeConfig, None, ["train_data=d", "mode=interrupt", "beta=2"])
    assert (cfg.learning_rate, cfg.beta, cfg.mode) == (5e-6, 2.0, "interrupt")
    assert isinstance(cfg.beta, float)


def test_help_lists_every_field_with_type_default_and_doc():
    text = config_help(TrainConfig)
    lines = text.splitlines()
    # Rows are "  name  type  default", columns aligned; the doc follows, indented, on the next line(s).
    assert re.search(r"^  learning_rate +float +1e-05$", text, re.M)
    assert re.search(r"^  train_data +str +required$", text, re.M)
    assert re.search(r"^  eval_data +str \| None +None$", text, re.M)
    assert re.search(r"^  dtype +\{auto,float32,bfloat16,float16\} +auto$", text, re.M)
    assert re.search(r"^  lora +bool +false$", text, re.M)
    assert re.search(
        r"^  lora_target_modules +list\[str\] +\[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj\]$",
        text,
        re.M,
    )
    flat = squash(text)
    for f in dataclasses.fields(TrainConfig):
        assert f"{f.name} " in flat
        assert squash(f.metadata["doc"]) in flat, f.name
    # Declaration order, grouped under the section comments of the class body.
    positions = [text.index(f"\n  {name} ") for name in FIELD_NAMES]
    assert positions == sorted(positions)
    headings = [line for line in lines if line and not line.startswith(" ")]
    assert headings == ["model:", "data:", "optimisation:", "LoRA:", "run folder, logging, checkpoints:"]


def test_help_of_a_subclass_shows_its_defaults_and_groups_its_own_fields():
    text = config_help(FakeConfig)
    assert re.search(r"^  learning_rate +float +5e-06$", text, re.M)  # the subclass's default
    headings = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert headings[-1] == "fake stage:"
    assert text.index("\n  beta ") > text.index("fake stage:") > text.index("\n  progress ")


def test_save_then_load_reproduces_the_config(tmp_path):
    cfg = load_config(
        FakeConfig,
        None,
        [
            "train_data=data/train.jsonl",
            "train_split=2024",  # text that looks like a number must come back as text
            "learning_rate=3e-6",
            "lora=true",
            "lora_target_modules=[q_proj]",
            "max_grad_norm=null",
            "dtype=float32",
            "mode=bad_row",
            "beta=0.25",
            "eval_rows=[40,48]",
        ],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    text = path.read_text()
    assert text.startswith("# FakeConfig (_fake_stage), written by alignkit.\n")
    assert "learning_rate: 3.0e-06\n" in text and "train_split: '2024'\n" in text
    assert load_config(FakeConfig, path) == cfg
    assert yaml.safe_load(text) == config_to_dict(cfg)
    assert not (tmp_path / "run" / "config.yaml.tmp").exists()


# --- declared ranges, cross-field rules, duplicate YAML keys -------------------------------------------------


def _stage_config_classes() -> list[tuple[str, type]]:
    from alignkit.stages import STAGES, load_stage

    return [(stage, load_stage(stage).config) for stage in STAGES]


def _required_filled(cls) -> dict:
    """A placeholder for each required (text) field, so the defaults of everything else can be checked."""
    return {f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")}


@pytest.mark.parametrize("stage, cls", _stage_config_classes(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_field_of_every_stage_declares_a_range_its_default_meets(stage, cls):
    """Every int/float field (optional or in a tuple) of every stage's config has a declared range, the help
    shows it, and the defaults load (so they meet their ranges and the class's check())."""
    names = numeric_fields(cls)
    assert all(field_range(cls, name) is not None for name in names), [
        n for n in names if field_range(cls, n) is None
    ]
    flat = squash(config_help(cls))
    for name in names:
        assert f"Valid: {field_range(cls, name)}." in flat, name
    load_config(cls, **_required_filled(cls))


def test_every_stage_with_numbers_is_covered():
    """The parametrized test above sees the classes with most numbers (no stage silently left out)."""
    counts = {stage: len(numeric_fields(cls)) for stage, cls in _stage_config_classes()}
    assert counts["ppo"] > 35 and counts["dpo"] > 25 and counts["quickstart"] == 10 and counts["report"] == 1


NAMED_CASES = [
    # (stage, overrides, message): the cases issue 15 names, each as a user sees it.
    ("dpo", ["beta=-0.1"], "config key 'beta' must be > 0, got -0.1 (from the command line)"),
    ("dpo", ["beta=0"], "config key 'beta' must be > 0, got 0.0 (from the command line)"),
    ("online-dpo", ["beta=-1"], "config key 'beta' must be > 0, got -1.0 (from the command line)"),
    ("kto", ["beta=-0.1"], "config key 'beta' must be > 0, got -0.1 (from the command line)"),
    ("sft", ["batch_size=0"], "config key 'batch_size' must be >= 1, got 0 (from the command line)"),
    (
        "dpo",
        ["micro_batch_size=0"],
        "config key 'micro_batch_size' must be >= 1, got 0 (from the command line)",
    ),
    ("rm", ["max_length=1"], "config key 'max_length' must be >= 2, got 1 (from the command line)"),
    ("sft", ["max_length=0"], "config key 'max_length' must be >= 2, got 0 (from the command line)"),
    (
        "dpo",
        ["max_length=64", "max_prompt_length=64"],
        "config key 'max_prompt_length' must be < max_length (64), got 64 (from the command line)",
    ),
    (
        "dpo",
        ["max_prompt_length=0"],
        "config key 'max_prompt_length' must be >= 1, got 0 (from the command line)",
    ),
    *[
        (
            stage,
            [f"learning_rate={text}"],
            f"config key 'learning_rate' must be {finite}> 0 (or 0 with allow_zero_learning_rate=true), "
            f"got {shown} (from the command line)",
        )
        for stage, text, shown, finite in [
            ("sft", "nan", "nan", "a finite number "),
            ("dpo", "inf", "inf", "a finite number "),
            ("ppo", "-inf", "-inf", "a finite number "),
            ("kto", ".nan", "nan", "a finite number "),  # YAML's own spelling
            ("rm", "1e400", "inf", "a finite number "),  # overflows to inf
            ("sft", "-1e-5", "-1e-05", ""),
            ("online-dpo", "0", "0.0", ""),
            ("dpo", "0.0", "0.0", ""),
        ]
    ],
    ("sft", ["max_steps=0"], "config key 'max_steps' must be >= 1, got 0 (from the command line)"),
    ("dpo", ["max_steps=-3"], "config key 'max_steps' must be >= 1, got -3 (from the command line)"),
    ("rm", ["epochs=0"], "config key 'epochs' must be >= 1, got 0 (from the command line)"),
    ("kto", ["epochs=-1"], "config key 'epochs' must be >= 1, got -1 (from the command line)"),
    (
        "sft",
        ["batch_size=4", "micro_batch_size=8"],
        "config key 'micro_batch_size' must be <= batch_size (4), got 8 (from the command line)",
    ),
    (
        "sft",
        ["batch_size=1"],  # micro_batch_size keeps its default 2
        "config key 'micro_batch_size' must be <= batch_size (1), got 2 (batch_size from the command line)",
    ),
    (
        "kto",
        ["micro_batch_size=1"],
        "config key 'micro_batch_size' must be >= 2, got 1 (from the command line)",
    ),
    ("ppo", ["temperature=0"], "config key 'temperature' must be > 0, got 0.0 (from the command line)"),
    (
        "ppo",
        ["minibatch_size=4"],  # micro_batch_size keeps its default 8
        "config key 'micro_batch_size' must be <= minibatch_size (4), got 8 (minibatch_size from the command line)",
    ),
    ("ppo", ["gamma=1.5"], "config key 'gamma' must be in [0, 1], got 1.5 (from the command line)"),
    ("ppo", ["clip_eps=1"], "config key 'clip_eps' must be in (0, 1), got 1.0 (from the command line)"),
    (
        "ppo",
        ["init_kl_coef=0"],
        "config key 'init_kl_coef' must be > 0 when kl_target is set (adaptive control scales beta and cannot "
        "move it from 0), got 0.0; or set kl_target=null for no KL penalty (from the command line)",
    ),
    (
        "online-dpo",
        ["samples_per_prompt=1"],
        "config key 'samples_per_prompt' must be >= 2, got 1 (from the command line)",
    ),
    ("online-dpo", ["top_p=0"], "config key 'top_p' must be in (0, 1], got 0.0 (from the command line)"),
    (
        "dpo",
        ["label_smoothing=0.5"],
        "config key 'label_smoothing' must be in [0, 0.5), got 0.5 (from the command line)",
    ),
    ("sft", ["adam_beta2=1"], "config key 'adam_beta2' must be in [0, 1), got 1.0 (from the command line)"),
    ("sft", ["max_grad_norm=0"], "config key 'max_grad_norm' must be > 0, got 0.0 (from the command line)"),
    ("sft", ["seed=-1"], "config key 'seed' must be in [0, 4294967295], got -1 (from the command line)"),
    (
        "sft",
        ["train_rows=[-1,5]"],
        "config key 'train_rows' must hold numbers >= 0, got [-1, 5] (from the command line)",
    ),
    (
        "sft",
        ["train_rows=[5,5]"],
        "config key 'train_rows' must be [start, stop] with start < stop, got [5, 5] (from the command line)",
    ),
    ("sft", ["train_max_rows=0"], "config key 'train_max_rows' must be >= 1, got 0 (from the command line)"),
    ("eval", ["temperature=-0.1"], "config key 'temperature' must be >= 0, got -0.1 (from the command line)"),
    ("build-prefs", ["n_samples=1"], "config key 'n_samples' must be >= 2, got 1 (from the command line)"),
    (
        "score",
        ["max_length=32", "max_prompt_length=40"],
        "config key 'max_prompt_length' must be < max_length (32), got 40 (from the command line)",
    ),
    (
        "cai-label",
        ["pairs_per_chunk=0"],
        "config key 'pairs_per_chunk' must be >= 1, got 0 (from the command line)",
    ),
    ("quickstart", ["dpo_beta=-0.1"], "config key 'dpo_beta' must be > 0, got -0.1 (from the command line)"),
    (
        "quickstart",
        ["dpo_learning_rate=0"],
        "config key 'dpo_learning_rate' must be > 0, got 0.0 (from the command line)",
    ),
    ("report", ["max_samples=-1"], "config key 'max_samples' must be >= 0, got -1 (from the command line)"),
]


@pytest.mark.parametrize("stage, overrides, message", NAMED_CASES)
def test_out_of_range_value_is_refused_naming_field_value_and_range(stage, overrides, message):
    from alignkit.stages import load_stage

    cls = load_stage(stage).config
    given = [f"{k}={v}" for k, v in _required_filled(cls).items()]
    with pytest.raises(ConfigError) as info:
        load_config(cls, None, [*given, *overrides])
    assert str(info.value) == message


def test_range_error_names_the_file_a_value_came_from(tmp_path):
    from alignkit.stages.dpo import DPOConfig

    path = write(tmp_path, "train_data: d\nbeta: -0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(DPOConfig, path)
    assert str(info.value) == f"config key 'beta' must be > 0, got -0.1 (from {path})"
    # Two fields from two places: each named with its source.
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, write(tmp_path, "train_data: d\nbatch_size: 2\n"), ["micro_batch_size=4"])
    assert str(info.value).endswith(
        f"got 4 (micro_batch_size from the command line, batch_size from {tmp_path / 'cfg.yaml'})"
    )


def test_zero_learning_rate_is_accepted_only_when_asked_for():
    cfg = load_config(TrainConfig, None, ["train_data=d", "learning_rate=0", "allow_zero_learning_rate=true"])
    assert cfg.learning_rate == 0.0
    with pytest.raises(ConfigError, match="allow_zero_learning_rate=true"):
        load_config(TrainConfig, None, ["train_data=d", "learning_rate=0", "allow_zero_learning_rate=false"])
    # The escape is for 0 only: a negative rate stays an error.
    with pytest.raises(ConfigError, match="got -1.0"):
        load_config(TrainConfig, None, ["train_data=d", "learning_rate=-1", "allow_zero_learning_rate=true"])


def test_subclass_keeps_the_range_of_a_field_it_redeclares_and_may_narrow_it():
    """DPOConfig redeclares learning_rate (a new default) and keeps TrainConfig's range; KTOConfig narrows
    micro_batch_size to >= 2; FakeConfig (tests) redeclares learning_rate too."""
    from alignkit.stages.dpo import DPOConfig
    from alignkit.stages.kto import KTOConfig

    assert field_range(DPOConfig, "learning_rate") == field_range(TrainConfig, "learning_rate")
    assert str(field_range(FakeConfig, "learning_rate")) == "> 0 (or 0 with allow_zero_learning_rate=true)"
    assert (
        str(field_range(TrainConfig, "micro_batch_size")),
        str(field_range(KTOConfig, "micro_batch_size")),
    ) == (
        ">= 1",
        ">= 2",
    )


def test_range_bounds_and_finiteness():
    @dataclasses.dataclass
    class Numbers:
        free: float = 0.0  # no declared range: any finite number
        unbounded: float = doc_field(0.0, "Any float, inf and nan too.", finite=False)
        fraction: float | None = doc_field(None, "In (0, 1].", gt=0, le=1)

    for text in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(ConfigError, match=r"'free' must be a finite number, got (nan|-?inf)"):
            load_config(Numbers, None, [f"free={text}"])
    assert math.isinf(load_config(Numbers, None, ["unbounded=-inf"]).unbounded)
    assert math.isnan(load_config(Numbers, None, ["unbounded=nan"]).unbounded)
    assert load_config(Numbers, None, ["fraction=1"]).fraction == 1.0
    assert load_config(Numbers, None, ["fraction=null"]).fraction is None  # None is never range-checked
    for bad in ("0", "1.0000001", "-2"):
        with pytest.raises(ConfigError, match=r"'fraction' must be in \(0, 1\]"):
            load_config(Numbers, None, [f"fraction={bad}"])
    assert (
        str(Range(ge=0, lt=1)) == "in [0, 1)"
        and str(Range(le=5)) == "<= 5"
        and str(Range()) == ("any finite number")
    )


def test_config_built_in_code_is_checked_by_validate_config():
    """No source is known for a dataclass built directly: the message names field, value and range only."""
    from alignkit.stages.dpo import DPOConfig

    with pytest.raises(ConfigError) as info:
        validate_config(DPOConfig(train_data="d", beta=-0.1))
    assert str(info.value) == "config key 'beta' must be > 0, got -0.1"
    with pytest.raises(ConfigError) as info:
        validate_config(DPOConfig(train_data="d", batch_size=2, micro_batch_size=4))
    assert str(info.value) == "config key 'micro_batch_size' must be <= batch_size (2), got 4"
    validate_config(DPOConfig(train_data="d"))  # the defaults hold


def test_stage_check_config_refuses_a_config_built_in_code(tmp_path):
    """kto, ppo and online-dpo check a config built in code before they write anything."""
    from alignkit.stages import kto, online_dpo, ppo

    with pytest.raises(ConfigError, match="'micro_batch_size' must be >= 2, got 1"):
        kto.check_config(kto.KTOConfig(train_data="d", micro_batch_size=1))
    with pytest.raises(ConfigError, match="'iterations' must be >= 1, got 0"):
        ppo.check_config(ppo.PPOConfig(reward="x:y", iterations=0))
    with pytest.raises(ConfigError, match="'samples_per_prompt' must be >= 2, got 1"):
        online_dpo.check_config(online_dpo.OnlineDPOConfig(reward="x:y", samples_per_prompt=1))


def test_unused_field_of_ppo_is_refused_at_load_time():
    from alignkit.stages.ppo import PPOConfig

    with pytest.raises(
        ConfigError, match="'epochs' is not used by ppo; set iterations and ppo_epochs instead"
    ):
        load_config(PPOConfig, None, ["reward=x:y", "epochs=3"])


def test_help_shows_each_range():
    from alignkit.stages.dpo import DPOConfig

    text = squash(config_help(DPOConfig))
    assert "DPO/IPO temperature on the log-ratios (KL strength). Valid: > 0." in text
    assert "Peak AdamW learning rate. Valid: > 0 (or 0 with allow_zero_learning_rate=true)." in text
    assert "Valid: in [0, 0.5)." in text  # label_smoothing
    assert "Run each pair's prompt once" in text and "share_prompt" in text  # a bool: no range shown


def test_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "train_data: d\nbeta: 0.1\n# a comment\nseed: 3\nbeta: -0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(FakeConfig, path)
    assert (
        str(info.value) == f"config file {path}: key 'beta' appears twice, on line 2 and on line 5; keep one"
    )


def test_duplicate_key_in_a_nested_mapping_or_an_override_is_refused(tmp_path):
    path = write(tmp_path, "train_data: d\nlora_target_modules:\n  - {a: 1, a: 2}\n")
    with pytest.raises(ConfigError, match="key 'a' appears twice, on line 3 and on line 3"):
        load_config(TrainConfig, path)
    with pytest.raises(
        ConfigError, match=r"override 'lora_target_modules=\{q: 1, q: 2\}': key 'q' appears twice"
    ):
        load_config(TrainConfig, None, ["train_data=d", "lora_target_modules={q: 1, q: 2}"])


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """A key brought in by `<<: *base` and set again in the mapping is YAML's override, not a duplicate."""
    path = write(tmp_path, "base: &b {seed: 1, batch_size: 4}\n")
    data = _parse_yaml(path.read_text() + "run:\n  <<: *b\n  seed: 7\n")
    assert data["run"] == {"seed": 7, "batch_size": 4}


def test_yaml_with_python_tags_stays_refused(tmp_path):
    """Safe loading kept: a tag that would build a Python object is a YAML error, not code run."""
    path = write(tmp_path, "train_data: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize(
    "text",
    [
        "train_data: d\nseed: " + "9" * 5000 + "\n",  # past Python's int-from-text limit
        "train_data: d\ntrain_split: 2024-13-45\n",  # a date YAML cannot build
        "train_data: d\nseed: !!int\n",  # PyYAML: IndexError
        "train_data: d\nlora: !!bool maybe\n",  # PyYAML: KeyError
        "train_data: d\ntrain_split: !!timestamp soon\n",  # PyYAML: AttributeError
        "train_data: d\nlora_target_modules: !!map x\n",
        "train_data: d\n? !!set x\n: 1\n",  # an unhashable key
    ],
)
def test_yaml_values_python_refuses_to_build_are_config_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(TrainConfig, write(tmp_path, text))


def test_config_file_that_cannot_be_read_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(TrainConfig, tmp_path)  # a directory
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(TrainConfig, binary)


# --- field groups and renamed keys ---------------------------------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each deprecation message is printed once per process: start every test with none printed yet."""
    from alignkit import config

    monkeypatch.setattr(config, "_WARNED_RENAMES", set())


@pytest.mark.parametrize(
    ("stage", "old", "new", "value"),
    [
        ("sft", "max_train_rows", "train_max_rows", 3),
        ("dpo", "max_eval_rows", "eval_max_rows", 4),
        ("ppo", "max_train_rows", "train_max_rows", 5),
        ("build-prefs", "prompt_rows", "prompts_rows", (1, 3)),
        ("build-prefs", "max_prompts", "prompts_max_rows", 6),
        ("cai-revise", "max_prompts", "prompts_max_rows", 7),
        ("eval", "max_prompts", "prompts_max_rows", 8),
        ("cai-label", "max_pairs", "input_max_rows", 9),
        ("score", "split", "input_split", "test"),
        ("score", "rows", "input_rows", (0, 2)),
        ("score", "max_rows", "input_max_rows", 10),
    ],
)
def test_an_old_name_still_loads_with_a_deprecation_message_naming_the_new_one(
    stage, old, new, value, tmp_path, capsys, fresh_warnings
):
    cls = dict(_stage_config_classes())[stage]
    shown = list(value) if isinstance(value, tuple) else value
    path = write(tmp_path, yaml.safe_dump({**_required_filled(cls), old: shown}))
    cfg = load_config(cls, path)
    assert getattr(cfg, new) == value
    assert old not in config_to_dict(cfg)  # saved under the new name only
    message = f"warning: config key '{old}' (from {path}) is deprecated; write '{new}' instead"
    assert capsys.readouterr().err.count(message) == 1
    load_config(cls, path)  # once per process
    assert message not in capsys.readouterr().err
    assert old not in {f.name for f in dataclasses.fields(cls)}  # not a field, so not in --help


def test_old_and_new_name_both_given_in_one_source_is_an_error(fresh_warnings):
    from alignkit.stages.sft import SFTConfig

    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, None, ["max_train_rows=3", "train_max_rows=4"], train_data="d")
    assert str(info.value) == (
        "config key 'max_train_rows' (from the command line) is the old spelling of 'train_max_rows', and "
        "'train_max_rows' is also given; keep only 'train_max_rows'"
    )
    # In two sources the later wins, as for any key: an older run's config.yaml, a new value on the command line.
    cfg = load_config(SFTConfig, None, ["train_max_rows=4"], train_data="d", max_train_rows=5)
    assert cfg.train_max_rows == 5


@pytest.mark.parametrize("stage", ["ppo", "online-dpo"])
def test_online_stages_show_and_take_only_what_they_read(stage, fresh_warnings, capsys):
    cls = dict(_stage_config_classes())[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    gone = {"batch_size", "epochs", "max_steps", "max_length", "eval_data", "eval_split", "eval_rows"}
    gone |= {"eval_max_rows", "eval_every"}
    assert not gone & names
    assert not gone & set(config_help(cls).split())
    assert "Not used by" not in config_help(cls)
    # An older run's config.yaml holds them at their defaults: read and ignored, with a message.
    cfg = load_config(cls, None, ["reward=x:y", "batch_size=8", "eval_data=null"])
    assert not hasattr(cfg, "batch_size")
    assert f"config key 'batch_size' is not used by {stage}; set " in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"config key 'eval_every' is not used by {stage}; set `alignkit eval`"):
        load_config(cls, None, ["reward=x:y", "eval_every=5"])
    with pytest.raises(ConfigError, match=r"'train_rows' must be \[start, stop\] with start < stop"):
        load_config(cls, None, ["reward=x:y", "train_rows=[3,3]"])


def test_each_field_groups_check_runs_once(monkeypatch):
    """Every check() starts with super().check(): in TrainConfig's diamond of groups, each runs exactly once."""
    from alignkit import config
    from alignkit.stages.dpo import DPOConfig

    calls: list[str] = []
    for klass in DPOConfig.__mro__:
        own = klass.__dict__.get("check")
        if own is None:
            continue

        def counted(self, _own=own, _name=klass.__name__):
            calls.append(_name)
            _own(self)

        monkeypatch.setattr(klass, "check", counted)
    validate_config(DPOConfig(train_data="d"))
    expected = [
        "DPOConfig",
        "SampleWatchFields",
        "RunFolderFields",
        "OfflineBatchFields",
        "SequenceFields",
        "EvalDataFields",
        "TrainDataFields",
        "Fields",
    ]
    assert calls == expected
    assert config.Fields in DPOConfig.__mro__
    # The groups' rules still fire through the composition.
    with pytest.raises(ConfigError, match="'micro_batch_size' must be <= batch_size"):
        validate_config(DPOConfig(train_data="d", batch_size=2, micro_batch_size=4))
    with pytest.raises(ConfigError, match="'eval_rows' must be"):
        validate_config(DPOConfig(train_data="d", eval_rows=(2, 1)))


@pytest.mark.parametrize("stage", ["eval", "build-prefs", "cai-revise"])
def test_fsdp_generation_is_only_where_it_acts(stage, fresh_warnings, capsys):
    """Only ppo, online-dpo and grpo sample under FSDP: the other generating stages neither show nor take it."""
    cls = dict(_stage_config_classes())[stage]
    assert "fsdp_generation" not in config_help(cls)
    load_config(cls, None, ["fsdp_generation=gather"], **_required_filled(cls))  # an older config: ignored
    assert "config key 'fsdp_generation' is used only by ppo, online-dpo and grpo" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'fsdp_generation' is used only by ppo, online-dpo and grpo"):
        load_config(cls, None, ["fsdp_generation=shards"], **_required_filled(cls))


# --- one alias table (ALIASES): renamed keys, old values, retired keys ---------------------------------------


@dataclasses.dataclass
class _Aliased(TrainDataFields):
    """A config with one alias of each kind, beside the renamed key its field group brings (max_train_rows)."""

    ALIASES = {
        "old_size": "size",
        "mode=legacy": "mode=new",
        "gone": Retired(3, "is not used any more; set size instead"),
    }
    size: int = doc_field(1, "A size.", ge=1)
    mode: typing.Literal["new", "other"] = doc_field("other", "A mode.")


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


def test_an_old_key_in_a_yaml_file_or_on_the_command_line_sets_the_new_field_with_one_warning(
    tmp_path, capsys, fresh_warnings
):
    path = write(tmp_path, "train_data: d\nold_size: 4\n")
    assert load_config(_Aliased, path).size == 4
    assert _warnings(capsys) == [
        f"warning: config key 'old_size' (from {path}) is deprecated; write 'size' instead (the old spelling "
        "works until the next release)"
    ]
    cfg = load_config(_Aliased, path, ["old_size=5"])  # the command line wins, as for any key
    assert (cfg.size, _warnings(capsys)) == (5, [])  # once per process
    saved = config_to_dict(load_config(_Aliased, None, ["train_data=d", "max_train_rows=2"]))  # a group's alias
    assert saved["train_max_rows"] == 2 and "max_train_rows" not in saved
    assert _warnings(capsys) == [
        "warning: config key 'max_train_rows' (from the command line) is deprecated; write 'train_max_rows' "
        "instead (the old spelling works until the next release)"
    ]


def test_an_old_value_is_rewritten_and_named_in_its_warning(capsys, fresh_warnings):
    assert load_config(_Aliased, None, ["train_data=d", "mode=legacy"]).mode == "new"
    (line,) = _warnings(capsys)
    assert line.startswith(
        "warning: config value 'mode=legacy' (from the command line) is deprecated; write 'mode=new' instead"
    )
    assert load_config(_Aliased, None, ["train_data=d", "mode=other"]).mode == "other"  # a current value: as is
    assert _warnings(capsys) == []


def test_a_retired_key_is_ignored_at_its_old_default_and_otherwise_names_its_replacement(capsys, fresh_warnings):
    cfg = load_config(_Aliased, None, ["train_data=d", "gone=3"])
    assert not hasattr(cfg, "gone")
    assert _warnings(capsys) == [
        "warning: config key 'gone' is not used any more; set size instead; ignored at its old default 3 for one "
        "release (from the command line)"
    ]
    with pytest.raises(ConfigError) as info:
        load_config(_Aliased, None, ["train_data=d", "gone=4"])
    assert str(info.value) == "config key 'gone' is not used any more; set size instead (from the command line)"


@pytest.mark.parametrize(
    "yaml_text, args, message",
    [
        (
            "old_size: 2\nsize: 3\n",
            [],
            "config key 'old_size' (from {path}) is the old spelling of 'size', and 'size' is also given; "
            "keep only 'size'",
        ),
        (
            None,
            ["size=3", "old_size=2"],
            "config key 'old_size' (from the command line) is the old spelling of 'size', and 'size' is also "
            "given; keep only 'size'",
        ),
    ],
)
def test_an_old_and_a_new_spelling_in_one_source_is_an_error_printed_without_a_warning(
    yaml_text, args, message, tmp_path, capsys, fresh_warnings
):
    path = write(tmp_path, "train_data: d\n" + yaml_text) if yaml_text else None
    with pytest.raises(ConfigError) as info:
        load_config(_Aliased, path, ["train_data=d", *args])
    assert str(info.value) == message.format(path=path)
    assert _warnings(capsys) == []


def test_an_old_key_given_null_yields_to_the_new_one(tmp_path, fresh_warnings):
    """An older config.yaml wrote every key, most of them null: the null old key does not clash with the new."""
    path = write(tmp_path, "train_data: d\nold_size: null\nsize: 3\nmax_train_rows: null\ntrain_max_rows: 2\n")
    cfg = load_config(_Aliased, path)
    assert (cfg.size, cfg.train_max_rows) == (3, 2)


def test_renamed_keys_are_the_key_to_key_aliases_of_a_class_and_its_groups():
    assert renamed_keys(_Aliased) == {"max_train_rows": "train_max_rows", "old_size": "size"}
    saved = {"old_size": 2, "size": 3, "mode": "new"}  # a key written under both names keeps the new one
    assert with_current_names(_Aliased, saved) == {"size": 3, "mode": "new"}
    assert with_current_names(_Aliased, {"old_size": 2}) == {"size": 2}


@pytest.mark.parametrize("stage, cls", _stage_config_classes(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_stage_alias_points_at_a_field_it_has(stage, cls):
    """Each stage's one table: an old key is not a field (else it would never be read as old), its new key is;
    an old value's key is a field; no stage keeps a second table."""
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in config_aliases(cls).items():
        if isinstance(new, Retired):
            assert old not in names or old == "fsdp_generation", (stage, old)
            continue
        old_key, _, _ = old.partition("=")
        # an old value of a field, or of a gone key each of whose values is a value of another (tensorboard=false)
        assert ("=" in old) == (old_key in names) or ("=" in old and "=" in new), (stage, old)
        assert new.partition("=")[0] in names, (stage, old, new)
    assert not [a for a in ("RENAMED", "RETIRED", "DEPRECATED") if any(a in k.__dict__ for k in cls.__mro__)]
