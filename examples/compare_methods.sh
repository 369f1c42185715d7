#!/usr/bin/env bash
# The paper's comparison (Tables 1–3): methods × {joint, two-stage} × {image-only, audio-only, both} on ONE
# fixed partition and seed, then `uniflow report` tables and plots, and docs-ready markdown (results.md).
#
#   bash examples/compare_methods.sh                      # the grid written to docs/results.md
#   METHODS="fedit fedA2" SETTINGS=both bash examples/compare_methods.sh
#
# Every run starts from a copy of the same base workspace (same round-0 adapter, same shards, same base
# evaluation); "image" runs use only the image clients, "audio" only the audio clients, "both" all of them.
# Test sets of both modalities are evaluated in every run, as in the paper's tables. fedsa runs also evaluate
# every client's personalised model (global A + its private B; rows "fedsa-… client k").
set -euo pipefail

OUT=${OUT:-runs}
PRESET=${PRESET:-smol}
# flexlora and hetlora run at one rank here (every client trains with the workspace's [lora] r): FlexLoRA is
# then the SVD optimum, HetLoRA a norm-weighted FedIT; their heterogeneous-rank start is in docs/aggregation.md.
METHODS=${METHODS:-"fedit ffa fedsa fedex fedA2 lora-fair fedsvd flexlora hetlora rolora"}
STAGE_MODES=${STAGE_MODES:-"joint two-stage"}
SETTINGS=${SETTINGS:-"both image audio"}
IMAGE_CLIENTS=${IMAGE_CLIENTS:-2}
AUDIO_CLIENTS=${AUDIO_CLIENTS:-2}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-6}
BATCH=${BATCH:-2}
LR=${LR:-1e-3}
TAU=${TAU:-0.25}
LAMBDA=${LAMBDA:-1.0}
TRAIN_PER_CLIENT=${TRAIN_PER_CLIENT:-24}
TEST_PER_MODALITY=${TEST_PER_MODALITY:-16}
EVAL_LIMIT=${EVAL_LIMIT:-16}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-6}
SEED=${SEED:-0}
UNIFLOW=${UNIFLOW:-uniflow}
PYTHON=${PYTHON:-python3}

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
mkdir -p "$OUT"
BASE="$OUT/base"
if [ ! -f "$BASE/eval/round-0.json" ]; then
  rm -rf "$BASE"
  say "base workspace: init + partition + base evaluation"
  $UNIFLOW init "$BASE" --preset "$PRESET" --modalities image,audio --stage-tau "$TAU" --steps "$STEPS" \
    --lr "$LR" --batch-size "$BATCH" --seed "$SEED" --lambda "$LAMBDA"
  $UNIFLOW partition -d easy-vqa -d spoken-qa --clients "image:$IMAGE_CLIENTS,audio:$AUDIO_CLIENTS" \
    --train-per-client "$TRAIN_PER_CLIENT" --test-per-modality "$TEST_PER_MODALITY" --seed "$SEED" --workspace "$BASE"
  $UNIFLOW evaluate --round 0 -w "$BASE" --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW_TOKENS"
fi
image_ids=$(seq 0 $((IMAGE_CLIENTS - 1)))
audio_ids=$(seq "$IMAGE_CLIENTS" $((IMAGE_CLIENTS + AUDIO_CLIENTS - 1)))

for setting in $SETTINGS; do
  case "$setting" in
    image) clients=$image_ids ;;
    audio) clients=$audio_ids ;;
    both) clients="$image_ids $audio_ids" ;;
    *) echo "unknown setting $setting (image|audio|both)" >&2; exit 2 ;;
  esac
  for stages in $STAGE_MODES; do
    for method in $METHODS; do
      run="$OUT/$setting/$method-$stages"
      if [ -f "$run/eval/round-$ROUNDS.json" ]; then say "$run done already"; continue; fi
      say "$setting / $method / $stages"
      rm -rf "$run"; mkdir -p "$(dirname "$run")"
      cp -r "$BASE" "$run"
      rm -rf "$run/report"
      start=$(date +%s)
      for r in $(seq 1 "$ROUNDS"); do
        for k in $clients; do
          $UNIFLOW local-train --client "$k" -w "$run" --round "$r" --method "$method" --stages "$stages" --stage-tau "$TAU"
        done
        $UNIFLOW aggregate --round "$r" -w "$run" --method "$method" --lambda "$LAMBDA"
      done
      $UNIFLOW evaluate --round "$ROUNDS" -w "$run" --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW_TOKENS"
      echo "$(( $(date +%s) - start ))" > "$run/wall_seconds.txt"
      if [ "$method" = fedsa ]; then  # FedSA's models are personalised: the global A + each client's private B
        for k in $clients; do
          $UNIFLOW evaluate --round "$ROUNDS" --client "$k" -w "$run" --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW_TOKENS"
        done
      fi
    done
  done
  runs=() names=""
  for run in $(ls -d "$OUT/$setting"/*/ | sort); do
    run=${run%/}
    [ "$(basename "$run")" = report ] && continue
    runs+=("$run") names="$names,$(basename "$run")"
    for personal in $(ls -d "$run"/eval/clients/*/ 2>/dev/null | sort -V); do
      runs+=("${personal%/}") names="$names,$(basename "$run") client $(basename "$personal")"
    done
  done
  $UNIFLOW report "${runs[@]}" --names "${names#,}" --out "$OUT/$setting/report" --force
done
$PYTHON "$(dirname "$0")/compare_summary.py" "$OUT" > "$OUT/results.md"
say "wrote $OUT/results.md"
