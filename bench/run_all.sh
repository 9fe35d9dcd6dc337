#!/usr/bin/env bash
# The CPU benchmarks of docs/benchmarks/, one after another, each at its documented default size; every
# script prints its table last. Measured on 2 cores: 2.5 minutes at low load (13 under heavy load, before
# the gloo ranks forked from a preloaded server).
#
#   bash bench/run_all.sh                       # python: $PYTHON, else .venv/bin/python, else python
#   PYTHON=/path/to/python bash bench/run_all.sh 2>&1 | tee bench.log
#
# Not here: bench/gpu_throughput.py (needs a GPU), bench/job_layouts.py (the default job at five layouts,
# ~8 minutes) and bench/convert.py (converters); run them on their own.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONWARNINGS=ignore

run() {
    local start=$SECONDS
    echo "=== $(date -u +%FT%TZ) python $*"
    "$PYTHON" "$@"
    echo "=== $1 took $((SECONDS - start)) s"
    echo
}

total=$SECONDS
run bench/lora_step.py                 # 1. LoRA step: ours vs HF transformers + PEFT
run bench/lora_step.py --full          # 2. full-parameter SFT step: ours vs HF transformers
run bench/comm_volume.py               # 3. bytes per step by layout vs the analytic minimum
run bench/pipeline_bubble.py           # 4. pipeline bubble vs (p-1)/(m+p-1)
run bench/checkpoint_io.py             # 5. dist_checkpointing save/load vs cp, TP=2 -> TP=1
echo "all benchmarks: $((SECONDS - total)) s"
