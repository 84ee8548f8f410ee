"""`alignkit compare` in quick mode on the tiny model: 2 methods x 2 seeds, the table and page written, and a
rerun that trains and evaluates nothing. The aggregation by hand on made-up runs."""

from __future__ import annotations

import json
import shlex

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.pipelines.compare import CompareConfig, markdown_table, method_rows
from alignkit.training.snapshots import list_snapshots as snapshot_steps

PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i cannot help."},
    {"prompt": "please write a short poem", "chosen": "the sea and the sky.", "rejected": "no."},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog.", "rejected": "0 1 2 3"},
    {"prompt": "i need help", "chosen": "here is a helpful answer.", "rejected": "i am sorry."},
    {"prompt": "what is 2 + 2?", "chosen": "4.", "rejected": "5."},
] * 2


def _quick_compare(model_dir, tmp_path, *settings: str) -> tuple:
    """The output folder and the command line of a quick compare on PAIRS, scored by the length reward."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / "cmp"
    args = ["compare", f"model={model_dir}", f"output_dir={out}", f"pairs={pairs}", "gold=_ppo_rewards:length",
            "quick=true", "progress=false", *settings]  # fmt: skip
    return out, args


def test_quick_compare_two_methods_two_seeds_then_resume(tiny_model_dir, tmp_path, capsys):
    out, args = _quick_compare(tiny_model_dir, tmp_path, "methods=[dpo,grpo]", "seeds=[0,1]")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "gold win rate [95% CI]" in printed and "| dpo |" in printed and "| grpo |" in printed
    result = json.loads((out / "compare.json").read_text())
    assert result["trained_now"] == ["dpo-seed0", "dpo-seed1", "grpo-seed0", "grpo-seed1"]
    assert [m["method"] for m in result["methods"]] == ["dpo", "grpo"]
    dpo, grpo = result["methods"]
    # Held out: pairs 4 and 9 of 10 (every fifth); DPO measures its accuracy on them, GRPO has none.
    assert len((out / "pairs-heldout.jsonl").read_text().splitlines()) == 2
    assert dpo["preference_accuracy"] is not None and grpo["preference_accuracy"] is None
    assert dpo["models_in_memory"] == 2 and grpo["models_in_memory"] == 1  # gold is a function; GRPO beta 0
    for row in result["methods"]:
        assert row["seeds"] == 2 and row["peak_rss_mb"] > 0 and row["wall_seconds"] > 0
        lo, hi = row["win_rate_ci95"]
        assert 0 <= lo <= row["win_rate"] <= hi <= 1
        assert row["stopped_share"] == 0.0 and row["win_rate_std_over_seeds"] >= 0
    for run in result["runs"]:  # each run folder is an ordinary run folder, evaluated on 4 prompts x 1
        assert run["run_dir"] == f"{run['method']}-seed{run['seed']}"  # relative: compare.json travels
        run_dir = out / run["run_dir"]
        assert (run_dir / "config.yaml").is_file() and (run_dir / "final").is_dir()
        assert json.loads((run_dir / "eval.json").read_text())["n_prompts"] == 4
    page = (out / "compare.html").read_text()
    assert "data:image/svg+xml;base64," in page and "<th>gold win rate [95% CI]</th>" in page
    assert (out / "compare.md").read_text().startswith("| method | models |")
    assert json.loads((out / ".alignkit-run.json").read_text())["stage"] == "compare"  # its own: resumable
    # The base's side of the evaluation is sampled once, by the first run's, and read by the other three.
    evals = [json.loads((out / f"{m}-seed{k}" / "eval.json").read_text()) for m in ("dpo", "grpo") for k in (0, 1)]
    assert [e["reference_from_cache"] for e in evals] == [False, True, True, True]
    assert all(e["reference_stats"] == evals[0]["reference_stats"] for e in evals)

    # Rerun: everything is finished, so nothing trains or evaluates again and the table is the same.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/eval.json")}
    assert main(args) == 0
    again = json.loads((out / "compare.json").read_text())
    assert again["trained_now"] == [] and again["evaluated_now"] == []
    assert again["methods"] == result["methods"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/eval.json")} == mtimes
    # Both invocations are kept, and the comparison's cost is their sum (the first's, plus a short rerun).
    first, rerun = again["invocations"]
    assert first == result["invocations"][0] and first["trained"] == result["trained_now"] and rerun["trained"] == []
    assert again["wall_seconds"] == first["seconds"] + rerun["seconds"]


def test_an_interrupted_compare_counts_its_time_when_rerun(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM in the second run: the CLI says to rerun the same command, and the rerun's compare.json keeps the
    interrupted invocation (what it trained, its seconds) in invocations and wall_seconds."""
    from alignkit.errors import TrainingInterrupted
    from alignkit.pipelines import compare

    out, args = _quick_compare(tiny_model_dir, tmp_path, "methods=[dpo]", "seeds=[0,1]")
    real_train = compare.train

    def train_then_stop(cfg, method, seed, model, data, run_dir):
        if seed == 1:
            raise TrainingInterrupted(str(run_dir / "checkpoints" / "step-000001"))
        real_train(cfg, method, seed, model, data, run_dir)

    monkeypatch.setattr(compare, "train", train_then_stop)
    assert main(args) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "resume with: alignkit " + shlex.join(args)
    assert not (out / "compare.json").exists()
    monkeypatch.setattr(compare, "train", real_train)
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    stopped, finished = result["invocations"]
    assert stopped["interrupted"] and stopped["trained"] == stopped["evaluated"] == ["dpo-seed0"]
    assert finished["trained"] == result["trained_now"] == ["dpo-seed1"] and "interrupted" not in finished
    assert result["wall_seconds"] == stopped["seconds"] + finished["seconds"] and stopped["seconds"] > 0
    assert not (out / compare.INTERRUPTED_INVOCATIONS).exists()  # folded into compare.json


