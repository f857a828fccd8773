#!/usr/bin/env bash
# The GPU checks of issue 16, point 2, for a person on a CUDA machine; it prints the numbers for the notes.
#
#   1. a 7B-class model stored in bf16 does not fit a 12 GiB budget on cuda:0, gets a 4-bit rung, and serves;
#   2. two models share one GPU under a budget: both ready at once, their reservations within it;
#   3. vLLM starts with the --gpu-memory-utilization memserve computes, and the GPU memory NVML shows for its
#      process tree once it is ready is within 10% of the plan's reservation on that GPU.
#
# Needs: an NVIDIA GPU and driver (nvidia-smi), memserve installed with its GPU extras in this environment
# (pip install 'memserve[gpu]' for bitsandbytes, 'memserve[vllm]' for vLLM), and the models as local folders,
# HF cache ids or hub ids (downloaded on first use):
#   MODEL_7B     a 7B-class bf16 checkpoint      (default Qwen/Qwen2.5-7B-Instruct)
#   MODEL_SMALL  a small one for the second seat (default Qwen/Qwen2.5-0.5B-Instruct)
#   MEMSERVE     the memserve command            (default: memserve)
#   PYTHON       the Python that has memserve    (default: python)
#   BUDGET_12    the budget of check 1           (default 12GiB)
#   BUDGET_TWO   the budget of check 2           (default 20GiB)
#   LOAD_SECONDS how long a load may take        (default 1200)
# Usage: bash benchmarks/gpu_check.sh [1|2|3 ...]   (all three by default). Exit: 0 all passed, 1 a check
# failed, 2 this machine cannot run them.

set -euo pipefail

MODEL_7B=${MODEL_7B:-Qwen/Qwen2.5-7B-Instruct}
MODEL_SMALL=${MODEL_SMALL:-Qwen/Qwen2.5-0.5B-Instruct}
MEMSERVE=${MEMSERVE:-memserve}
PYTHON=${PYTHON:-python}
BUDGET_12=${BUDGET_12:-12GiB}
BUDGET_TWO=${BUDGET_TWO:-20GiB}
LOAD_SECONDS=${LOAD_SECONDS:-1200}
CHECKS=("${@:-1 2 3}")
WORK=$(mktemp -d -t memserve-gpu-check-XXXXXX)
FAILED=0
PIDS=()

cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null || true
    done
    sleep 2
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

cannot_run() {
    echo "gpu_check: cannot run here: $1" >&2
    echo "gpu_check: it needs an NVIDIA GPU with its driver (nvidia-smi), memserve with 'memserve[gpu]' and" >&2
    echo "           'memserve[vllm]' installed for \$PYTHON, and network access or cached models (MODEL_7B, MODEL_SMALL)." >&2
    exit 2
}

command -v nvidia-smi >/dev/null 2>&1 || cannot_run "no nvidia-smi on PATH (no NVIDIA driver, so no CUDA GPU)"
nvidia-smi -L >/dev/null 2>&1 || cannot_run "nvidia-smi finds no GPU"
command -v "$MEMSERVE" >/dev/null 2>&1 || cannot_run "no $MEMSERVE on PATH"
"$PYTHON" -c "import memserve" 2>/dev/null || cannot_run "$PYTHON cannot import memserve"

echo "== GPUs"
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader
echo "== memserve $("$MEMSERVE" --version 2>/dev/null || echo '?'), models: MODEL_7B=$MODEL_7B MODEL_SMALL=$MODEL_SMALL"

# The GPU memory NVML shows for a process and its descendants, in bytes, per GPU (memserve's own reading).
tree_gpu_bytes() {
    "$PYTHON" - "$1" <<'EOF'
import json, sys
import psutil
from memserve.memory.probe import GpuProcessMemory
from memserve.pool.runner_process import descendants
root = psutil.Process(int(sys.argv[1]))
print(json.dumps(GpuProcessMemory()([root.pid, *descendants(root)])))
EOF
}

wait_health() {  # URL, PID: until URL answers 200, the process is gone, or LOAD_SECONDS pass
    local deadline=$((SECONDS + LOAD_SECONDS))
    until curl -sf -o /dev/null "$1"; do
        kill -0 "$2" 2>/dev/null || { echo "   the process ended before $1 answered" >&2; return 1; }
        [ $SECONDS -lt $deadline ] || { echo "   $1 did not answer within $LOAD_SECONDS s" >&2; return 1; }
        sleep 1
    done
}

