#!/usr/bin/env bash
# A federated experiment on one machine as plain shell: init → partition → R × (clients train → server
# aggregates → evaluate) → report. Every step is an independent `uniflow` command exchanging adapter
# directories in the workspace, exactly what clients and a server on other machines would run against
# a shared directory (see the README's two-terminal walkthrough).
#
#   METHOD=fedA2 ROUNDS=3 CLIENTS=image:2,audio:2 bash examples/run_rounds.sh
#
# Parameters (environment variables, with defaults):
#   WS=fed  PRESET=smol  METHOD=fedA2  ROUNDS=3  CLIENTS=image:2,audio:2  TAU=0.25  LAMBDA=1.0
#   STEPS=12  BATCH=4  LR=1e-3  DATASETS="easy-vqa spoken-qa"  TRAIN_PER_CLIENT=64  TEST_PER_MODALITY=32
#   SCHEME=iid  ALPHA=0.5  SEED=0  JOBS=1 (clients trained in parallel)  EVAL_EVERY=0 (1: evaluate every round)
#   EVAL_LIMIT=32  MAX_NEW_TOKENS=8  STAGES=two-stage  PRECISION=fp32 (bf16: the frozen base in bf16)  UNIFLOW=uniflow
#   PERSONAL_EVAL=1 for fedsa (also evaluate each client's personalised model: global A + its private B)
set -euo pipefail

WS=${WS:-fed}
PRESET=${PRESET:-smol}
METHOD=${METHOD:-fedA2}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-image:2,audio:2}
TAU=${TAU:-0.25}
LAMBDA=${LAMBDA:-1.0}
STEPS=${STEPS:-12}
BATCH=${BATCH:-4}
LR=${LR:-1e-3}
DATASETS=${DATASETS:-easy-vqa spoken-qa}
TRAIN_PER_CLIENT=${TRAIN_PER_CLIENT:-64}
TEST_PER_MODALITY=${TEST_PER_MODALITY:-32}
SCHEME=${SCHEME:-iid}
ALPHA=${ALPHA:-0.5}
SEED=${SEED:-0}
JOBS=${JOBS:-1}
EVAL_EVERY=${EVAL_EVERY:-0}
EVAL_LIMIT=${EVAL_LIMIT:-32}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-8}
STAGES=${STAGES:-two-stage}
PRECISION=${PRECISION:-fp32}
UNIFLOW=${UNIFLOW:-uniflow}
if [ "$METHOD" = fedsa ]; then PERSONAL_EVAL=${PERSONAL_EVAL:-1}; else PERSONAL_EVAL=0; fi

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# Modalities the model needs encoders for (text needs none).
modalities=$(echo "$CLIENTS" | tr ',' '\n' | cut -d: -f1 | grep -E '^(image|audio)$' | sort -u | paste -sd, -)
case "$CLIENTS" in *mixed*) modalities=image,audio ;; esac
[ -n "$modalities" ] || modalities=image

say "init $WS (preset $PRESET, method $METHOD)"
$UNIFLOW init "$WS" --preset "$PRESET" --modalities "$modalities" --method "$METHOD" --lambda "$LAMBDA" \
  --stage-tau "$TAU" --steps "$STEPS" --lr "$LR" --batch-size "$BATCH" --seed "$SEED"

say "partition ($CLIENTS, $SCHEME)"
dataset_flags=()
for d in $DATASETS; do dataset_flags+=(--dataset "$d"); done
$UNIFLOW partition "${dataset_flags[@]}" --clients "$CLIENTS" --scheme "$SCHEME" --alpha "$ALPHA" \
  --train-per-client "$TRAIN_PER_CLIENT" --test-per-modality "$TEST_PER_MODALITY" --seed "$SEED" --workspace "$WS"
clients=$(ls "$WS/data/clients" | sort -n)

say "evaluate the base (round 0)"
$UNIFLOW evaluate --round 0 -w "$WS" --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW_TOKENS" --precision "$PRECISION"

for r in $(seq 1 "$ROUNDS"); do
  say "round $r: local training ($(echo $clients | wc -w) clients, $JOBS at a time)"
  printf '%s\n' $clients | xargs -P "$JOBS" -I{} \
    $UNIFLOW local-train --client {} -w "$WS" --round "$r" --stages "$STAGES" --stage-tau "$TAU" --precision "$PRECISION"
  say "round $r: aggregate ($METHOD)"
  $UNIFLOW aggregate --round "$r" -w "$WS" --method "$METHOD" --lambda "$LAMBDA" --min-clients 1
  if [ "$EVAL_EVERY" = 1 ] || [ "$r" = "$ROUNDS" ]; then
    say "round $r: evaluate"
    $UNIFLOW evaluate --round "$r" -w "$WS" --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW_TOKENS" --precision "$PRECISION"
    if [ "$PERSONAL_EVAL" = 1 ]; then
      for k in $clients; do  # right after the round: a client's private B is overwritten by its next round
        say "round $r: evaluate client $k's personalised model"
        $UNIFLOW evaluate --round "$r" --client "$k" -w "$WS" --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW_TOKENS" --precision "$PRECISION"
      done
    fi
  fi
done

say "report"
name=${RUN_NAME:-$METHOD ($STAGES)}
runs=("$WS") names="$name"
if [ "$PERSONAL_EVAL" = 1 ]; then
  for k in $clients; do runs+=("$WS/eval/clients/$k"); names="$names,$name client $k"; done
fi
$UNIFLOW report "${runs[@]}" --out "$WS/report" --names "$names" --force
