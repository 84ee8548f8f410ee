"""`alignkit sft` end to end on a tiny model: the run-folder contract, the loss on completion tokens only,
and a final model that loads and generates in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.data.collate import collate_sft
from alignkit.data.tokenize import encode
from alignkit.models.loading import load_final
from alignkit.stages.sft import sft_step

ROWS = [
    {"prompt": "what is the capital of france?", "completion": "the capital of france is paris."},
    {"prompt": "please write a short poem about the sea", "completion": "the sea and the sky are blue."},
    {
        "messages": [
            {"role": "user", "content": "the quick brown fox"},
            {"role": "assistant", "content": "jumps."},
        ]
    },
    {"prompt": "i need help", "completion": "here is a helpful and harmless answer."},
] * 4


@pytest.fixture
def sft_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _run(args: list[str]) -> int:
    return main(["sft", *args, "progress=false", "tensorboard=false"])


def test_sft_run_folder_and_loss_goes_down(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "run"
    code = _run(
        [
            f"model={tiny_model_dir}",
            f"train_data={sft_data}",
            f"eval_data={sft_data}",
            "eval_rows=[0,4]",
            f"output_dir={out}",
            "learning_rate=2e-2",
            "lr_scheduler=constant",
            "batch_size=4",
            "micro_batch_size=2",
            "epochs=3",
            "eval_every=6",
            "save_every=6",
        ]
    )
    assert code == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 2e-2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))  # 16 rows / 4 = 4 steps x 3 epochs
    assert any("eval/loss" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["train_examples"] == 16
    # a learning rate this high on a 16-row set must fit it: the held-in loss drops by a lot
    assert summary["train_loss_after"] < 0.7 * summary["train_loss_before"]
    assert (out / "checkpoints").is_dir() and (out / "final" / "model.safetensors").is_file()

    # The final model loads with plain transformers in a fresh process and generates.
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"p = {str(out / 'final')!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(p); t = AutoTokenizer.from_pretrained(p)\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'i need help'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "print(len(out[0]) - len(ids[0]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


def test_sft_lora_adapter_only_final(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "lora"
    assert (
        _run(
            [
                f"model={tiny_model_dir}",
                f"train_data={sft_data}",
                f"output_dir={out}",
                "lora=true",
                "lora_r=4",
                "merge_lora=false",
                "learning_rate=1e-2",
                "max_steps=3",
                "batch_size=4",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters"] < summary["total_parameters"] / 5
    model = load_final(str(out / "final"))
    assert hasattr(model, "disable_adapter")  # an adapter on its recorded base


def test_sft_loss_covers_completion_tokens_only(tiny_tokenizer, tiny_model_dir):
    """The SFT loss is -sum log p(completion token) over completion positions only: recompute it from full
    logits with an explicit mask, and check that also counting prompt tokens would give another number."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = [encode(tiny_tokenizer, "what is the capital of france?", "paris.", max_length=64)]
    batch = collate_sft(enc, tiny_tokenizer.pad_token_id)
    out = sft_step(model, batch, chunk_size=4)
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    logp = torch.log_softmax(logits, -1).gather(1, batch["input_ids"][0, 1:, None]).squeeze(1)
    n_prompt = len(enc[0].prompt_ids)
    completion_nll = -logp[n_prompt - 1 :].sum()  # token t is predicted at t - 1
    assert batch["n_items"] == len(enc[0].completion_ids)
    torch.testing.assert_close(out.loss_sum, completion_nll, atol=1e-5, rtol=1e-5)
    assert abs(out.loss_sum.item() - (-logp.sum().item())) > 1.0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_weights(
    tiny_model_dir, sft_data, tmp_path, mlp_calls, lora
):
    """gradient_checkpointing=true: each decoder layer runs again in the backward (its MLP's forwards counted),
    and 3 steps end at the weights of a run without it (atol 1e-6). With LoRA too (non-reentrant checkpointing
    needs no input that requires grad)."""
    calls = mlp_calls
    extra = ["lora=true", "lora_r=4"] if lora else []
    weights, n_calls = {}, {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        args = [f"model={tiny_model_dir}", f"train_data={sft_data}", f"output_dir={out}", "max_steps=3"]
        args += ["batch_size=4", "learning_rate=1e-2", "measure_train_loss=false", *extra]
        calls["n"] = 0
        assert _run([*args, f"gradient_checkpointing={checkpointing}"]) == 0
        n_calls[checkpointing] = calls["n"]
        weights[checkpointing] = load_final(str(out / "final")).state_dict()
    # 3 steps x 2 micro-batches x 2 layers forwards, each recomputed once in the backward.
    assert n_calls["true"] - n_calls["false"] == 3 * 2 * 2
    for name, tensor in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], tensor, atol=1e-6, rtol=0, msg=name)
    moved = load_final(str(tiny_model_dir)) if not lora else None
    if moved is not None:
        assert max((weights["false"][k] - v).abs().max().item() for k, v in moved.state_dict().items()) > 1e-4