free_port() { "$PYTHON" -c "from memserve.pool.external import free_port; print(free_port())"; }

serve() {  # LOG, ARGS...: start memserve serve on a free port in its own group; sets ORIGIN and SERVE_PID
    local log=$1 port
    shift
    port=$(free_port)
    setsid "$MEMSERVE" serve --port "$port" --keep-alive -1 --log-level info "$@" >"$log" 2>&1 &
    SERVE_PID=$!
    PIDS+=("$SERVE_PID")
    ORIGIN="http://127.0.0.1:$port"
    wait_health "$ORIGIN/health" "$SERVE_PID" || { tail -20 "$log"; return 1; }
}

stop_serve() {
    kill -TERM -- "-$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
}

ask() {  # ORIGIN MODEL: one short chat; prints the answer's first words and the seconds it took
    local start=$SECONDS answer
    answer=$(curl -sf --max-time "$LOAD_SECONDS" "$1/v1/chat/completions" -H 'content-type: application/json' \
        -d "{\"model\": \"$2\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"}], \"max_tokens\": 16, \"temperature\": 0}") || return 1
    echo "   $2 answered in $((SECONDS - start)) s: $(echo "$answer" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"][:80]!r)')"
}

ps_rows() {  # ORIGIN: each model's rung, runner pid, reserved and measured bytes per device
    curl -sf "$1/api/ps" | "$PYTHON" -c '
import json, sys
from memserve.units import format_bytes
for row in json.load(sys.stdin)["models"]:
    devices = ", ".join(f"{d} reserved {format_bytes(v[\"reserved_bytes\"])} measured {format_bytes(v[\"measured_bytes\"])}" for d, v in row["devices"].items())
    print(f"   {row[\"name\"]}: {row[\"state\"]}, rung {row[\"rung\"]} ({row[\"dtype\"]} {row[\"quantization\"]}), pid {row[\"pid\"]}: {devices}")
'
}

result() {  # NAME OK(0/1) TEXT
    if [ "$2" = 0 ]; then echo "PASS check $1: $3"; else echo "FAIL check $1: $3"; FAILED=1; fi
}

check_1() {
    echo "== check 1: $MODEL_7B under cuda:0=$BUDGET_12 gets a 4-bit rung and serves"
    "$MEMSERVE" fit "$MODEL_7B" --memory "cuda:0=$BUDGET_12" --context 4096 --json >"$WORK/fit1.json" || true
    local rung
    rung=$("$PYTHON" -c "import json; d=json.load(open('$WORK/fit1.json')); p=d['plan']; print(p['rung'] if p else 'none', p and p['quantization'], p and p.get('runner'), p and {k: v['total_bytes'] for k, v in p['devices'].items()})") || rung="none (fit failed: $(head -c 300 "$WORK/fit1.json"))"
    echo "   plan: $rung"
    case "$rung" in *4bit*) ;; *) result 1 1 "the plan is not a 4-bit rung: $rung"; return ;; esac
    serve "$WORK/serve1.log" --model "big=$MODEL_7B" --memory "cuda:0=$BUDGET_12" || { result 1 1 "the gateway did not start"; return; }
    if ask "$ORIGIN" big; then
        ps_rows "$ORIGIN" || true
        result 1 0 "served on a 4-bit rung under $BUDGET_12"
    else
        tail -20 "$WORK/serve1.log"
        result 1 1 "the request failed"
    fi
    stop_serve
}

