"""Sampling with vLLM (``generation_backend=vllm``: the optional extra ``pip install 'alignkit[vllm]'``, on a
CUDA GPU). ``VLLMSampler`` returns the same ``Generation`` records as transformers' generate, and for PPO and
online DPO takes the policy's new weights between iterations (a LoRA policy's with its adapter merged in). vllm
itself is imported only when an engine is built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alignkit.models.generation import (
    Generation,
    SamplingConfig,
    check_generation_backend,
    eos_token_ids,
    to_generation,
)
from alignkit.models.loading import plain_weights


class WeightLoader:
    """Added to vLLM's worker class (``worker_extension_cls``), so ``LLM.collective_rpc`` can run
    ``load_policy_weights`` in the process that holds the engine's copy of the model, whichever worker class
    the installed vLLM uses."""

    def load_policy_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # A vLLM model's load_weights takes Hugging Face parameter names and maps them onto its own layout
        # (fused qkv and gate/up projections, a tied head skipped).
        self.model_runner.model.load_weights(weights=weights)


def processed_logprobs() -> dict:
    """The engine argument that makes the returned log-probs those of the distribution sampled from (after
    temperature), as the trainer computes them, as TRL 1.16 sets it; none where the installed vLLM has no such
    argument (older ones: their log-probs are then the engine's default kind)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return {"logprobs_mode": "processed_logprobs"} if "logprobs_mode" in names else {}


def sampled_logprobs(completion) -> list[float] | None:
    """The log-prob of each sampled token of a vLLM ``CompletionOutput`` asked for ``logprobs=0`` (each
    position's dict holds the sampled token); None where the engine returned none."""
    if completion.logprobs is None:
        return None
    return [position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs)]


class VLLMSampler:
    """A vLLM engine on the model directory ``model_path``; called like a ``Sampler``."""

    def __init__(
        self,
        model_path: str,
        tokenizer,
        dtype: torch.dtype,
        gpu_memory_utilization: float,
        seed: int,
        trust_remote_code: bool = False,
    ):
        check_generation_backend("vllm")
        from transformers import GenerationConfig
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(
            model=model_path,
            dtype=str(dtype).removeprefix("torch."),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            # build-prefs samples several responses per prompt: each prompt's KV cache is computed once.
            enable_prefix_caching=True,
            worker_extension_cls=f"{__name__}.WeightLoader",
            **processed_logprobs(),
        )
        has_generation_config = (Path(model_path) / "generation_config.json").is_file()
        generation_config = GenerationConfig.from_pretrained(model_path) if has_generation_config else None
        self.eos_ids = eos_token_ids(generation_config, tokenizer)

    def __call__(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                # A seed per prompt, from the call's: a prompt repeated for several samples draws different
                # responses, and a rerun (a resumed run) draws the same ones.
                seed=int(np.random.SeedSequence([sampling.seed, i]).generate_state(1)[0]) & 0x7FFFFFFF,
                stop_token_ids=self.eos_ids,
                logprobs=0,  # the sampled token's log-prob (GRPO logs the sampler-trainer mismatch)
            )
            for i in range(len(prompt_ids))
        ]
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)  # in input order
        return [
            to_generation(
                ids, list(out.outputs[0].token_ids), self.eos_ids, self.tokenizer, sampled_logprobs(out.outputs[0])
            )
            for ids, out in zip(prompt_ids, outputs)
        ]

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the engine: a transformers model of the engine's architecture
        (e.g. PPO's policy after an update), or a LoRA policy on it, whose active adapter is merged into a copy
        of the weights (``plain_weights``; the model is not changed, other adapters are left out). They travel
        through host memory, one copy per call: simple, and slower than a GPU-to-GPU transfer for large
        models."""
        weights = [(name, tensor.detach().to("cpu")) for name, tensor in plain_weights(model)]
        self.llm.collective_rpc("load_policy_weights", args=(weights,))
