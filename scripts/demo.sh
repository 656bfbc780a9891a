#!/usr/bin/env bash
# The whole CromSS loop on one machine, from a fresh clone, in one command:
#
#   scripts/demo.sh          set up .venv, then: synthetic NoLDO-S12-like and DW-like shards,
#                            pretraining (noisy-label baseline, CromSS middle and late fusion),
#                            a small Tune sweep whose best model is registered, fine-tuning from
#                            the registry on the DW-like set, and a results table
#   scripts/demo.sh stop     stop the demo's Ray cluster (it stays up for its dashboard)
#
# Everything lands in outputs/demo (CROMSS_DEMO_DIR): shards, Ray runs, the MLflow store,
# logs. Running it again reuses the environment, the data and every finished step.
# Sized for a 2-core CPU machine, aiming at under 15 minutes there (CROMSS_DEMO_LOCATIONS,
# CROMSS_DEMO_TILES, CROMSS_DEMO_EPOCHS and CROMSS_DEMO_TRIALS scale it); nothing is
# downloaded but the Python packages of the first run.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR=${CROMSS_DEMO_DIR:-outputs/demo}
RAY_PORT=${CROMSS_DEMO_RAY_PORT:-6390}
DASHBOARD_PORT=${CROMSS_DEMO_DASHBOARD_PORT:-8266}
PRETRAIN_LOCATIONS=${CROMSS_DEMO_LOCATIONS:-40}
DOWNSTREAM_TILES=${CROMSS_DEMO_TILES:-40}
TILE_SIZE=96
EPOCHS=${CROMSS_DEMO_EPOCHS:-2}
SWEEP_TRIALS=${CROMSS_DEMO_TRIALS:-2}

