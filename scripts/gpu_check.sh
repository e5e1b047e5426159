#!/usr/bin/env bash
# The paper-shape GPU check (issue [8]): on ONE CUDA GPU, random weights at the paper's shapes (Wan2.2-TI2V-5B
# backbone + our audio attentions, Wan2.2's VAE layout, 928x704, bf16), in under 8 minutes:
#   1. the real-time benchmark (streaming student: 3 steps, sink + window KV cache): DiT RTF and first-frame delay
#      per chunk, VAE decode RTF, sequential and pipelined end-to-end RTF, peak memory -- eager, then torch.compile
#   2. one teacher training step (forward + backward, activation checkpointing, bf16 autocast over fp32 weights):
#      step time, TFLOP/s, MFU, peak memory against `streamavatar plan`
#   3. the capacity planner for the GPUs present
# Everything lands in $OUT (default data/reports/gpu_check) as JSON beside the paper's Table 5 numbers
# (benchmark.json carries them under "paper_table5"). Usage:  bash scripts/gpu_check.sh  [OUT_DIR]
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
  # the compiled run: dynamo's graph capture without inductor's C++ code generation, 2 chunks, no warm-up:
  # the path, not its speed (inductor on 2 CPU cores takes minutes)
  COMPILED=(--set benchmark.compile_backend=aot_eager --set benchmark.chunks=2 --set benchmark.warmup_chunks=0)
else
  CHUNKS=40
  COMPILED=(--set benchmark.compile_backend=inductor --set benchmark.chunks=$CHUNKS)
fi
t0=$(date +%s)
echo "== 1. real-time benchmark, eager (one GPU: the VAE on the same device)"
"$SA" bench "${PAPER[@]}" --set benchmark.checkpoint=random --set benchmark.vae_device= \
  --set benchmark.chunks=$CHUNKS --out "$OUT/benchmark_eager.json"
echo "== 1b. the same with torch.compile"
"$SA" bench "${PAPER[@]}" --set benchmark.checkpoint=random --set benchmark.vae_device= \
  --set benchmark.compile=true "${COMPILED[@]}" --out "$OUT/benchmark_compiled.json"
echo "== 2. one training step"
"$SA" bench --train-step "${PAPER[@]}" --set train.activation_checkpointing=true --set train.micro_batch_size=1 \
  --steps 4 --json --out "$OUT/train_step.json"
echo "== 3. the capacity plan for ${GPUS} GPU(s)"
N=$(( GPUS > 0 ? GPUS : 1 ))
"$SA" plan "${PAPER[@]}" --gpus "$N" --gpu-memory-gib "$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80)" 2>/dev/null || echo 80)" \
  --json > "$OUT/plan.json" || echo "plan: the profile's batch sizes do not split over $N GPUs (see plan.json)" >&2
echo "gpu_check: done in $(( $(date +%s) - t0 )) s -> $OUT"
