#!/bin/bash
# Every GPU benchmark of docs/performance.md, each under its own time limit, logs and JSON under
# $OUT. All of it takes longer than one device-tool call may (10 minutes), so run it as two:
#
#   bash bench/gpu_session.sh decode prefill state  # kernels, < 5 minutes
#   bash bench/gpu_session.sh engine server         # engine vs transformers, HTTP vs engine, < 7 minutes
#   bash bench/gpu_session.sh trace                 # the engine's steps behind the server in a burst, < 2 minutes
#
# On the device machine the Python packages it lacks travel as wheels in .whl (see
# ../.library/device/README.md); they are installed first when present.
set -u
OUT=${OUT:-/tmp/deltaserve-bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
sections=${*:-decode prefill engine server state}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"

run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    case " $sections " in *" $name "*) ;; *) return ;; esac
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "exit $?"
    grep -v " INFO \|draining\|^Writing" "$OUT/$name.log" | tail -30
}

run decode 100 python3 bench/kernels_decode.py
run prefill 140 python3 bench/kernels_prefill.py --det-repeats 3
run state 50 python3 bench/kernels_decode_state_dtype.py
run engine 230 python3 bench/engine.py --batches 1,32,128,512 --hf-batches 1,32,128 --check-dtypes bfloat16
run server 160 python3 bench/server_throughput.py --concurrency 64 256
# not in the default list: the engine's steps behind the server during one burst (bench/server_step_trace.py)
run trace 120 python3 bench/server_step_trace.py --concurrency 256 --show 60
