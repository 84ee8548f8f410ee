"""The value model of PPO: a scalar head on a causal LM's final hidden states, V(s_t) at every position.

Its backbone is either its own copy of the policy (full fine-tuning) or a second LoRA adapter on the
policy's frozen base (``add_value_adapter``), so policy, reference and value share one set of base weights.
"""

from __future__ import annotations

import contextlib
import copy
from contextlib import contextmanager

import torch
from torch import nn

from alignkit.models.precision import without_autocast

VALUE_ADAPTER = "value"


def _transformer(model):
    """The transformers model under a PEFT wrapper; the LoRA layers injected into it stay active."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ValueModel(nn.Module):
    """V(s_t): a linear head from the backbone's last hidden state to one number per position.

    ``backbone`` is a causal LM (its LM head is never run) or a PEFT model; with ``adapter`` set, the
    backbone's LoRA adapter of that name is the active one while the value model runs, and the
    previously active adapter (the policy's) is restored afterwards.
    """

    def __init__(self, backbone: nn.Module, adapter: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        hidden_size = _transformer(backbone).config.hidden_size
        # Zero-initialised and in float32: V = 0 everywhere at the start, so the first advantages are the
        # plain reward-to-go, and the head's small regression problem keeps full precision under bf16 backbones.
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values at every position: (B, T) input_ids and attention_mask -> (B, T) float32."""
        with use_adapter(self.backbone, self.adapter):
            hidden = (
                _transformer(self.backbone)
                .get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                .last_hidden_state
            )  # (B, T, H)
        # A copy, not a view of the head's (B, T, 1) output: FSDP warns about a module that returns a view. The
        # head in fp32 outside autocast: in mixed precision the backbone's matmuls run in bf16, the values not.
        with without_autocast(hidden.device.type):
            return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).clone()  # (B, T)


@contextmanager
def keep_trainable(model: nn.Module):
    """Whatever is trainable when the block starts is trainable again when it ends.

    PEFT's ``set_adapter`` and ``disable_adapter`` re-freeze every adapter but the active one; here the
    policy's and the value's adapters are both trained (and checkpointed, which saves what requires grad).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """Make LoRA adapter ``name`` of the PEFT ``model`` the active one inside the block (None: no change)."""
    if name is None or model.active_adapter == name:
        yield
        return
    previous = model.active_adapter
    with keep_trainable(model):
        model.set_adapter(name)
        try:
            yield
        finally:
            model.set_adapter(previous)


def recompute_with_active_adapter(model: nn.Module):
    """torch's checkpoint ``context_fn`` for a PEFT ``model`` with several adapters: called in each checkpointed
    forward, it notes the adapter active there, and the backward's recomputation of that layer runs with the
    same one (PPO's value model switches to its adapter only inside its own forward, and the backward comes
    after). Returns (forward context, recomputation context)."""
    return contextlib.nullcontext(), use_adapter(model, model.active_adapter)


def add_value_adapter(policy: nn.Module) -> ValueModel:
    """A value model on the LoRA ``policy``'s own frozen base: a second adapter (same settings as the
    policy's, B = 0 so it starts as the base model) plus a value head. Both adapters are left trainable."""
    config = copy.deepcopy(policy.peft_config[policy.active_adapter])
    with keep_trainable(policy):
        policy.add_adapter(VALUE_ADAPTER, config)
    for name, p in policy.named_parameters():
        if f".{VALUE_ADAPTER}." in name:
            p.requires_grad_(True)
    return ValueModel(policy, adapter=VALUE_ADAPTER)


def remove_value_adapter(policy: nn.Module) -> None:
    """Drop the value adapter from the policy (before saving the policy alone as the final model)."""
    if VALUE_ADAPTER in policy.peft_config:
        policy.delete_adapter(VALUE_ADAPTER)
