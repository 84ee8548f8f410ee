"""push_to_hub through huggingface_hub against a fake hub on loopback (tests/_fake_hub.py): a successful upload
of final/ with its model card, and a hub that refuses the commit."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from _fake_hub import FakeHub  # noqa: E402
from _serving import serving  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402

from alignkit.cli import main  # noqa: E402

ROWS = [
    {"prompt": "what is the capital of france?", "completion": "the capital of france is paris."},
    {"prompt": "please write a short poem about the sea", "completion": "the sea and the sky are blue."},
]


@pytest.fixture
def sft_args(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return [
        "sft",
        f"model={tiny_model_dir}",
        f"train_data={data}",
        f"output_dir={tmp_path / 'run'}",
        "batch_size=2",
        "max_steps=2",
        "progress=false",
        "report_to=none",
        "push_to_hub=true",
        "hub_model_id=me/tiny",
    ]


@pytest.fixture
def hub_env(monkeypatch):
    """HF_TOKEN set to a dummy (the fake hub wants a bearer token, as the real one does); HF_ENDPOINT is set
    once the hub serves."""
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return monkeypatch


def test_push_to_hub_uploads_final_with_its_card(sft_args, tiny_model_dir, tmp_path, hub_env, capsys):
    """One commit on main holds every file of final/ byte for byte; README.md is the model card; summary.json
    and the printed summary say where it went."""
    hub = FakeHub(tmp_path / "hub")
    with serving(hub.app()) as url:
        hub_env.setenv("HF_ENDPOINT", url)
        assert main(sft_args) == 0
    final = tmp_path / "run" / "final"
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(local)
    assert hub.files("me/tiny") == local
    assert hub.repos == {"me/tiny": "public"}
    [commit] = hub.commits
    assert (commit.branch, commit.summary, commit.files) == ("main", "alignkit: upload final/", sorted(local))

    # The hub validated the header (a local base model is named in the text, not as base_model: it would refuse
    # that); the card says what it was trained from, how, and with which settings.
    card = ModelCard(hub.files("me/tiny")["README.md"].decode())
    assert card.data.base_model is None and f"(sft) from `{tiny_model_dir}`" in card.text
    assert card.data.library_name == "alignkit" and set(card.data.tags) == {"alignkit", "sft"}
    assert "## Training configuration" in card.text and "hub_model_id: me/tiny" in card.text

    pushed = {
        "repo_id": "me/tiny",
        "repo_url": f"{url}/me/tiny",
        "commit_url": f"{url}/me/tiny/commit/{commit.oid}",
        "commit": commit.oid,
    }
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["pushed_to"] == pushed
    out, err = capsys.readouterr()
    assert json.loads(out)["pushed_to"] == pushed
    assert f"pushed final/ to {pushed['commit_url']}" in err


@pytest.mark.parametrize("status", [401, 403, 500])
def test_a_refused_commit_is_one_error_line_and_final_stays(sft_args, tmp_path, hub_env, capsys, status):
    """The repo check before training passes; the commit after it is refused: exit 2, one `error:` line, no
    traceback, final/ and its card kept locally, nothing on the hub. huggingface_hub retries a 500 five times
    (the fake hub's Retry-After: 0 makes each wait one second) and a 401/403 not at all."""
    hub = FakeHub(tmp_path / "hub", fail_commit=status)
    with serving(hub.app()) as url:
        hub_env.setenv("HF_ENDPOINT", url)
        assert main(sft_args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "Traceback" not in err
    assert errors[0].startswith(f"error: push_to_hub: cannot upload final/ to 'me/tiny' at {url} (")
    assert f"{status}" in errors[0] and "the fake hub refuses this commit" in errors[0]  # the hub's reason
    final = tmp_path / "run" / "final"
    assert errors[0].endswith(f"the trained model is kept in {final}: upload it with `hf upload me/tiny {final}`")
    assert hub.commit_attempts == (6 if status == 500 else 1)
    assert hub.repos == {"me/tiny": "public"} and hub.commits == [] and not (tmp_path / "hub").exists()
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()
    assert "pushed_to" not in json.loads((tmp_path / "run" / "summary.json").read_text())
