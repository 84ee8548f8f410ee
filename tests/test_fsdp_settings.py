"""``distributed.whole_weights`` hands every FSDP group back with the resharding setting ``distributed.shard``
gave it, set again through torch's public ``set_reshard_after_forward`` (torch has no getter to save it).

The check reads FSDP's private per-group state (``post_forward_mesh_info``, None: the weights stay gathered after
the forward), the only place torch keeps the setting: a torch upgrade that changes it fails here by name, not
as a silently slower or wrong training run. One process, a gloo group of one, on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent

WORKER = r"""
import os, sys, tempfile
import torch, torch.distributed as dist
from conftest import build_tiny_model
from alignkit.training import distributed

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
distributed.engine = lambda: "fsdp"
from torch.distributed.fsdp import FSDPModule

def settings(model):
    # per group (root first): does it keep its gathered weights after the forward? (FSDP's private state)
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return [[g.post_forward_mesh_info is None for g in m._get_fsdp_state()._fsdp_param_groups] for m in groups]

for reshard in ("true", "false"):
    os.environ["FSDP_RESHARD_AFTER_FORWARD"] = reshard
    torch.manual_seed(0)
    model = build_tiny_model(64)
    distributed.shard(model)
    with torch.no_grad():
        before_forward = settings(model)  # the root's default is applied at its first forward
        model(input_ids=torch.randint(0, 64, (1, 5)))
        shard_gave = settings(model)
        with distributed.whole_weights(model):
            inside = settings(model)
        after = settings(model)
    distributed.reshard(model)
    kept_inside = inside == [[True]] * len(inside)
    print(reshard, before_forward[1:] == shard_gave[1:], shard_gave[0], shard_gave[1], kept_inside, after == shard_gave)
"""


def test_whole_weights_restores_the_resharding_that_shard_set():
    """Root: keeps its weights from forward to backward; blocks: reshard after the forward unless
    FSDP_RESHARD_AFTER_FORWARD=false. Inside whole_weights every group keeps them; after, each is as before."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *sys.path])
    probe = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=120, env=env)
    assert probe.returncode == 0, probe.stderr[-3000:]
    lines = [line.split() for line in probe.stdout.splitlines()[-2:]]
    assert lines == [
        ["true", "True", "[True]", "[False]", "True", "True"],
        ["false", "True", "[True]", "[True]", "True", "True"],
    ]
