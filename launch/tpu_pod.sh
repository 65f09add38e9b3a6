#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: create (or reuse) the TPU VM, install, run on every worker.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra --config.x=y flags...]
#   launch/tpu_pod.sh hyena-1m us-east5-a v5p-16 configs/1m.py gs://my-bucket/runs/1m
#
# WORKDIR should be a gs:// path every host can reach (orbax writes checkpoints there; the run
# resumes from it automatically after a preemption, on these or new VMs). The `tpu` extra pins
# libtpu to the jax the project was tested with; `gcs` reads and writes gs:// paths. The hg38
# files must be readable on every host at the paths the config names (run
# launch/prepare_hg38.sh on each worker, or copy them).
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
NAME=$1 ZONE=$2 ACCEL=$3 CONFIG=$4 WORKDIR=$5; shift 5
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
VERSION=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" \
    --version "$VERSION"
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

ssh_all "set -e; if [ ! -d hyena_jax ]; then git clone '$REPO_URL' hyena_jax; fi
  cd hyena_jax && git pull --ff-only
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q -e '.[tpu,gcs]'"

# One process per host; jax.distributed.initialize() discovers the slice on TPU VMs.
ssh_all "cd hyena_jax && . ~/venv/bin/activate && \
  python -m hyena_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR $* \
  2>&1 | tee -a ~/hyena_jax_train.log"
