"""One rank of tests/test_distributed.py's FSDP load check, launched by `accelerate launch` with
configs/accelerate/fsdp.yaml: load a model as the stages do under FSDP, shard it, and write what this rank held
before sharding and whether the sharded model is the model on disk.

Usage: accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/_fsdp_load_worker.py
MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alignkit.models.loading import load_model, pick_device
from alignkit.training import distributed


def main(model_dir: str, out_dir: str) -> None:
    torch.manual_seed(0)
    rank = distributed.accelerator().process_index
    model = load_model(model_dir, "float32", device=pick_device(), load_on=distributed.load_on())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    n_meta = sum(p.device.type == "meta" for p in model.parameters())
    distributed.shard(model)

    plain = load_model(model_dir, "float32", device="cpu")  # the model on disk, whole, in this process
    differences = {
        name: (p.full_tensor() - dict(plain.named_parameters())[name]).abs().max().item()
        for name, p in model.named_parameters()
    }
    plain_buffers = dict(plain.named_buffers())
    buffer_differences = {
        name: (b - plain_buffers[name]).abs().max().item() for name, b in model.named_buffers()
    }
    ids = torch.randint(0, plain.config.vocab_size, (2, 7))
    with torch.no_grad():
        logits_difference = (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()
    distributed.reshard(model)
    # Generation inside whole_weights: each rank runs its own number of forwards (no collective in them), and
    # samples what the whole model samples; afterwards the shards run a collective forward again.
    prompt = torch.randint(0, plain.config.vocab_size, (1, 5))
    n_new = 3 + 4 * rank
    with distributed.whole_weights(model), torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    expected = plain.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    with torch.no_grad():
        after = (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()
    distributed.reshard(model)
    result = {
        "generated_as_whole_model": generated.tolist() == expected.tolist(),
        "new_tokens": generated.shape[1] - prompt.shape[1],
        "logits_difference_after_generation": after,
        "load_on": distributed.load_on(),
        "weight_bytes_before_shard": weight_bytes,
        "meta_parameters_before_shard": n_meta,
        "parameters": sum(1 for _ in model.parameters()),
        "max_weight_difference": max(differences.values()),
        "max_buffer_difference": max(buffer_differences.values(), default=0.0),
        "n_buffers": len(buffer_differences),
        "logits_difference": logits_difference,
        "rank_share": distributed.local_fraction(model),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
