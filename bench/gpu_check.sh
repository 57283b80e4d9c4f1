#!/usr/bin/env bash
# The GPU checks still owed (speed targets, DeepSpeed and 8-bit on CUDA), as one device call of about
# 8 minutes on an H100. Nothing here has run on a GPU yet: it is prepared so that a session lent one spends
# its device time measuring, not writing. On this machine, once:
#     ../shared/gpu/fetch-wheels.sh          # the wheels the GPU machine lacks, into .whl (git-ignored)
# then the device tool's run with carry [".whl"], timeout_s 590 and the command:
#     bash bench/gpu_check.sh
# Each step has its own time limit, so one that fails or hangs leaves the others' results. Everything lands
# in $OUT (bench/results/gpu here): one log per step, and the benchmarks' JSON.
#   rollout     llmrl's loop (plain, static cache, compiled) vs generate: GPT-2 124M, bf16, batch 256,
#               128 new tokens; target >= 10x generate; tokens checked against generate's.
#   iteration   whole RLOO iterations, llmrl vs TRL's RLOOTrainer, GPT-2 124M, same settings; target >= 1.5x.
#   memory      peak GPU memory and step time, GPT-2 124M: one process, ZeRO-2, ZeRO-3 x bf16/8-bit
#               (bitsandbytes + ZeRO-3 is refused at start-up by design).
# Not here: the vLLM engine (vllm, hundreds of MB, does not fit the 64 MiB that can travel to the machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels: run ../shared/gpu/fetch-wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft, trl, deepspeed, bitsandbytes as b; print(torch.__version__, \
transformers.__version__, peft.__version__, trl.__version__, deepspeed.__version__, b.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: its output to $OUT/NAME.log, the end of it to the console
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc $? after $((SECONDS - t0))s" | tee -a "$OUT/$name.log"
  grep -E '^\|' "$OUT/$name.log" | tail -20
}

step rollout 170 python3 bench/rollout.py --models gpt2 --batch 256 --new-tokens 128 --dtype bfloat16 --compile \
  --repeats 2 --out "$OUT/rollout_cuda.json"
step iteration 170 python3 bench/ppo_iteration.py --model-kind gpt2 --rollout 256 --micro 32 --new-tokens 128 \
  --dtype bfloat16 --iterations 2 --rounds 1 --out "$OUT/ppo_iteration_cuda.json"
step memory 150 python3 bench/memory.py --models gpt2 --ranks 1 --stages single zero2 zero3 --quantization none 8bit \
  --out "$OUT/memory_cuda.json"