[[ $DEMO_DIR == /* ]] || DEMO_DIR=$PWD/$DEMO_DIR
LOGS=$DEMO_DIR/logs
DONE=$DEMO_DIR/done
RUNS=$DEMO_DIR/runs
PRETRAIN_DATA=$DEMO_DIR/data/noldo-synth
DOWNSTREAM_DATA=$DEMO_DIR/data/dw-synth
TRACKING_URI=sqlite:///$DEMO_DIR/mlflow.db
BEST_MODEL_FILE=$DEMO_DIR/best-model.txt
# Ray keeps sockets here: short (socket paths are limited to ~100 bytes) and private to
# the demo, so other Ray instances on the machine neither see nor disturb it.
RAY_TEMP=${TMPDIR:-/tmp}/cromss-demo-$(id -u)
RAY_PID_FILE=$RAY_TEMP/head.pid

say() { printf '\n\033[1m[%s] %s\033[0m\n' "$(date +%H:%M:%S)" "$*"; }
fail() { printf '\033[31mdemo: %s\033[0m\n' "$*" >&2; exit 1; }

setup_environment() {
    local wanted stamp=.venv/.cromss-demo-installed
    wanted=$(python3 -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
    if [[ -x .venv/bin/cromss && -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
        say "Environment: reusing .venv"
        return
    fi
    say "Environment: installing cromss-ray into .venv (first run: about a minute with a warm package cache, a few minutes without)"
    bash scripts/install.sh
    echo "$wanted" > "$stamp"
}

make_shards() {  # kind, directory, rows
    local kind=$1 directory=$2 rows=$3
    if .venv/bin/cromss data check "$directory" > "$LOGS/check-$kind.log" 2>&1; then
        say "Data: reusing $kind shards in ${directory#"$PWD"/}"
        return
    fi
    say "Data: generating $rows synthetic $kind rows of $TILE_SIZE px"
    .venv/bin/cromss data synth --kind "$kind" --locations "$rows" --size "$TILE_SIZE" --seed 0 \
        --out "$directory" --overwrite
}

head_running() {
    [[ -f $RAY_PID_FILE ]] && kill -0 "$(cat "$RAY_PID_FILE")" 2> /dev/null
}

start_ray() {
    # Token authentication; the demo's cluster for every cromss command below; and Ray's
    # single-machine mode, in which every Ray server listens on 127.0.0.1 only.
    export RAY_AUTH_MODE=token RAY_ADDRESS=127.0.0.1:$RAY_PORT RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    # The token every Ray client on this machine presents (~/.ray/auth_token).
    .venv/bin/ray get-auth-token --generate > /dev/null 2>&1
    if head_running; then
        say "Ray: reusing the demo cluster at $RAY_ADDRESS"
        return
    fi
    say "Ray: starting a local cluster on 127.0.0.1 (token authentication)"
    mkdir -p "$RAY_TEMP"
    nohup .venv/bin/ray start --head --block --disable-usage-stats \
        --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --num-cpus="$(getconf _NPROCESSORS_ONLN)" --num-gpus=0 --object-store-memory=$((2**30)) \
        --temp-dir="$RAY_TEMP" \
        > "$LOGS/ray-head.log" 2>&1 &
    echo $! > "$RAY_PID_FILE"
    for _ in $(seq 120); do
        if .venv/bin/ray status --address "$RAY_ADDRESS" > /dev/null 2>&1; then
            return
        fi
        head_running || fail "Ray did not start; see $LOGS/ray-head.log"
        sleep 1
    done
    fail "Ray did not answer within 2 minutes; see $LOGS/ray-head.log"
}

stop_ray() {
    if ! head_running; then
        echo "demo: no demo Ray cluster is running"
        return
    fi
    kill -TERM "$(cat "$RAY_PID_FILE")"
    for _ in $(seq 60); do
        head_running || break
        sleep 1
    done
    rm -f "$RAY_PID_FILE"
    echo "demo: Ray cluster stopped"
}

step() {  # name, description, command...: run once, log to $LOGS/<name>.log, remember success
    # The whole output (Ray's and MLflow's lines included) goes to the step's log; the
    # console shows cromss's own progress and summary lines from it (scripts/demo_console.sed).
    local name=$1 description=$2 started=$SECONDS log=$LOGS/$1.log pid
    shift 2
    if [[ -f $DONE/$name ]]; then
        say "$description: done in an earlier run, reusing"
        return
    fi
    say "$description (log: ${log#"$PWD"/})"
    : > "$log"  # exists before tail opens it, however late the background job starts
    "$@" >> "$log" 2>&1 &
    pid=$!
    tail -n +1 -f --pid="$pid" "$log" | sed -nEu -f scripts/demo_console.sed
    if ! wait "$pid"; then
        tail -n 25 "$log" >&2
        fail "$description failed; the last lines of its log are above, the whole log is $log"
    fi
    touch "$DONE/$name"
    echo "... $description: $((SECONDS - started)) s"
}

pretrain() {  # run name, --set overrides...
    local name=$1
    shift
    .venv/bin/cromss pretrain --config jobs/configs/pretrain_tiny.yaml --data "$PRETRAIN_DATA" \
        --tracking-uri "$TRACKING_URI" --set run.storage_path="$RUNS" --set run.name="$name" \
        --set optim.epochs="$EPOCHS" "$@"
}

sweep() {
    .venv/bin/cromss tune --config jobs/configs/tune_tiny.yaml --data "$PRETRAIN_DATA" \
        --tracking-uri "$TRACKING_URI" --set run.storage_path="$RUNS" --set run.name=demo-sweep \
        --set optim.epochs="$EPOCHS" --set tune.num_samples="$SWEEP_TRIALS" 2>&1 | tee "$DEMO_DIR/sweep-output.txt"
    local status=${PIPESTATUS[0]}
    [[ $status -eq 0 ]] || return "$status"
    grep -o 'models:/[^ ;]*@best' "$DEMO_DIR/sweep-output.txt" | tail -n 1 > "$BEST_MODEL_FILE"
    [[ -s $BEST_MODEL_FILE ]] || { echo "the sweep registered no best model" >&2; return 1; }
}

finetune() {  # run name, init source
    .venv/bin/cromss finetune --config jobs/configs/finetune_tiny.yaml --data "$DOWNSTREAM_DATA" \
        --tracking-uri "$TRACKING_URI" --set run.storage_path="$RUNS" --set run.name="$1" --init "$2" \
        --set optim.epochs="$EPOCHS"
}

if [[ ${1:-} == stop ]]; then
    stop_ray
    exit 0
fi
[[ $# -eq 0 ]] || fail "usage: scripts/demo.sh [stop]"

DEMO_STARTED=$SECONDS
mkdir -p "$LOGS" "$DONE" "$RUNS"
# Progress is one line per epoch from each run; Ray Data's per-operator bars would fill the logs.
export RAY_DATA_DISABLE_PROGRESS_BARS=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
setup_environment
make_shards pretrain "$PRETRAIN_DATA" "$PRETRAIN_LOCATIONS"
make_shards dw "$DOWNSTREAM_DATA" "$DOWNSTREAM_TILES"
start_ray

step pretrain-baseline "Pretraining: noisy-label baseline (middle fusion, no selection, smoothing or consistency)" \
    pretrain demo-noisy-baseline --set model.fusion=mid --set cromss.selection=false \
    --set "cromss.smoothing_factors=[]" --set cromss.prior=none --set cromss.consistency=none \
    --set tracking.registry_name=cromss-demo-noisy-baseline
step pretrain-mid "Pretraining: CromSS, middle fusion" pretrain demo-cromss-mid --set model.fusion=mid
step pretrain-late "Pretraining: CromSS, late fusion" pretrain demo-cromss-late --set model.fusion=late
step sweep "Tune sweep over fusion, smoothing and selection; best model registered as @best" sweep
BEST_MODEL=$(cat "$BEST_MODEL_FILE")
step finetune-random "Fine-tuning on DW-like tiles: random initialisation" finetune demo-ft-random random
step finetune-baseline "Fine-tuning on DW-like tiles: from the noisy-label baseline" \
    finetune demo-ft-noisy-baseline models:/cromss-demo-noisy-baseline@latest
step finetune-cromss "Fine-tuning on DW-like tiles: from $BEST_MODEL" finetune demo-ft-cromss "$BEST_MODEL"

say "Results (mIoU in %, against clean labels; S2 selection in the last pretraining epoch: precision and base rate in %, noise AUROC)"
.venv/bin/python scripts/demo_report.py --tracking-uri "$TRACKING_URI" --best-model "$BEST_MODEL" \
    | tee "$DEMO_DIR/results.txt"
echo "(Demo scale: $PRETRAIN_LOCATIONS locations, $EPOCHS epochs. The table shows that the loop works end to end,
not which method is better: docs/benchmarks.md, section 5, compares them with seeds and error bars.)"

say "Done in $(((SECONDS - DEMO_STARTED) / 60)) min $(((SECONDS - DEMO_STARTED) % 60)) s. Where to look:"
cat << EOF
  Results table   ${DEMO_DIR#"$PWD"/}/results.txt
  MLflow UI       .venv/bin/mlflow ui --backend-store-uri $TRACKING_URI --host 127.0.0.1 --port 5000
                  then open http://127.0.0.1:5000 (experiments cromss-pretrain, cromss-tune, cromss-finetune)
  Ray dashboard   http://127.0.0.1:$DASHBOARD_PORT  (sign in with the token from: .venv/bin/ray get-auth-token)
                  stop the demo cluster with: scripts/demo.sh stop
  Output folder   ${DEMO_DIR#"$PWD"/}  (data/, runs/, logs/, mlflow.db)
EOF