def test_quick_compare_with_frontier_points_evaluates_each_run_along_its_way(tiny_model_dir, tmp_path, capsys):
    """frontier_points=2: every run (offline DPO, online PPO) writes a snapshot at step 1 of 2, which is evaluated
    as eval-step-000001.json; the run's path in compare.json goes from step 1 to the final model
    (step 2), and the page draws one line per run. A rerun evaluates nothing again."""
    import base64
    import re

    out, args = _quick_compare(tiny_model_dir, tmp_path, "methods=[dpo,ppo]", "seeds=[0]", "frontier_points=2")
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["evaluated_now"] == ["dpo-seed0", "dpo-seed0/step-000001", "ppo-seed0", "ppo-seed0/step-000001"]
    for run in result["runs"]:
        run_dir = out / run["run_dir"]
        assert [s for s, _ in snapshot_steps(run_dir)] == [1, 2]  # snapshot_every = 2 // 2
        step1 = json.loads((run_dir / "eval-step-000001.json").read_text())
        final = json.loads((run_dir / "eval.json").read_text())
        assert [p["step"] for p in run["path"]] == [1, 2]
        assert run["path"][0]["kl"] == step1["kl"]["k1_per_token"]
        assert run["path"][0]["gold_mean"] == step1["policy"]["score"]["mean"]
        assert run["path"][1]["gold_mean"] == final["policy"]["score"]["mean"] == run["gold_mean"]
        assert step1["reference_from_cache"] and step1["reference_stats"] == final["reference_stats"]
    page = (out / "compare.html").read_text()
    svg = base64.b64decode(re.search(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", page).group(1)).decode()
    assert svg.count("<polyline") == 2
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/eval*.json")}
    assert main(args) == 0
    assert json.loads((out / "compare.json").read_text())["evaluated_now"] == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/eval*.json")} == mtimes


def test_frontier_paths_join_the_base_the_snapshots_and_the_final_model():
    import xml.etree.ElementTree as ET

    from alignkit.reporting.frontier import frontier_paths, frontier_points, frontier_svg

    walked = _run("dpo", 0, 0.5, [], []) | {"path": [{"step": 2, "kl": 0.05, "gold_mean": 0.8},
                                                      {"step": 4, "kl": 0.1, "gold_mean": 1.0}]}  # fmt: skip
    final_only = _run("ppo", 0, 0.5, [], []) | {"path": [{"step": 4, "kl": 0.1, "gold_mean": 1.0}]}
    paths = frontier_paths([walked, final_only])
    assert paths == {"dpo": [[(0.0, 0.5), (0.05, 0.8), (0.1, 1.0)]]}  # a run without snapshots has no line
    svg = ET.fromstring(frontier_svg(frontier_points([walked, final_only]), paths=paths))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f".//{ns}polyline")) == 1
    small = [c for c in svg.findall(f".//{ns}circle") if c.get("r") == "2.5"]
    assert len(small) == 1  # the one snapshot between the base and the final model


