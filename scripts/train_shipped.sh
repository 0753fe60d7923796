#!/usr/bin/env bash
# Reproduces the shipped checkpoints on the Montgomery + Shenzhen set (4:3:3 split, seed 0), on a
# 2-core CPU, in stages:
#   1. (done once, earlier) the base models at 192 px, `--recipe basic`, 30/30/20 epochs, lr 1e-3;
#   2. those fine-tuned at 256 px with `--recipe robust` (synthetic abnormalities inside the lung
#      field, detector looks, wider geometry), lr 3e-4 cosine to 0.01x, best epoch by validation Dice;
#   3. (STAGE3=1, tried, not shipped) stage 2 fine-tuned again at 320 px, lr 2e-4: test Dice
#      +0.0002..+0.0009, HD95 -0.08..-0.17 px (msag-unet, unet) for 1.56x the compute per image.
#   4. the previous release's weights: stage 2 fine-tuned on train+val at 256 px (`--fit-on train+val`, lr 2e-4,
#      last epoch kept): 75% more images; the test split stays unseen. Shipped before with
#      `scripts/ship_weights.py runs/unet-all runs/gsconv-unet-all runs/msag-unet-all --data DATA`.
#   5. the previous release's weights: stage 4 fine-tuned with the training paint that spills past the lung's edge
#      (lungrt.data.abnormalities, "spill"), train+val, lr 1e-4, msag-unet 10, unet 12, gsconv-unet 8 epochs.
#   6. the previous release's weights: stage 5 fine-tuned on targets that keep each network pixel's covered
#      share of the gold mask (stages 1-5 thresholded it at 0.5, which shrank every lung by half a pixel at
#      512 px), same settings.
#   7. the shipped weights: stage 6 continued (msag-unet 14, unet 16, gsconv-unet 10 epochs), same settings.
#      Ship with `scripts/ship_weights.py runs/unet-soft2 runs/gsconv-unet-soft2 runs/msag-unet-soft2 --data DATA`.
#   8. (STAGE8=1, tried on msag-unet, not shipped) stage 7's epochs from stage 6 at 320 px instead: Montgomery
#      Dice +0.0008 over stage 7, Shenzhen +0.0001, mean HD95 equal, for 1.8x the training time per epoch.
#   9. the shipped whole-lung weights (STAGE9=1): stage 7's weights fine-tuned to the whole-lung convention on
#      cxr-covid-v7 (split by patient) with cxr-mc-sz as partial labels (lungrt.training.train.partial_label_weights),
#      robust recipe, lr 3e-4, train split, best epoch by cxr-covid-v7 validation Dice. Ship with
#      `scripts/ship_weights.py runs/msag-unet-whole runs/unet-whole runs/gsconv-unet-whole --data COVID_DATA`.
# Stages 1-3 train on the train split only and validation picks the checkpoint; stages 4-8 fit train+val.
# Every run is resumable: rerun this script after an interruption and it continues where it stopped.
# Usage: scripts/train_shipped.sh [DATA] [RUNS]   (COVID_DATA: the whole-lung set, default ../shared/data/cxr-covid-v7)
set -euo pipefail
DATA=${1:-../shared/data/cxr-mc-sz}
RUNS=${2:-runs}
LUNGRT=${LUNGRT:-.venv/bin/lungrt}
if [ "${STAGE1:-0}" = 1 ]; then  # the 192 px base models the fine-tuning starts from
  base=(--data "$DATA" --size 192 --lr 1e-3 --batch-size 8 --seed 0 --resume)
  "$LUNGRT" train --model unet        --width 16 --out "$RUNS/base-unet"        "${base[@]}" --epochs 30
  "$LUNGRT" train --model msag-unet   --width 16 --out "$RUNS/base-msag-unet"   "${base[@]}" --epochs 30
  "$LUNGRT" train --model gsconv-unet --width 12 --out "$RUNS/base-gsconv-unet" "${base[@]}" --epochs 20
