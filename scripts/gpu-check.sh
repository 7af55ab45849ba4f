#!/usr/bin/env bash
# The GPU checks, as one prepared call for a machine with CUDA (the device machine lent to
# some sessions; it has torch, transformers, accelerate and peft, and no network):
#
#   scripts/gpu-check.sh            # writes everything under ${OUT:-./var/gpu-check}
#
# 1. the tests that run only with CUDA (bf16 autocast, gradient checkpointing: SFT, DPO,
#    PPO, RLOO), and the job and loop tests, whose worker picks cuda by itself (SQLite only
#    where no PostgreSQL runs);
# 2. the benchmarks: bench/ppo.py (~0.5B policy, bf16: MFU and the step's split) and the
#    reward model against TRL on a backbone built from config.
# Each part's output goes to its own log; a part that fails does not stop the others, and
# the script exits non-zero if any failed. (The data-parallel tests stay on CPU with gloo:
# nccl needs two GPUs, and tests/test_distributed.py compares against a CPU run.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-var/gpu-check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3)}"
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

run() {  # run NAME COMMAND...: time it, keep its output in $OUT/NAME.log
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    else
        echo "   FAILED (exit $?) in $((SECONDS - start)) s; tail:" | tee -a "$OUT/summary.txt"
        tail -n 30 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
        failed=1
    fi
}

: >"$OUT/summary.txt"
run devices nvidia-smi -L
run cuda-tests "$PYTHON" -m pytest -q -p no:cacheprovider -k "gpu" \
    tests/test_sft.py tests/test_dpo.py tests/test_ppo.py tests/test_rloo.py
run job-tests "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_generate.py tests/test_ppo_job.py tests/test_rloo_job.py tests/test_dpo_job.py \
    tests/test_sft_job.py tests/test_reward_job.py tests/test_loop.py
run bench-ppo "$PYTHON" bench/ppo.py
run bench-reward "$PYTHON" bench/reward_model.py --device cuda --backbone-config --limit 200
echo "logs in $OUT" | tee -a "$OUT/summary.txt"
exit $failed
