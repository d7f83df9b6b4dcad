#!/bin/bash
# hpcproc under Flux.
#   flux batch jobscripts/flux.sh
#flux: --job-name=hpcproc-scatter-gather
#flux: -N 2
#flux: -n 8
#flux: -t 5m

# ---- options you edit ------------------------------------------------------------
PYTHON="${PYTHON:-python}"
APP="${APP:-examples/scatter_gather.py:main}"
NODES="${NODES:-2}"
TASKS="${TASKS:-8}"
TRANSPORT="${TRANSPORT:-tcp}"
TIMEOUT="${TIMEOUT:-120}"
# Flux does not tell a task where rank 0 runs, so ranks meet in a shared directory
# (the home directory is shared on clusters; files are 0600, removed afterwards).
export HPCPROC_RENDEZVOUS_DIR="${HPCPROC_RENDEZVOUS_DIR:-$HOME/.hpcproc/rendezvous}"
# -----------------------------------------------------------------------------------

set -euo pipefail
echo "hpcproc: flux job ${FLUX_JOB_ID:-?}: $APP ($TRANSPORT)"
flux run -N "$NODES" -n "$TASKS" "$PYTHON" -m hpcproc.run --transport "$TRANSPORT" \
    --timeout "$TIMEOUT" "$APP"
