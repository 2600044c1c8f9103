#!/usr/bin/env bash
# Train on a Slurm cluster: one `accelerate launch` per node through srun, all GPUs of every node.
#
#   sbatch slurm/train.sh --data /shared/shards --out /shared/runs/ixi-unet [train/main.py options]
#
# Everything after the script name goes to train/main.py; `--resume auto` is always added, so a requeued job
# continues from its newest checkpoint. On the pre-emption warning (USR1, 120 s before the end) the run
# checkpoints and the job requeues itself. On nodes without GPUs it runs CPU processes
# (CPU_PROCESSES_PER_NODE, default 1) over gloo. See docs/cluster.md.
#SBATCH --job-name=mri-cyclegan
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

fail() { echo "error: $*" >&2; exit 2; }

# the run folder, from the arguments (the stop request and the final status live there)
out=""
args=("$@")
for i in "${!args[@]}"; do
  [ "${args[$i]}" = "--out" ] && out="${args[$((i + 1))]:-}"
done
[ -n "$out" ] || fail "pass --out RUN_FOLDER (on a filesystem all nodes share)"

# Slurm runs a copy of this script; the project is where the job was submitted from
cd "${SLURM_SUBMIT_DIR:-$(pwd)}" || fail "cannot enter ${SLURM_SUBMIT_DIR}"
[ -f train/main.py ] || fail "submit from the repository root (no train/main.py in $(pwd))"
python="${PYTHON:-$(pwd)/.venv/bin/python}"
[ -x "$python" ] || python=$(command -v python3) || fail "no Python; set PYTHON=/path/to/python"

nodes=${SLURM_NNODES:-1}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c ^GPU || true)
if [ "${gpus:-0}" -gt 0 ]; then
  per_node=$gpus
  precision=${MIXED_PRECISION:-bf16}
else
  per_node=${CPU_PROCESSES_PER_NODE:-1}
  precision=${MIXED_PRECISION:-no}
  echo "no GPUs on $(hostname): running $per_node CPU process(es) per node"
fi
total=$((nodes * per_node))
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
port=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
multi=""
[ "$total" -gt 1 ] && multi="--multi_gpu"
echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $per_node process(es), head $head_node:$port"

stop_requested=0
on_warning() {
  stop_requested=1
  echo "pre-emption warning: asking the run to checkpoint and stop"
  touch "$out/STOP"
}
trap on_warning USR1

# one task per node; each starts the node's processes. The machine rank is the node's index in the job.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  exec "$0" -m accelerate.commands.launch '"$multi"' \
    --num_machines "$1" --machine_rank "${SLURM_NODEID:-$SLURM_PROCID}" --num_processes "$2" \
    --main_process_ip "$3" --main_process_port "$4" --mixed_precision "$5" --dynamo_backend no \
    train/main.py "${@:6}" --resume auto' \
  "$python" "$nodes" "$total" "$head_node" "$port" "$precision" "$@" &
step=$!
wait $step
status=$?
while kill -0 $step 2>/dev/null; do  # a trapped signal interrupts `wait`; the step is still running
  wait $step
  status=$?
done

if [ "$stop_requested" = 1 ] && grep -q '"status": "stopped"' "$out/summary.json" 2>/dev/null; then
  echo "checkpointed; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit $status
