#!/usr/bin/env bash
# Every GPU check in one run, meant to finish within 8 minutes on one H100/H200 (a session that
# is lent a GPU gets 15 minutes of it in all: run this once, read the figures, give it back).
# The step limits add up to 8 minutes.
#
#   bash bench/gpu_check.sh             # in the project folder, after `make setup`
#   GPU_CHECK_CPU=1 bash bench/gpu_check.sh   # the same steps at CPU sizes (a dry run without a GPU)
#
# Each step has its own time limit, so one slow step cannot take the others' time; a step that
# fails or runs out is reported and the next one runs. The exit code is the number of steps that
# failed. Steps:
#   1. the machine: GPU, driver, torch and its CUDA build
#   2. the shared training loop at GPT-2 small (124M) on random tokens: fp32, bf16 autocast,
#      bf16 + torch.compile: tokens/s, MFU and the ratios against fp32 measured in the same run
#      (bench/train_throughput.py); also checks the flash SDPA kernel and KV-cache greedy decoding
#   3. PPO iterations at GPT-2 small, fp32 against bf16: seconds per iteration and generated
#      tokens/s (bench/ppo_throughput.py)
#   4. DPO steps at GPT-2 small, fp32 against bf16: seconds per step, pairs/s
#      (bench/dpo_throughput.py)
#   5. decoding at GPT-2 small: the growing-cache loop before against the static decode step,
#      plain and compiled with CUDA graphs: tokens/s, ratios, same greedy tokens
#      (bench/decode_throughput.py)
#   6. the tests that need CUDA (tests/test_training.py: the loop with bf16 + compile, generation
#      and checkpoints on the GPU)
# Not here: DDP, FSDP and RL over several GPUs (the lent machine has one; NCCL refuses two ranks
# on one GPU): tests/test_distributed.py, test_training.py and test_alignment.py check the same
# code on gloo processes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
failed=0
t_all=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, print its wall time and status
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo
    echo "=== $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then echo "=== $name: ok in ${dt}s"
    elif (( rc == 124 )); then echo "=== $name: OUT OF TIME after ${dt}s"; failed=$((failed + 1))
    else echo "=== $name: FAILED (exit $rc) after ${dt}s"; failed=$((failed + 1)); fi
}

if [[ "${GPU_CHECK_CPU:-0}" == 1 ]]; then
    preset=cpu-tiny; train_steps=4; ppo_iters=2; new_tokens=16; dpo_steps=2
else
    preset=gpt2-small; train_steps=30; ppo_iters=3; new_tokens=128; dpo_steps=6
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: no CUDA device visible to torch ($PY); GPU_CHECK_CPU=1 runs the CPU dry run" >&2
        exit 2
    fi
fi

step "1. machine" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'no nvidia-smi'; \
    '$PY' -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"devices\", torch.cuda.device_count())'"
step "2. training throughput ($preset)" 150 "$PY" bench/train_throughput.py --preset "$preset" --steps "$train_steps"
step "3. PPO throughput ($preset)" 90 "$PY" bench/ppo_throughput.py --preset "$preset" --iters "$ppo_iters" --new-tokens "$new_tokens"
step "4. DPO throughput ($preset)" 30 "$PY" bench/dpo_throughput.py --preset "$preset" --steps "$dpo_steps" --pairs 16 \
    --completion-tokens "$new_tokens"
step "5. decoding ($preset)" 90 "$PY" bench/decode_throughput.py --preset "$preset" --batch 32 --new-tokens "$new_tokens" --repeats 3
if [[ "${GPU_CHECK_CPU:-0}" == 1 ]]; then
    echo; echo "=== 6. CUDA tests: skipped (CPU dry run)"
else
    step "6. CUDA tests" 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_training.py -k cuda
fi
echo
echo "gpu_check: $failed step(s) failed, $(( $(date +%s) - t_all ))s in all"
exit "$failed"
