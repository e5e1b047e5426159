#!/usr/bin/env bash
# Make the pack that scripts/gpu_pretrain.sh trains on, on this (CPU) machine, in one command: a second
# self-made corpus (seed 1; the photo of every identity in curate.unseen_identities left out, so the demo's
# unseen person stays unseen), then `pretrain --what pack` over pretrain.dirs (the shared real clips) and that
# corpus, its conversations sy0* held out beside pretrain.holdout. 5.5 minutes on 2 cores for the default 176
# conversations: 386 clips (358 train, 28 held out), 2061 s of video, 40 MB, small enough for the device
# tool's carry (docs/pretrain.md "Pretraining the DiT on a GPU: the pack").
# Usage:  bash scripts/make_gpu_pack.sh [OUT_DIR (data/pretrain)] [CONVERSATIONS (176)] [--set key=value ...]
#   the --set values go to both commands, before the script's own (which already take in any --set of
#   pretrain.dirs, pretrain.holdout or corpus.extra_faces_dirs); STREAMAVATAR / PYTHON: the commands that run
#   the CLI and Python, default .venv/bin/streamavatar and .venv/bin/python
# Re-running is cheap: the corpus resumes (finished conversations are kept) and the pack is rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=data/pretrain
N=176
if [ $# -gt 0 ] && [ "$1" != --set ]; then OUT=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != --set ]; then N=$1; shift; fi
SA=${STREAMAVATAR:-.venv/bin/streamavatar}
PY=${PYTHON:-.venv/bin/python}
CORPUS=$OUT/corpus
FACES=$OUT/faces
mkdir -p "$FACES"
# the portraits every demo corpus uses, less the unseen identities; then the folders and held-out names to pack
# shellcheck disable=SC2086  # PYTHON may be a command with arguments
PLAN=$($PY - "$FACES" "$CORPUS" "$@" <<'EOF'
import sys
from pathlib import Path

from tasks.config import load_config, resolve_path

faces, corpus, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
cfg = load_config(sets=[v for k, v in zip(extra, extra[1:]) if k == "--set"])
unseen = set(cfg.curate.unseen_identities)
for old in faces.iterdir():
    old.unlink()
kept = []
for folder in cfg.corpus.extra_faces_dirs:
    d = resolve_path(folder, Path.cwd())
    if not d.is_dir():
        sys.exit(f"corpus.extra_faces_dirs: {folder} ({d}) is absent: the pack's corpus needs the shared portraits")
    for photo in sorted(d.iterdir()):
        if photo.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and photo.stem not in unseen:
            (faces / photo.name).symlink_to(photo.resolve())
            kept.append(photo.name)
if not kept:
    sys.exit(f"corpus.extra_faces_dirs {cfg.corpus.extra_faces_dirs}: no portrait left for the pack's corpus")
print(f"make_gpu_pack: {len(kept)} portraits (left out: {', '.join(sorted(unseen)) or 'none'})", file=sys.stderr)
print(",".join([*cfg.pretrain.dirs, f"{corpus}/videos"]))
print(",".join([*cfg.pretrain.holdout, "sy0*"]))
EOF
)
DIRS=$(echo "$PLAN" | sed -n 1p)
HOLDOUT=$(echo "$PLAN" | sed -n 2p)
# shellcheck disable=SC2086  # STREAMAVATAR may be a command with arguments (python3 -m flows.cli)
$SA corpus "$@" --set corpus.out_dir="$CORPUS" --set corpus.report_dir="$OUT/corpus_report" \
  --set corpus.num_conversations="$N" --set corpus.seed=1 --set "corpus.extra_faces_dirs=[$FACES]"
# shellcheck disable=SC2086
$SA pretrain --what pack "$@" --set pretrain.out_dir="$OUT" --set "pretrain.dirs=[$DIRS]" \
  --set "pretrain.holdout=[$HOLDOUT]" --set tracking.enabled=false
