"""Config machinery: YAML + key=value overrides + keyword arguments, type checks, errors that name the key,
the --help table and the save/load round trip."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from _fake_stage import FakeConfig

from alignkit.config import ConfigError, TrainConfig, config_help, config_to_dict, load_config, save_config
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
    # Set to null explicitly counts as missing too.
    with pytest.raises(ConfigError, match="missing required config field 'train_data'"):
        load_config(TrainConfig, None, ["train_data=null"])


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