check_2() {
    echo "== check 2: $MODEL_7B and $MODEL_SMALL share cuda:0 under cuda:0=$BUDGET_TWO"
    serve "$WORK/serve2.log" --model "big=$MODEL_7B" --model "small=$MODEL_SMALL" --memory "cuda:0=$BUDGET_TWO" \
        || { result 2 1 "the gateway did not start"; return; }
    if ask "$ORIGIN" big && ask "$ORIGIN" small && ask "$ORIGIN" big; then
        ps_rows "$ORIGIN" || true
        local both
        both=$(curl -sf "$ORIGIN/api/ps" | "$PYTHON" -c '
import json, sys
from memserve.units import parse_bytes
rows = json.load(sys.stdin)["models"]
ready = [r for r in rows if r["state"] == "ready"]
held = sum(r["devices"].get("cuda:0", {}).get("reserved_bytes", 0) for r in ready)
budget = parse_bytes(sys.argv[1])
print(f"{len(ready)} {held} {budget}")
' "$BUDGET_TWO")
        read -r ready held budget <<<"$both"
        echo "   ready at once: $ready; reserved on cuda:0: $held of $budget bytes"
        [ "$ready" = 2 ] && [ "$held" -le "$budget" ] && result 2 0 "both ready on one GPU within the budget" \
            || result 2 1 "not both ready within the budget (one was evicted, or the books exceed it)"
    else
        tail -20 "$WORK/serve2.log"
        result 2 1 "a request failed"
    fi
    stop_serve
}

check_3() {
    echo "== check 3: vLLM with memserve's --gpu-memory-utilization, NVML after ready against the plan"
    "$PYTHON" -c "import vllm" 2>/dev/null || command -v vllm >/dev/null 2>&1 || [ -n "${MEMSERVE_VLLM_COMMAND:-}" ] \
        || { result 3 1 "vLLM is not installed: pip install 'memserve[vllm]'"; return; }
    local port
    port=$(free_port)
    "$PYTHON" - "$MODEL_7B" "$port" >"$WORK/vllm.json" <<'EOF' || { result 3 1 "no vLLM plan fits (see above)"; return; }
import json, sys
from memserve.engines.vllm import arguments, with_vllm
from memserve.engines.fit import fit_result
from memserve.memory.fit import PlanFile
from memserve.memory.planner import Policy
from memserve.memory.probe import probe_inventory

model, port = sys.argv[1], int(sys.argv[2])
inventory = probe_inventory()
facts, request, result = fit_result(model, context=4096, concurrency=8, inventory=inventory)
result = with_vllm(facts, request, inventory, Policy(), result, runner="vllm")
if result.plan is None:
    print(result.nofit.message if result.nofit else "no plan", file=sys.stderr)
    sys.exit(1)
plan = result.plan
argv = arguments("check", PlanFile(facts.source, plan), host="127.0.0.1", port=port,
                 total_bytes={d.name: d.total_bytes for d in inventory.gpus})
print(json.dumps({"argv": argv, "rung": plan.rung, "planned": {d: n.to_json() for d, n in plan.devices.items()}}))
EOF
    "$PYTHON" -c "
import json
from memserve.units import format_bytes
d = json.load(open('$WORK/vllm.json'))
print('   rung', d['rung'])
for dev, n in d['planned'].items():
    print(f'   plan {dev}: ' + ', '.join(f'{k[:-6]} {format_bytes(v)}' for k, v in n.items() if k.endswith('_bytes')))
print('   argv:', ' '.join(d['argv']))
"
    mapfile -t argv < <("$PYTHON" -c "import json; print('\n'.join(json.load(open('$WORK/vllm.json'))['argv']))")
    setsid "${argv[@]}" >"$WORK/vllm.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local start=$SECONDS
    wait_health "http://127.0.0.1:$port/health" "$pid" || { tail -30 "$WORK/vllm.log"; result 3 1 "vLLM did not become ready"; return; }
    echo "   ready after $((SECONDS - start)) s"
    curl -sf "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"model": "check", "prompt": "Hello", "max_tokens": 32}' >/dev/null || echo "   (the request failed)"
    local measured
    measured=$(tree_gpu_bytes "$pid") || measured='{}'
    grep -E "KV cache|CUDAGraph|graph capturing|Model loading took|memory profiling" "$WORK/vllm.log" | tail -6 | sed 's/^/   vllm: /' || true
    local status=0
    "$PYTHON" - "$WORK/vllm.json" "$measured" <<'EOF' || status=$?
import json, sys
from memserve.units import format_bytes
planned = json.load(open(sys.argv[1]))["planned"]
measured = json.loads(sys.argv[2])
ok = bool(measured)
for device, need in planned.items():
    if not device.startswith("cuda"):
        continue
    got, want = measured.get(device, 0), need["total_bytes"]
    ratio = got / want if want else float("inf")
    ok = ok and 0.9 <= ratio <= 1.1
    print(f"   {device}: NVML {format_bytes(got)} vs plan {format_bytes(want)}: measured/plan = {ratio:.3f}")
sys.exit(0 if ok else 1)
EOF
    result 3 "$status" "NVML after ready within 10% of the plan"
    kill -TERM -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

for check in ${CHECKS[*]}; do
    case "$check" in
        1) check_1 ;;
        2) check_2 ;;
        3) check_3 ;;
        *) echo "unknown check $check (1, 2 or 3)" >&2; exit 2 ;;
    esac
done
exit $FAILED
