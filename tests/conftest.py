"""Shared fixtures: a tiny tokenizer and model built from a config in seconds, saved as a local model dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
CAI_DIR = SHARED_DATA / "constitutional-ai"

# A ChatML-style template of our own, like the embedded SmolLM2's, so chat formatting is exercised.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "please write a short poem about the sea and the sky",
    "i am sorry, but i cannot help with that request.",
    "here is a helpful and harmless answer to your question",
    "user assistant system human",
    "0 1 2 3 4 5 6 7 8 9 + - = ? ! . , : ; ' \"",
] * 20


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local model directory (safetensors + tokenizer with chat template) of a 2-layer Llama."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model(len(tiny_tokenizer))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _gpu_only(request):
    """Tests marked `gpu` need CUDA: skipped where there is none (benchmarks/gpu_check.sh runs them)."""
    if "gpu" in request.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _keep_threads():
    """A stage run with num_threads=N sets torch's threads for the whole process: give the next test the
    count this one started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    """Tiny-model tests write caches (reference log-probs) to a temporary folder, not the user's; tests
    marked `smollm` keep the real cache so the embedded model is prepared once."""
    if "smollm" not in request.keywords:
        monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path_factory.getbasetemp() / "alignkit-cache"))


@pytest.fixture
def mlp_calls(monkeypatch) -> dict:
    """Counts the forwards of every Llama MLP (the tiny model's layers) in ``["n"]``: a layer recomputed in the
    backward (gradient checkpointing) runs its MLP again."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = {"n": 0}
    forward = LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    return calls


@pytest.fixture
def db_url() -> str | None:
    """The label database of the labeling tests: None, SQLite beside the input; test_label_postgres overrides it
    with a PostgreSQL server's, and runs the same tests."""
    return None