def _run(method: str, seed: int, win: float, policy: list[float], reference: list[float], stopped=False) -> dict:
    return {
        "method": method, "seed": seed, "peak_rss_mb": 100.0 + seed, "wall_seconds": 10.0 * (seed + 1),
        "tokens_per_s": None, "preference_accuracy": 0.5 + 0.1 * seed, "win_rate": {"value": win},
        "gold_mean": 1.0 + seed, "reference_gold_mean": 0.5, "kl": 0.1 * (seed + 1), "length_change": 2.0,
        "distinct_2": 0.5, "stopped": stopped, "per_prompt": {"policy": policy, "reference": reference},
    }  # fmt: skip


def test_method_rows_pool_seeds_and_measure_stability():
    """Seed 0 wins 1 of 2 prompts (0.5), seed 1 both (1.0): pooled 3 of 4 = 0.75; std of (0.5, 1.0) with
    ddof 1 = 0.3536; one run of two stopped = 0.5; peak memory is the larger (101), wall time the mean (15)."""
    runs = [
        _run("dpo", 0, 0.5, [1.0, 0.0], [0.5, 0.5]),
        _run("dpo", 1, 1.0, [1.0, 1.0], [0.5, 0.5], stopped=True),
    ]
    (row,) = method_rows(runs, reward_is_model=False)
    assert row["win_rate"] == pytest.approx(0.75)
    assert row["win_rate_std_over_seeds"] == pytest.approx(0.35355, abs=1e-4)
    assert row["stopped_share"] == 0.5 and row["peak_rss_mb"] == 101.0 and row["wall_seconds"] == 15.0
    assert row["preference_accuracy"] == pytest.approx(0.55) and row["kl"] == pytest.approx(0.15)
    assert row["tokens_per_s"] is None and row["models_in_memory"] == 2
    assert "| dpo | 2 | 101 | 15 | – | 0.55 | 0.750 [" in markdown_table([row])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["methods=[dpo,rlhf]"], "unknown ['rlhf']"),
        (["methods=[grpo]", "method_settings=[dpo.beta=0.2]"], "'dpo.beta=0.2' is not"),
        (["methods=[grpo]"], "gold"),
    ],
)
def test_config_mistakes_are_config_errors(settings, message):
    extra = [] if settings == ["methods=[grpo]"] else ["gold=x:y"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(CompareConfig, None, [*settings, *extra])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["methods=[grpo,dpo]", "gold=_ppo_rewards:length"], "config key 'pairs': ['dpo'] train on preference"),
        (["methods=[grpo]", "gold=no_such_module_xyz:f"], "gold: no module named 'no_such_module_xyz'"),
        (["methods=[grpo]", "gold=_ppo_rewards:length", "reward=/no/rm"], "reward: '/no/rm' is neither"),
    ],
)
def test_missing_data_or_a_bad_scorer_stops_before_anything_runs(settings, message, tmp_path, capsys):
    assert main(["compare", *settings, f"output_dir={tmp_path / 'c'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_frontier_has_one_point_per_run_and_the_base_at_kl_zero():
    import xml.etree.ElementTree as ET

    from alignkit.reporting.frontier import frontier_points, frontier_svg

    runs = [_run("dpo", 0, 0.5, [], []), _run("dpo", 1, 1.0, [], []), _run("ppo", 0, 0.5, [], [])]
    points = frontier_points(runs)
    assert points == {"dpo": [(0.1, 1.0), (0.2, 2.0)], "ppo": [(0.1, 1.0)], "base": [(0.0, 0.5)]}
    svg = ET.fromstring(frontier_svg(points))
    circles = svg.findall(".//{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 4 + 3  # a point per run and the base, and a legend mark per series
    legend = [t.text for t in svg.findall(".//{http://www.w3.org/2000/svg}text") if t.get("class") == "legend"]
    assert legend == ["dpo", "ppo", "base"]


def _point_coordinates(svg_text: str) -> list[tuple[float, float]]:
    """(cx, cy) of the plotted points (the legend's marks have no fill-opacity)."""
    import xml.etree.ElementTree as ET

    circles = ET.fromstring(svg_text).findall(".//{http://www.w3.org/2000/svg}circle")
    return [(float(c.get("cx")), float(c.get("cy"))) for c in circles if c.get("fill-opacity")]


@pytest.mark.parametrize("base_gold", [0.875, 0.875 + 2**-52])  # equal; equal but for the last bit (a mean)
def test_frontier_draws_equal_gold_scores_at_one_height_mid_axis(base_gold):
    """Every run and the base score 0.875 (the quick run of docs/images/compare-quick.png): the y range is
    degenerate, so all points share one height, the plot's middle: top 36 + 320 / 2 = 196. Before, the runs
    were drawn at one end of the axis and the base at the other."""
    from alignkit.reporting.frontier import frontier_svg

    points = {"dpo": [(0.1, 0.875), (0.2, 0.875)], "ppo": [(0.3, 0.875)], "base": [(0.0, base_gold)]}
    coords = _point_coordinates(frontier_svg(points))
    assert [y for _, y in coords] == [196.0] * 4
    # x is not: KL 0-0.3 padded by 5% of its span, [-0.015, 0.315] over the 448 px plot from x = 62.
    expected_x = [62 + 448 * (kl + 0.015) / 0.33 for kl in (0.1, 0.2, 0.3, 0.0)]
    assert [x for x, _ in coords] == pytest.approx(expected_x, abs=0.051)  # the SVG rounds to 0.1 px


def test_frontier_with_every_kl_zero_centres_the_points_on_both_axes():
    """Both ranges degenerate (every run still at the base: KL 0, gold 2.0): every point at the plot's centre,
    x = 62 + 448 / 2 = 286, y = 36 + 320 / 2 = 196."""
    from alignkit.reporting.frontier import frontier_svg

    coords = _point_coordinates(frontier_svg({"sft": [(0.0, 2.0), (0.0, 2.0)], "base": [(0.0, 2.0)]}))
    assert coords == [(286.0, 196.0)] * 3


def test_an_existing_folder_alignkit_did_not_make_is_refused_and_left_untouched(tiny_model_dir, tmp_path, capsys):
    """compare writes only into a new or empty folder, or one a compare made (resumed): a folder of the user's
    is refused, naming what it holds, before anything is written into it."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n", encoding="utf-8")
    settings = [f"model={tiny_model_dir}", f"pairs={pairs}", "gold=_ppo_rewards:length", "methods=[dpo]"]
    assert main(["compare", *settings, f"output_dir={out}", "quick=true"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is not empty and is not an alignkit compare run folder" in err and "notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my notes\n"


def test_build_pairs_samples_the_base_on_training_prompts_only_and_is_reused(tiny_model_dir, tmp_path, capsys):
    """build_pairs=N: compare samples the base on its training prompts (never on the held-out ones it evaluates
    on), pairs best against worst by the reward, trains on those pairs, and a rerun reuses the file."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about topic {i}"}) + "\n" for i in range(12)))
    out = tmp_path / "cmp"
    args = [
        "compare", f"model={tiny_model_dir}", f"output_dir={out}", f"prompts={prompts}", "build_pairs=3",
        "gold=_ppo_rewards:length", "methods=[dpo]", "seeds=[0]", "quick=true", "progress=false",
    ]  # fmt: skip
    assert main(args) == 0
    built = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    held_out = {json.loads(x)["prompt"] for x in (out / "prompts-heldout.jsonl").read_text().splitlines()}
    assert len(held_out) == 3 and built
    # Pairs of the 9 training prompts only, each chosen reply scored above its rejected one by the reward.
    assert {b["prompt"] for b in built} <= {f"tell me about topic {i}" for i in range(12)} - held_out
    from _ppo_rewards import length

    assert all(length(b["prompt"], b["chosen"]) > length(b["prompt"], b["rejected"]) for b in built)
    trained = [json.loads(x) for x in (out / "pairs-train.jsonl").read_text().splitlines()]
    assert len(trained) + len((out / "pairs-heldout.jsonl").read_text().splitlines()) == len(built)
    result = json.loads((out / "compare.json").read_text())
    assert result["pairs"] == "pairs.jsonl" and result["trained_now"] == ["dpo-seed0"]
    assert "sampling 2 responses per training prompt" in capsys.readouterr().err  # quick: 2 samples
    mtime = (out / "pairs.jsonl").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "pairs.jsonl").stat().st_mtime_ns == mtime
    assert "sampling" not in capsys.readouterr().err
    # Other sampling settings on the same folder would train on pairs they did not ask for: refused.
    assert main([*args, "build_temperature=0.5"]) == 2
    assert "was built with {'n_samples': 2, 'temperature': 1.0" in capsys.readouterr().err


