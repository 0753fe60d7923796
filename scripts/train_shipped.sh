#!/usr/bin/env bash
# Reproduces the shipped checkpoints: trains the three models on the Montgomery + Shenzhen set
# (4:3:3 split, seed 0) on this 2-core CPU. Usage: scripts/train_shipped.sh [DATA] [RUNS]
set -euo pipefail
DATA=${1:-../shared/data/cxr-mc-sz}
RUNS=${2:-runs}
LUNGRT=${LUNGRT:-.venv/bin/lungrt}
common=(--data "$DATA" --size 192 --epochs 30 --lr 1e-3 --batch-size 8 --seed 0)
"$LUNGRT" train --model unet        --width 16 --out "$RUNS/unet"        "${common[@]}"
"$LUNGRT" train --model msag-unet   --width 16 --out "$RUNS/msag-unet"   "${common[@]}"
"$LUNGRT" train --model gsconv-unet --width 12 --out "$RUNS/gsconv-unet" "${common[@]}" --epochs 20  # the session-time budget: 20 epochs
