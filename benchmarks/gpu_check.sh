#!/usr/bin/env bash
# The device check (issue 23): Esper on one CUDA GPU, within 8 minutes. Run from the repository root of a
# checkout whose Python environment is at .venv (or GPU_CHECK_PYTHON=/path/to/python; not an ESPER_
# variable: esper refuses unknown ones), with a CUDA build of torch in it:
#
#     bash benchmarks/gpu_check.sh
#
# Steps, each under its own time limit and all under one deadline (GPU_CHECK_BUDGET_S, 450 s):
#   tests     the device tests (tests/*/test_device.py; the CUDA-only ones run here)
#   digits    esper run --device cuda on digits (2 epochs)
#   tokens    esper run --device cuda on the token task (1 epoch)
#   tamiyo    benchmarks/tamiyo_latency.py --device cuda: eager and CUDA graph, then compiled (P2's warm-up)
#   overhead  benchmarks/run_overhead.py --device cuda (digits:mlp, 1 repeat, 2 epochs)
# Every step's output is kept under $OUT (or a temporary folder). The last line of stdout is one JSON object:
# the machine, each step's status, Tamiyo's p99 at the medium size per mode against the 5 ms budget, and the
# compile warm-up time. Without a GPU (or without CUDA in torch) it prints a JSON object that says so and
# exits 3; a failed step makes the exit status 1.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
WORK=${OUT:-$(mktemp -d)}
mkdir -p "$WORK"
PY=${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
# cuda (what the check is for); `auto` rehearses the script on a machine without a GPU (the steps run on
# the CPU and the JSON says so).
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export ESPER_DATA_DIR=$WORK/data
export PYTHONUNBUFFERED=1

if [ ! -x "$PY" ]; then
    printf '{"check": "gpu", "ok": false, "gpu": null, "reason": "no Python at %s (set GPU_CHECK_PYTHON)"}\n' "$PY"
    exit 3
fi
# What torch sees: a CPU build of torch, or no device, ends the check here.
if ! "$PY" - "$DEVICE" >"$WORK/probe.json" 2>"$WORK/probe.err" <<'EOF'
import json, sys
import torch
found = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if found["available"]:
    found["gpu"] = torch.cuda.get_device_name(0)
    found["devices"] = torch.cuda.device_count()
print(json.dumps(found))
sys.exit(0 if found["available"] or sys.argv[1] == "auto" else 3)
EOF
then
    "$PY" - "$WORK/probe.json" "$WORK/probe.err" <<'EOF'
import json, sys
try:
    probe = json.loads(open(sys.argv[1]).read() or "{}")
except ValueError:
    probe = {}
if not probe:
    errors = open(sys.argv[2]).read().strip().splitlines()
    reason = "torch could not be imported: " + (errors[-1] if errors else "no output")
elif probe.get("torch_cuda") is None:
    reason = f"torch {probe['torch']} is a CPU build: no CUDA in this environment"
else:
    reason = f"torch {probe['torch']} (CUDA {probe['torch_cuda']}) sees no CUDA device"
print(json.dumps({"check": "gpu", "ok": False, "gpu": None, "reason": reason, **probe}))
EOF
    exit 3
fi

STATUS_FILE=$WORK/steps.tsv
: >"$STATUS_FILE"
# step NAME LIMIT_S COMMAND...: runs COMMAND for at most LIMIT_S (and what is left of the budget).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped\t0\n' "$name" >>"$STATUS_FILE"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STATUS_FILE"
    echo "== $name: exit $rc in $((SECONDS - start)) s" >&2
}

step tests 90 "$PY" -m pytest -q -p no:cacheprovider \
    tests/kasmina/test_device.py tests/tolaria/test_device.py tests/tamiyo/test_device.py
step digits 60 "$PY" -c "from esper.cli import main; main()" run --device "$DEVICE" --task digits --host mlp \
    --epochs 2 --run-dir "$WORK/runs/digits" --no-progress --no-report
step tokens 75 "$PY" -c "from esper.cli import main; main()" run --device "$DEVICE" --task tokens --host transformer \
    --epochs 1 --run-dir "$WORK/runs/tokens" --no-progress --no-report
step tamiyo 100 "$PY" benchmarks/tamiyo_latency.py --device "$DEVICE" --modes eager cuda_graph \
    --decisions 200 --warmup 20
step tamiyo_compiled 150 "$PY" benchmarks/tamiyo_latency.py --device "$DEVICE" --modes compiled \
    --decisions 200 --warmup 20
step overhead 90 "$PY" benchmarks/run_overhead.py --device "$DEVICE" --cases digits:mlp --repeats 1 --epochs 2

"$PY" - "$WORK" "$SECONDS" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

work, elapsed, device = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
probe = json.loads((work / "probe.json").read_text())


def last_json(name):
    try:
        lines = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def tail(name, n=3):
    try:
        return (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-n:]
    except OSError:
        return []


steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps[name] = {"status": "ok" if rc == "0" else ("timeout" if rc in ("124", "137") else
                                                     ("skipped" if rc == "skipped" else f"exit {rc}")),
                   "seconds": int(seconds)}
    if steps[name]["status"] != "ok":
        steps[name]["tail"] = tail(name)
steps.get("tests", {})["result"] = (tail("tests", 1) or [""])[0]
for run in ("digits", "tokens"):
    summary = work / "runs" / run / "summary.json"
    if run in steps and summary.exists():
        data = json.loads(summary.read_text())
        steps[run].update({k: data.get(k) for k in ("final_val_accuracy", "steps", "wall_seconds")})
        steps[run]["run_status"] = data.get("status")
tamiyo = {}
for name in ("tamiyo", "tamiyo_compiled"):
    found = last_json(name) or {}
    for mode in ("eager", "cuda_graph", "compiled"):
        if mode in found and "error" in found[mode]:
            tamiyo[mode] = found[mode]
        elif mode in found:
            figures = found[mode]
            tamiyo[mode] = {
                "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
                "within_budget": figures["within_budget"],
                "compile": figures["compile"], "plan": figures["plan"],
            }
overhead = last_json("overhead")
result = {
    "check": "gpu",
    "device": device,
    "gpu": probe.get("gpu"),
    "torch": probe.get("torch"),
    "torch_cuda": probe.get("torch_cuda"),
    "budget_ms": 5.0,
    "seconds": elapsed,
    "steps": steps,
    "tamiyo_medium": tamiyo,
    "tamiyo_p99_ms": {mode: figures.get("p99_ms") for mode, figures in tamiyo.items()},
    "compile_warm_ms": tamiyo.get("compiled", {}).get("compile", {}).get("warm_ms"),
    "compile_fallbacks": tamiyo.get("compiled", {}).get("compile", {}).get("fallbacks"),
    "cuda_graph": tamiyo.get("cuda_graph", {}).get("plan", {}).get("capture"),
    "run_overhead": None if overhead is None else [
        {k: case.get(k) for k in ("case", "esper_vs_plain_median", "wait_vs_plain_median", "steps")}
        for case in overhead.get("cases", [])
    ],
}
result["ok"] = all(step["status"] == "ok" for step in steps.values())
print(json.dumps(result, sort_keys=True))
sys.exit(0 if result["ok"] else 1)
EOF
