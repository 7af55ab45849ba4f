#!/usr/bin/env bash
# The GPU checks, as one prepared call for a machine with CUDA (the device machine lent to
# some sessions; its image has torch, transformers, accelerate and peft, and no network):
#
#   scripts/gpu-wheels.sh           # here, first: the other dependencies as wheels in .whl
#   scripts/gpu-check.sh            # there, with .whl carried: logs under ${OUT:-./var/gpu-check}
#
# In order, each part under its own time limit (the whole stays under ~9 minutes, inside one
# 10-minute call), the benchmarks first since they need nothing but torch and transformers:
# 1. bench/ppo.py (~0.5B policy, bf16: MFU and the step's split), at the default batch and at
#    a larger one (generation's share of the step falls as the batch grows);
# 2. the tests that run only with CUDA (bf16 autocast, gradient checkpointing: SFT, DPO, PPO,
#    RLOO; `-k gpu`);
# 3. the reward model against TRL on a backbone built from config, and RLOO against TRL's
#    RLOOTrainer on a ~0.5B policy;
# 4. the job and loop tests, whose worker picks cuda by itself (SQLite: no PostgreSQL there).
# Each part's output goes to its own log; a part that fails or runs out of time does not stop
# the others, and the script exits non-zero if any failed. (The data-parallel tests stay on
# CPU with gloo: nccl needs two GPUs, and tests/test_distributed.py compares against a CPU run.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-var/gpu-check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3)}"
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The wheels of scripts/gpu-wheels.sh, beside the image's packages, where they are missing.
if [ -d .whl ] && ! "$PYTHON" -c "import fastapi, sqlalchemy" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=0

run() {  # run NAME SECONDS COMMAND...: time it, keep its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    else
        echo "   FAILED (exit $?) in $((SECONDS - start)) s; tail:" | tee -a "$OUT/summary.txt"
        tail -n 30 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
        failed=1
    fi
}

: >"$OUT/summary.txt"
run devices 20 nvidia-smi -L
run bench-ppo 120 "$PYTHON" bench/ppo.py
run bench-ppo-large 120 "$PYTHON" bench/ppo.py --batch 256 --minibatch 64 --micro-batch 16 \
    --forward-batch 128 --steps 3
run cuda-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -k "gpu" \
    tests/test_sft.py tests/test_dpo.py tests/test_ppo.py tests/test_rloo.py
run bench-reward 60 "$PYTHON" bench/reward_model.py --device cuda --backbone-config --limit 200
run bench-rloo 60 "$PYTHON" bench/rloo.py --steps 4
run job-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -x \
    tests/test_generate.py tests/test_ppo_job.py tests/test_rloo_job.py tests/test_dpo_job.py \
    tests/test_sft_job.py tests/test_reward_job.py tests/test_loop.py
echo "logs in $OUT" | tee -a "$OUT/summary.txt"
exit $failed
