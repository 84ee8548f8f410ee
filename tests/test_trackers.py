"""report_to=: TensorBoard, W&B, MLflow and Trackio get a run's config, every step's metrics, its monitor events
and its held-out and eval tables, through their real clients in offline modes (a W&B offline run, an MLflow
file store, Trackio's local SQLite store), read back from what each wrote. The network is refused throughout:
a client that tried to reach it fails the test."""

from __future__ import annotations

import glob
import json
import socket
import sqlite3
import struct

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.reporting import trackers
from alignkit.stages.sft import SFTConfig

ROWS = [
    {"prompt": "what is the capital of france?", "completion": "the capital of france is paris."},
    {"prompt": "please write a short poem about the sea", "completion": "the sea and the sky are blue."},
] * 4


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """Every tracker's store in tmp_path, each client told to stay offline, and any connection beyond this
    machine refused (W&B's client talks to its own wandb-core process over a local socket)."""
    stores = {"wandb": tmp_path / "wandb", "mlflow": tmp_path / "mlruns", "trackio": tmp_path / "trackio"}
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{stores['mlflow']}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRACKIO_DIR", str(stores["trackio"]))
    # Trackio reads TRACKIO_DIR when it is first imported: point the modules that copied it at tmp_path.
    import trackio.sqlite_storage
    import trackio.utils

    for module in (trackio.utils, trackio.sqlite_storage):
        monkeypatch.setattr(module, "TRACKIO_DIR", stores["trackio"])

    tried: list = []
    connect = socket.socket.connect

    def local_only(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError(f"test: network access refused ({address})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    yield stores
    import wandb

    wandb.teardown()  # W&B keeps the settings (WANDB_DIR) it first read for the whole process; the next test's are new
    assert tried == []


def wandb_records(wandb_dir) -> list:
    """Every record of the W&B offline runs under ``wandb_dir``, in order, decoded with W&B's own protobuf
    ``Record``. wandb 0.31 no longer ships a Python reader of its .wandb file, so this reads its framing: a
    7-byte file header, then LevelDB-log records (crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) in
    32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(glob.glob(f"{wandb_dir}/wandb/offline-run-*/run-*.wandb")):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            if room < 7:  # a block's tail too short for a header is padding
                pos += room
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += room
                continue
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def trackio_rows(store, table: str) -> list[tuple]:
    with sqlite3.connect(store / "alignkit.db") as db:
        return list(db.execute(f"select * from {table} order by id"))  # noqa: S608 (a fixed table name)


def _sft(tiny_model_dir, tmp_path, *extra: str) -> int:
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return main([
        "sft", f"model={tiny_model_dir}", f"train_data={data}", f"eval_data={data}", "eval_rows=[0,4]",
        f"output_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=4", "micro_batch_size=4",
        "learning_rate=1e-3", "progress=false", *extra,
    ])  # fmt: skip


# --- configuration ------------------------------------------------------------------------------------------


def test_report_to_reads_lists_comma_strings_none_and_the_old_tensorboard_switch(tmp_path):
    def report_to(*overrides: str, yaml_text: str | None = None) -> list[str]:
        path = None
        if yaml_text is not None:
            path = tmp_path / "c.yaml"
            path.write_text(yaml_text)
        return load_config(SFTConfig, path, ["train_data=x.jsonl", *overrides]).report_to

    assert report_to() == ["tensorboard"]
    assert report_to("report_to=wandb,mlflow") == ["wandb", "mlflow"]
    assert report_to(yaml_text="report_to: [trackio, tensorboard]\n") == ["trackio", "tensorboard"]
    assert report_to("report_to=none") == ["none"]
    assert trackers.selected(["none"]) == [] and trackers.selected(["wandb", "wandb"]) == ["wandb"]
    # The old switch, in either source, is the value of report_to it meant.
    assert report_to("tensorboard=false") == ["none"]
    assert report_to(yaml_text="tensorboard: false\n") == ["none"]
    assert report_to("tensorboard=true") == ["tensorboard"]
    with pytest.raises(ConfigError, match="'none' reports nowhere"):
        report_to("report_to=none,wandb")
    with pytest.raises(ConfigError, match="report_to"):
        report_to("report_to=comet")


def test_a_missing_client_is_a_one_line_error_naming_the_extra_before_anything_is_written(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    find_spec = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a)
    )
    assert _sft(tiny_model_dir, tmp_path, "report_to=tensorboard,mlflow") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [  # the message, then the hint every ConfigError gets
        "error: report_to=mlflow needs the MLflow client (mlflow), which is not installed: "
        "pip install 'alignkit[mlflow]'",
        "(`alignkit sft --help` lists every setting)",
    ]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()


# --- the real clients, read back ----------------------------------------------------------------------------


def test_sft_reports_config_metrics_and_tables_to_every_tracker(tiny_model_dir, tmp_path, offline, capsys):
    """One 2-step SFT run with an eval set, reporting to all four, then `alignkit eval` of its final/: each
    tracker holds the config, the loss of steps 1 and 2 as metrics.jsonl has them, the held-out table from the
    summary, and (the runs continued by eval) the policy's eval table."""
    assert _sft(tiny_model_dir, tmp_path, "report_to=tensorboard,wandb,mlflow,trackio") == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "sft"  # stdout still holds the summary alone
    run = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    assert main([
        "eval", f"model={run / 'final'}", "reference=none", f"prompts={prompts}", "max_new_tokens=3",
        "progress=false",
    ]) == 0  # fmt: skip
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in logged if "loss" in r}
    eval_loss = json.loads((run / "summary.json").read_text())["eval_loss"]
    eval_result = json.loads((run / "eval.json").read_text())
    length = eval_result["policy"]["length_tokens"]["mean"]
    ids = json.loads((run / "trackers.json").read_text())

    # TensorBoard: scalars per step, the config and the tables as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    board.Reload()
    assert {e.step: e.value for e in board.Scalars("loss")} == pytest.approx(loss, rel=1e-6)
    texts = {tag: board.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in board.Tags()["tensors"]}
    assert "learning_rate: 0.001" in texts["config/text_summary"]
    assert f"| eval_loss | {eval_loss:.4g} |" in texts["held_out/text_summary"]
    assert f"| length_tokens | {length:.4g} | - |" in texts["eval/text_summary"]

    # W&B: the offline run's records (two runs of one id: the training run, and eval continuing it).
    records = wandb_records(offline["wandb"].parent)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {ids["wandb"]} and runs[0].display_name == "run"
    assert runs[0].project == "alignkit"
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["learning_rate"] == 1e-3 and config["report_to"] == ["tensorboard", "wandb", "mlflow", "trackio"]
    history = wandb_history(records)
    assert {h["_step"]: h["loss"] for h in history if "loss" in h} == pytest.approx(loss, rel=1e-6)
    tables = {k.split("/")[0]: h for h in history for k in h if k.endswith("/_type")}
    assert tables["held_out"]["held_out/nrows"] >= 1 and tables["eval"]["eval/ncols"] == 3
    files = glob.glob(str(offline["wandb"] / "offline-run-*" / "files" / "media" / "table" / "held_out_*.json"))
    held_out = json.loads(open(files[0]).read())
    assert ["eval_loss", pytest.approx(eval_loss)] in held_out["data"]

    # MLflow: params, metric history, the tables as artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.info.run_name == "run" and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["learning_rate"] == "0.001"
    history = client.get_metric_history(ids["mlflow"], "loss")
    assert {m.step: m.value for m in history} == pytest.approx(loss, rel=1e-6)
    table = client.load_table(mlflow_run.info.experiment_id, "held_out.json", run_ids=[ids["mlflow"]])
    assert dict(zip(table["metric"], table["value"]))["eval_loss"] == pytest.approx(eval_loss)
    table = client.load_table(mlflow_run.info.experiment_id, "eval.json", run_ids=[ids["mlflow"]])
    assert dict(zip(table["metric"], table["policy"]))["length_tokens"] == pytest.approx(length)

    # Trackio: its SQLite store.
    (config,) = [json.loads(c[3]) for c in trackio_rows(offline["trackio"], "configs")]
    assert config["learning_rate"] == 1e-3
    steps = [(row[4], json.loads(row[5])) for row in trackio_rows(offline["trackio"], "metrics")]
    assert {step: m["loss"] for step, m in steps if "loss" in m} == pytest.approx(loss, rel=1e-6)
    tables = {k: v["_value"] for _, m in steps for k, v in m.items() if isinstance(v, dict)}
    assert {r["metric"]: r["value"] for r in tables["held_out"]}["eval_loss"] == pytest.approx(eval_loss)
    assert {r["metric"]: r["policy"] for r in tables["eval"]}["length_tokens"] == pytest.approx(length)


def test_monitor_events_are_alerts_and_tags(tmp_path, offline):
    """A monitor event row, as RunDir.log_metrics gets it from every stage's loop: a W&B alert, a Trackio
    alert, an MLflow tag and a TensorBoard text, each with the event's step and message; a stopping event is
    an error-level alert."""
    from _loop_worker import toy_config

    from alignkit.evaluation.monitors import Event
    from alignkit.training.run import RunDir

    cfg = toy_config(str(tmp_path / "run"), report_to=["tensorboard", "wandb", "mlflow", "trackio"])
    event = Event(3, "kl_spike", "KL 12.5 over 10", "stop", {"kl": 12.5}).to_row()
    with RunDir.create(cfg.output_dir, "toy", None, cfg=cfg) as run:
        run.log_metrics({"step": 3, "loss": 1.25})
        run.log_metrics(event)
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())

    (alert,) = [r.alert for r in wandb_records(tmp_path) if r.WhichOneof("record_type") == "alert"]
    assert (alert.title, alert.text) == ("alignkit: kl_spike", "step 3: KL 12.5 over 10")
    assert alert.level.upper() == "ERROR"

    (row,) = trackio_rows(offline["trackio"], "alerts")
    assert row[4:8] == ("alignkit: kl_spike", "step 3: KL 12.5 over 10", "error", 3)

    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_run(ids["mlflow"]).data.tags
    assert tags["alignkit.event.3.kl_spike"] == "step 3: KL 12.5 over 10"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    board.Reload()
    (text,) = board.Tensors("events/kl_spike/text_summary")
    assert text.step == 3 and text.tensor_proto.string_val[0].decode() == "step 3: KL 12.5 over 10"
