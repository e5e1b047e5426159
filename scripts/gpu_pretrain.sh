#!/usr/bin/env bash
# Pretrain the demo's base DiT with its audio path on ONE CUDA GPU, from a pack that `streamavatar pretrain
# --what pack` wrote on the machine that has the clips (face crops as H.264, voices as 16-bit PCM, speaking
# masks already decided): the GPU machine needs neither the clips nor an ffmpeg program, mediapipe or the VAD
# model. It trains for a wall-clock budget (pretrain.dit_max_seconds: the steps that fit, timed on 30 steps) and
# measures held-out flow matching there; lip sync needs FaceMesh, so measure it back on the CPU machine with
# `streamavatar pretrain --what dit --set pretrain.dit_pack=PACK --set pretrain.dit_init_from=OUT/demo_dit.pt
#  --set pretrain.dit_iterations=1 ...` (docs/pretrain.md "Pretraining the DiT on a GPU: the pack").
# WHAT=all first trains a new autoencoder on the pack's crops (from scratch, pretrain.vae_max_seconds), then the DiT
# from scratch on its latents (the committed base DiT learned the committed autoencoder's latents); the default,
# WHAT=dit, continues the committed base DiT on the committed autoencoder.
# Usage:  [WHAT=dit|all] [DEVICE=cuda] bash scripts/gpu_pretrain.sh PACK OUT_DIR [--set key=value ...]
#   (STREAMAVATAR: the command that runs the CLI, default .venv/bin/streamavatar)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/gpu_pretrain.sh PACK OUT_DIR [--set key=value ...]" >&2
  exit 2
fi
PACK=$1
OUT=$2
shift 2
SA=${STREAMAVATAR:-.venv/bin/streamavatar}
mkdir -p "$OUT"
WHAT=${WHAT:-dit}
COMMON=(--set project.device="${DEVICE:-cuda}" --set pretrain.dit_pack="$PACK" --set pretrain.out_dir="$OUT"
  --set pretrain.dit_audio=true --set pretrain.dit_lip_windows=0 --set pretrain.dit_window_stride=4
  --set pretrain.dit_iterations=100000 --set pretrain.dit_max_seconds=300 --set pretrain.dit_batch_size=128
  --set train.checkpoint_every=2000 --set tracking.enabled=false)
case "$WHAT" in
  dit)
    # `pretrain --what dit` encodes with the autoencoder in its out_dir: the committed one the demo fine-tunes
    [ -f "$OUT/demo_vae.pt" ] || cp weights/demo_vae.pt "$OUT/demo_vae.pt"
    # shellcheck disable=SC2086  # STREAMAVATAR may be a command with arguments (python3 -m flows.cli)
    $SA pretrain --what dit "${COMMON[@]}" --set pretrain.dit_init_from=weights/demo_dit.pt "$@" ;;
  all)
    # shellcheck disable=SC2086
    $SA pretrain --what all "${COMMON[@]}" --set pretrain.vae_init_from=null --set pretrain.dit_init_from=null \
      --set pretrain.iterations=1000000 --set pretrain.vae_max_seconds=180 --set pretrain.lr=1e-3 \
      --set vae_train.batch_size=64 "$@" ;;
  *)
    echo "WHAT must be dit or all, got $WHAT" >&2
    exit 2 ;;
esac
