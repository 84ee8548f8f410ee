"""A stand-in for a vLLM engine where vllm cannot run (no GPU, not installed): a plain transformers model built
from the model directory, as vLLM builds its engine, that takes new weights through the real
``VLLMSampler.update_weights`` and ``WeightLoader`` and samples with transformers' generate."""

from __future__ import annotations

from types import SimpleNamespace

from alignkit.models.generation import generate
from alignkit.models.loading import load_model
from alignkit.models.vllm_engine import VLLMSampler, WeightLoader


class FakeLLM:
    """vLLM's ``LLM`` as ``VLLMSampler`` uses it for weights: ``collective_rpc`` runs a ``WeightLoader``
    method on the worker, whose model's ``load_weights`` here loads Hugging Face names strictly (every name
    of the plain model, no other), then records the call."""

    def __init__(self, model):
        self.model = model
        self.worker = WeightLoader()
        self.worker.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.calls: list[tuple[str, tuple]] = []

    def _load_weights(self, weights):
        self.model.load_state_dict(dict(weights), strict=True)

    def collective_rpc(self, method: str, args: tuple = ()):
        getattr(self.worker, method)(*args)
        self.calls.append((method, args))


class FakeVLLMSampler(VLLMSampler):
    """Built as ``generation.vllm_sampler(cfg, tokenizer, device)`` builds the real one; every engine built is
    kept in ``FakeVLLMSampler.built``."""

    built: list[FakeVLLMSampler] = []

    def __init__(self, cfg, tokenizer, device):
        self.tokenizer = tokenizer
        self.batch_size = cfg.generation_batch_size
        self.llm = FakeLLM(load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, device=device).eval())
        FakeVLLMSampler.built.append(self)

    def __call__(self, prompt_ids, sampling):
        return generate(self.llm.model, self.tokenizer, prompt_ids, sampling, self.batch_size, progress=False)