def test_pairs_and_build_pairs_together_are_refused():
    with pytest.raises(ConfigError, match="'pairs' and 'build_pairs'"):
        load_config(CompareConfig, None, ["gold=x:y", "pairs=p.jsonl", "build_pairs=4"])


def _hh_row(i: int, bad: bool = False) -> dict:
    """An HH-RLHF-style row: two whole transcripts sharing the conversation before the compared reply."""
    prompt = f"\n\nHuman: question number {i}?"
    return {"chosen": prompt + "\n\nAssistant: " + ("" if bad else f"kind answer {i}."),
            "rejected": prompt + f"\n\nAssistant: rude answer {i}."}  # fmt: skip


def test_a_fixed_split_of_one_hh_file_gives_the_train_and_held_out_rows_asked_for(tmp_path):
    """pairs_rows / heldout_pairs(_rows) / prompts_rows / heldout_prompts(_rows): the HH-RLHF comparison's fixed
    split, rows start <= row < stop of one transcript file, a bad row skipped and counted."""
    from alignkit.pipelines.compare import split_data

    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps(_hh_row(i, bad=i == 2)) + "\n" for i in range(10)))
    cfg = load_config(
        CompareConfig, None, [], gold="x:y", pairs=str(hh), pairs_rows=[0, 6], heldout_pairs=str(hh),
        heldout_pairs_rows=[6, 10], prompts=str(hh), prompts_rows=[0, 6], heldout_prompts=str(hh),
        heldout_prompts_rows=[6, 10], on_bad_row="skip",
    )  # fmt: skip
    root = tmp_path / "c"
    root.mkdir()
    out = split_data(cfg, root, "unused")

    def read(key):
        return [json.loads(x) for x in out[key].read_text().splitlines()]

    def numbers(rows):
        return [int(r["prompt"][0]["content"].split()[-1].rstrip("?")) for r in rows]

    assert numbers(read("pairs")) == [0, 1, 3, 4, 5]  # row 2 has an empty reply: skipped
    assert numbers(read("heldout_pairs")) == [6, 7, 8, 9]
    assert read("pairs")[0]["chosen"] == "kind answer 0." and read("pairs")[0]["rejected"] == "rude answer 0."
    assert numbers(read("prompts")) == [0, 1, 3, 4, 5] and numbers(read("heldout_prompts")) == [6, 7, 8, 9]
    assert set(read("prompts")[0]) == {"prompt"}  # the pair's replies do not travel with its prompt
    assert [r["completion"] for r in read("demonstrations")] == [f"kind answer {i}." for i in (0, 1, 3, 4, 5)]
    data = json.loads((root / "data.json").read_text())
    assert data["rows"]["pairs"] == 5 and data["rows"]["heldout_prompts"] == 4
    assert data["skipped_rows"] == {"prompts": 1, "heldout_prompts": 0, "pairs": 1, "heldout_pairs": 0}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["pairs_rows=[0,10]"], "'pairs_rows': rows of which file? set 'pairs' too"),
        (["heldout_pairs=h.jsonl"], "'heldout_pairs': give the training pairs too"),
        (["pairs=p.jsonl", "pairs_rows=[5,5]"], "'pairs_rows' must be [start, stop] with start < stop"),
        (["heldout_prompts_rows=[0,4]"], "set 'heldout_prompts' too"),
    ],
)
def test_fixed_split_mistakes_are_config_errors(settings, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")
    ):
        load_config(CompareConfig, None, ["gold=x:y", *settings])


