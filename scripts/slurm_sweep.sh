#!/usr/bin/env bash
# K asynchronous sweep workers on one Optuna study, as one SLURM job array: each worker asks for its next
# trial as soon as its last one ends (no batch waits for its slowest trial); together they run exactly
# n_trials, and a worker that dies has its trial failed and run again by the others.
#   STORAGE=postgresql+psycopg://user:pass@dbhost/optuna scripts/slurm_sweep.sh 8 [override ...]
#   STORAGE=journal:/shared/fs/digits/cnn.log SEARCH=cnn_bn_optuna PARTITION=gpu scripts/slurm_sweep.sh 4 data=fashion
# Run it from anywhere in a checkout after `make install`. On a partition with GPUs each worker gets one
# (trainer=gpu); elsewhere it trains on CPU. Logs: logs/slurm/<array>_<task>.out. Prints the array's job id.
# Environment: STORAGE (required), SEARCH (cnn_optuna), N_TRIALS (100), PARTITION (the default one),
# CPUS (2), MEM (4G), TIME (04:00:00), HEARTBEAT (30 s), PYTHON (the checkout's .venv/bin/python), LOGS (logs/slurm).
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:?usage: STORAGE=<url> scripts/slurm_sweep.sh <workers> [override ...]}
shift
: "${STORAGE:?set STORAGE to a postgresql+psycopg:// URL, a sqlite:/// file or journal:/path/on/shared/fs.log}"
python=${PYTHON:-$PWD/.venv/bin/python}
[ -x "$python" ] || { echo "error: PYTHON=$python is not an executable python; run make install first" >&2; exit 1; }
partition=${PARTITION:-$(sinfo -h -o %P | sed -n 's/\*$//p' | head -n 1)}
[ -n "$partition" ] || { echo "error: no PARTITION given and the cluster has no default partition" >&2; exit 1; }
if sinfo -h -p "$partition" -o %G | grep -q gpu; then gpu=(--gpus-per-task=1); trainer=gpu; else gpu=(); trainer=cpu; fi
logs=${LOGS:-logs/slurm}
mkdir -p "$logs"
cmd=$(printf '%q ' "$python" train.py -m "hparams_search=${SEARCH:-cnn_optuna}" "trainer=$trainer" \
  "hydra.sweeper.storage='$STORAGE'" "hydra.sweeper.n_trials=${N_TRIALS:-100}" \
  "hydra.sweeper.heartbeat_interval=${HEARTBEAT:-30}" "$@")
exec sbatch --parsable --job-name=digits-sweep --array="0-$((workers - 1))" --partition="$partition" "${gpu[@]}" \
  --ntasks=1 --cpus-per-task="${CPUS:-2}" --mem="${MEM:-4G}" --time="${TIME:-04:00:00}" \
  --output="$logs/%A_%a.out" --wrap="exec $cmd"
