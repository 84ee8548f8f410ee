#!/usr/bin/env bash
# GPU readiness on a machine with one NVIDIA GPU, in under 10 minutes (each part has its own time limit):
#   1. the suite's GPU-marked tests (`pytest -m gpu`) and the precision tests, on CUDA;
#   2. one SmolLM2 DPO run in bf16 mixed precision (alignkit's default on a bf16 GPU): tokens/s and MFU;
#   3. FSDP in 1 process (accelerate launch, configs/accelerate/fsdp.yaml): SFT, then PPO with its value head;
#   4. the vLLM backend (a PPO iteration with generation_backend=vllm), if vllm is installed.
# Usage: bash benchmarks/gpu_check.sh            (PYTHON=/path/to/python to use another interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DATA="${DATA:-$ROOT/../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}"
[ -f "$DATA" ] || DATA="$ROOT/shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="$(mktemp -d -t alignkit-gpu-check-XXXX)"
trap 'rm -rf "$OUT"' EXIT
cd "$ROOT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch; nothing to check" >&2
    exit 1
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, remember a failure
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    if timeout "$limit" "$@"; then
        echo "gpu_check: [ok]   $name ($((SECONDS - started)) s)"
    else
        echo "gpu_check: [FAIL] $name (exit $?, $((SECONDS - started)) s)"
        status=1
    fi
}

# 1. GPU-marked tests, and the precision tests (bf16 mixed, FSDP in bf16, generation) now on CUDA.
step "pytest -m gpu + tests/test_precision.py" 180 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_precision.py -m "gpu or not gpu" -x

# 2. SmolLM2 DPO in bf16 mixed precision: tokens/s and MFU.
step "SmolLM2 DPO, bf16 mixed: tokens/s and MFU" 180 \
    "$PY" benchmarks/gpu_dpo_mfu.py --steps 30 --data "$DATA"

# 3. FSDP in 1 process: SFT (the shared loop) and PPO (fp32 value head beside the policy, bf16 autocast).
FSDP=(-m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1)
step "FSDP 1 process: sft" 90 \
    "$PY" "${FSDP[@]}" -m alignkit sft configs/sft_demo.yaml max_steps=3 eval_data=null lora=false \
    output_dir="$OUT/fsdp-sft" progress=false tensorboard=false
step "FSDP 1 process: ppo (value head)" 120 \
    "$PY" "${FSDP[@]}" -m alignkit ppo configs/ppo_length_hack.yaml iterations=1 lora=false \
    prompts_per_iteration=8 minibatch_size=4 micro_batch_size=2 max_new_tokens=16 \
    output_dir="$OUT/fsdp-ppo" progress=false tensorboard=false

# 4. vLLM, if installed: one PPO iteration sampling with the engine.
if "$PY" -c "import vllm" 2>/dev/null; then
    step "vLLM backend: ppo" 120 \
        "$PY" -m alignkit ppo configs/ppo_length_hack.yaml iterations=1 generation_backend=vllm \
        prompts_per_iteration=8 minibatch_size=4 max_new_tokens=16 \
        output_dir="$OUT/vllm-ppo" progress=false tensorboard=false
else
    echo "gpu_check: [skip] vLLM backend (vllm not installed: pip install 'alignkit[vllm]')"
fi
exit $status