@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "kto", "orpo", "online_dpo", "ppo", "grpo"])
def test_length_limits_reach_every_method_s_stage(method, tmp_path):
    """max_length (offline) and max_prompt_length (online) are keys each method's own stage reads."""
    from alignkit.pipelines.compare import stage_settings
    from alignkit.pipelines.methods import METHODS
    from alignkit.stages import load_stage

    cfg = load_config(CompareConfig, None, ["gold=x:y", "max_length=300", "max_prompt_length=200"])
    data = {k: tmp_path / f"{k}.jsonl" for k in ("prompts", "pairs", "heldout_pairs", "demonstrations")}
    settings = stage_settings(cfg, method, 0, "m", data, tmp_path / "run")
    stage_cfg = load_config(load_stage(METHODS[method].stage).config, None, [], **settings)
    if METHODS[method].online:
        assert stage_cfg.max_prompt_length == 200 and "max_length" not in settings
    else:
        assert stage_cfg.max_length == 300 and "max_prompt_length" not in settings


def test_sft_in_a_comparison_skips_the_held_in_loss(tmp_path):
    """The table reads no held-in loss, so compare's sft does not pay for its two passes over the training set
    (and no other method is given the key)."""
    from alignkit.pipelines.compare import stage_settings
    from alignkit.stages import load_stage

    cfg = load_config(CompareConfig, None, ["gold=x:y"])
    data = {k: tmp_path / f"{k}.jsonl" for k in ("prompts", "pairs", "heldout_pairs", "demonstrations")}
    settings = stage_settings(cfg, "sft", 0, "m", data, tmp_path / "run")
    assert load_config(load_stage("sft").config, None, [], **settings).measure_train_loss is False
    assert "measure_train_loss" not in stage_settings(cfg, "dpo", 0, "m", data, tmp_path / "run")