fi
if [ "${STAGE2:-1}" = 1 ]; then  # the 256 px robust models (train split)
  common=(--data "$DATA" --size 256 --lr 3e-4 --batch-size 8 --seed 0 --recipe robust --resume)
  for spec in msag-unet:16:40 unet:16:40 gsconv-unet:12:20; do
    IFS=: read -r name width epochs <<< "$spec"
    init=${INIT_DIR:+$INIT_DIR/base-$name}
    "$LUNGRT" train --model "$name" --width "$width" --out "$RUNS/$name" --init "${init:-$name}" --epochs "$epochs" "${common[@]}"
  done
fi
# fine_tune FROM_SUFFIX TO_SUFFIX "name:width:epochs ..." TRAIN_ARGS...: runs/<name>FROM -> runs/<name>TO
fine_tune() {
  local from=$1 to=$2 specs=$3 name width epochs spec
  shift 3
  for spec in $specs; do
    IFS=: read -r name width epochs <<< "$spec"
    "$LUNGRT" train --model "$name" --width "$width" --out "$RUNS/$name$to" --init "$RUNS/$name$from" --epochs "$epochs" "$@"
  done
}
robust=(--data "$DATA" --batch-size 8 --seed 0 --recipe robust --resume)
if [ "${STAGE3:-0}" = 1 ]; then  # 320 px, from stage 2's run folders (tried, not shipped)
  fine_tune "" -320 "msag-unet:16:14 unet:16:16 gsconv-unet:12:10" "${robust[@]}" --size 320 --lr 2e-4
fi
if [ "${STAGE4:-1}" = 1 ]; then  # train+val, from stage 2's run folders
  fine_tune "" -all "msag-unet:16:20 unet:16:24 gsconv-unet:12:14" "${robust[@]}" --size 256 --lr 2e-4 --fit-on train+val
fi
if [ "${STAGE5:-1}" = 1 ]; then  # spill paint, train+val, from stage 4's run folders
  fine_tune -all -sil "msag-unet:16:10 unet:16:12 gsconv-unet:12:8" "${robust[@]}" --size 256 --lr 1e-4 --fit-on train+val
fi
if [ "${STAGE6:-1}" = 1 ]; then  # covered-share targets, from stage 5's run folders
  fine_tune -sil -soft "msag-unet:16:10 unet:16:12 gsconv-unet:12:8" "${robust[@]}" --size 256 --lr 1e-4 --fit-on train+val
fi
if [ "${STAGE7:-1}" = 1 ]; then  # the shipped weights: stage 6 continued, from stage 6's run folders
  fine_tune -soft -soft2 "msag-unet:16:14 unet:16:16 gsconv-unet:12:10" "${robust[@]}" --size 256 --lr 1e-4 --fit-on train+val
fi
if [ "${STAGE8:-0}" = 1 ]; then  # stage 7 at 320 px, from stage 6's run folders (tried, not shipped)
  fine_tune -soft -soft320 "${STAGE8_SPECS:-msag-unet:16:14 unet:16:16 gsconv-unet:12:10}" "${robust[@]}" --size 320 --lr 1e-4 --fit-on train+val
fi
if [ "${STAGE9:-0}" = 1 ]; then  # whole-lung, from the shipped lung-field weights
  COVID_DATA=${COVID_DATA:-../shared/data/cxr-covid-v7}
  for spec in ${STAGE9_SPECS:-msag-unet:16:20 unet:16:20 gsconv-unet:12:14}; do
    IFS=: read -r name width epochs <<< "$spec"
    "$LUNGRT" train --model "$name" --width "$width" --out "$RUNS/$name-whole" --init "$name" --epochs "$epochs" \
      --data "$COVID_DATA" --data "$DATA" --convention whole-lung --size 256 --lr 3e-4 --batch-size 8 --seed 0 \
      --recipe robust --resume
  done
fi
