#!/usr/bin/env bash
# The paper-shape GPU check (issue [8]): on ONE CUDA GPU, random weights at the paper's shapes (Wan2.2-TI2V-5B
# backbone + our audio attentions, Wan2.2's VAE layout, 928x704, bf16), in about 6 minutes on an H200:
#   1. the real-time benchmark (streaming student: 3 steps, sink + window KV cache): DiT RTF and first-frame delay
#      per chunk, VAE decode RTF, sequential and pipelined end-to-end RTF, peak memory -- eager, then torch.compile
#   2. one teacher training step (forward + backward, activation checkpointing, bf16 autocast over fp32 weights;
#      on several GPUs one process each, FSDP2): step time, TFLOP/s, MFU, peak memory against `streamavatar plan`
#   3. the Long-Short Visual Memory's per-chunk cost (bench --lsvm-cost, 100 chunks)
#   4. the capacity planner for the GPUs present
# Each step is time-boxed and independent (a failed one is named at the end, exit 1). Everything lands in $OUT
# (default data/reports/gpu_check) as JSON beside the paper's Table 5 numbers (under "paper_table5").
# Usage:  bash scripts/gpu_check.sh  [OUT_DIR]     (GPU_CHECK_STEP_TIMEOUT: seconds per step, default 240)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-data/reports/gpu_check}}
mkdir -p "$OUT"
SA=${STREAMAVATAR:-.venv/bin/streamavatar}
PY=${PYTHON:-.venv/bin/python}
PAPER=(--config configs/paper.yaml --set model.pretrained_path=null --set vae.pretrained_path=null
       --set model.text_encoder_path=null --set audio.features=logmel --set tracking.enabled=false)
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${GPUS}" = "0" ] && [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
  echo "gpu_check: no CUDA GPU visible (GPU_CHECK_ON_CPU=1 runs the same commands on the CPU at tiny shapes)" >&2
  exit 1
fi
if [ -n "${GPU_CHECK_ON_CPU:-}" ]; then  # the code paths, on CPU, at the demo's tiny shapes (what the test runs)
  PAPER=(--set tracking.enabled=false --set project.device=cpu --set vae.pretrained_path=weights/demo_vae.pt)
  CHUNKS=4
  LSVM_CHUNKS=4
  # the compiled run: dynamo's graph capture without inductor's C++ code generation, 2 chunks, no warm-up:
  # the path, not its speed (inductor on 2 CPU cores takes minutes)
  COMPILED=(--set benchmark.compile_backend=aot_eager --set benchmark.chunks=2 --set benchmark.warmup_chunks=0)
else
  CHUNKS=40
  LSVM_CHUNKS=100
  COMPILED=(--set benchmark.compile_backend=inductor --set benchmark.chunks=$CHUNKS)
fi
t0=$(date +%s)
# each step runs on its own, time-boxed (GPU_CHECK_STEP_TIMEOUT seconds, default 240): a failed or slow step
# (a compile that takes too long, an out-of-memory training step) never costs the figures of the others
LIMIT=${GPU_CHECK_STEP_TIMEOUT:-240}
FAILED=()
step() {  # step NAME COMMAND...: runs it under `timeout`, logs to $OUT/NAME.log, remembers a failure
  local name=$1; shift
  local s=$(date +%s) rc=0
  echo "== $name ($(date -u +%H:%M:%S), at most ${LIMIT} s)"
  timeout --kill-after=15 "$LIMIT" "$@" > >(tee "$OUT/$name.log") 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    FAILED+=("$name (exit $rc$( [ "$rc" != 124 ] || echo ", over ${LIMIT} s"))")
  fi
  echo "   $name: exit $rc after $(( $(date +%s) - s )) s"
}
# 1. the real-time benchmark, eager (one GPU: the VAE on the same device; several: on the second, as the paper)
VAE_DEV=""
if [ "${GPUS}" -gt 1 ]; then VAE_DEV="cuda:1"; fi
step benchmark_eager "$SA" bench "${PAPER[@]}" --set benchmark.checkpoint=random --set benchmark.vae_device=$VAE_DEV \
  --set benchmark.chunks=$CHUNKS --out "$OUT/benchmark_eager.json"
# 2. one training step (several GPUs: one process each under torchrun, the model sharded with FSDP2)
TRAIN=("$SA")
if [ "${GPUS}" -gt 1 ]; then
  TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m flows.cli)
fi
step train_step "${TRAIN[@]}" bench --train-step "${PAPER[@]}" --set train.parallel=fsdp \
  --set train.activation_checkpointing=true --set train.micro_batch_size=1 --steps 4 --json \
  --out "$OUT/train_step.json"
# 3. what the Long-Short Visual Memory ([10]) costs per chunk at these shapes: the same student with and without
#    4 memory slots per layer, timed alternately chunk by chunk
step lsvm_cost "$SA" bench --lsvm-cost "${PAPER[@]}" --chunks "$LSVM_CHUNKS" --memory-slots 4 --out "$OUT/lsvm_cost.json"
# 4. the benchmark with torch.compile (last: its compile time is the least predictable)
step benchmark_compiled "$SA" bench "${PAPER[@]}" --set benchmark.checkpoint=random --set benchmark.vae_device=$VAE_DEV \
  --set benchmark.compile=true "${COMPILED[@]}" --out "$OUT/benchmark_compiled.json"
# 5. the capacity plan for the GPUs present
N=$(( GPUS > 0 ? GPUS : 1 ))
MEM=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80)" 2>/dev/null || echo 80)
echo "== plan for $N GPU(s) of $MEM GiB"
"$SA" plan "${PAPER[@]}" --gpus "$N" --gpu-memory-gib "$MEM" --json > "$OUT/plan.json" \
  || echo "plan: the profile's batch sizes do not split over $N GPUs (see plan.json)" >&2
echo "gpu_check: done in $(( $(date +%s) - t0 )) s -> $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'gpu_check: failed: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
