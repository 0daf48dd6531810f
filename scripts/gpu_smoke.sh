#!/usr/bin/env bash
# One command that proves every CUDA path of TicketSmith on a GPU machine (minutes on one GPU).
#
#   scripts/gpu_smoke.sh                      # on CUDA; summary in gpu_smoke/summary.json
#   scripts/gpu_smoke.sh --device cpu         # the same steps on the CPU (a dry run, CI)
#   scripts/gpu_smoke.sh --out DIR --formats dense,fp16 --iterations 60
#   scripts/gpu_smoke.sh --device cpu --quick # seconds: fewer steps, no conv net, no train_loop
#
# Steps, each logged to DIR/<step>.log:
#   environment   torch, CUDA, driver, GPU name and capability, cuSPARSELt version
#   gpu_tests     the tests marked `gpu` (skipped on --device cpu)
#   determinism   tiny experiments (an MLP and a conv net) run twice: identical checkpoints
#   benchmark     `ticketsmith benchmark` of a 2:4 ticket with every format of the device
#   train_loop    benchmarks/train_loop.py on the device (synthetic data)
#   serving       the ticket loaded for serving on the device; outputs match the CPU's; its
#                 deployable serving plan (what the registry ships) built and checked too
# Ends with DIR/summary.json and one line: "gpu smoke: PASS|FAIL (...)"; exit 0 only on PASS.
set -uo pipefail

DEVICE=cuda
OUT=gpu_smoke
FORMATS=""            # empty: every format that runs on the device
ITERATIONS=200        # training steps of each tiny experiment
QUICK=0
PYTHON="${PYTHON:-python}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="${2:-}"; shift 2 ;;
    --out) OUT="${2:-}"; shift 2 ;;
    --formats) FORMATS="${2:-}"; shift 2 ;;
    --iterations) ITERATIONS="${2:-}"; shift 2 ;;
    --quick) QUICK=1; ITERATIONS=20; shift ;;
    -h|--help) usage ;;
    *) echo "gpu_smoke.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "gpu_smoke.sh: --device must be cpu or cuda" >&2; exit 2 ;; esac
[[ "$ITERATIONS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_smoke.sh: --iterations must be a positive integer" >&2; exit 2; }

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
cd "$REPO" || exit 2
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"   # never the checkout's own store

# step NAME COMMAND...: run it, log to $OUT/NAME.log, append "NAME rc seconds" to steps.tsv.
step() {
  local name="$1" start rc
  shift
  start=$SECONDS
  echo "[gpu smoke] $name ..." >&2
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS"
  [[ $rc == 0 ]] || echo "[gpu smoke] $name failed (exit $rc): see $OUT/$name.log" >&2
}

environment() {
  "$PYTHON" - "$DEVICE" "$OUT/environment.json" <<'EOF'
import json, subprocess, sys
import torch
device, path = sys.argv[1], sys.argv[2]
env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    env.update(gpu=torch.cuda.get_device_name(0),
               capability=".".join(map(str, torch.cuda.get_device_capability(0))),
               cusparselt=torch.backends.cusparselt.version()
               if torch.backends.cusparselt.is_available() else None)
    try:
        env["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip() or None
    except OSError:
        env["driver"] = None
print(json.dumps(env, indent=2))
open(path, "w").write(json.dumps(env))
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device: torch %s (CUDA %s) needs an R580+ driver" % (torch.__version__, torch.version.cuda))
EOF
}

gpu_tests() {
  if [[ "$DEVICE" != cuda ]]; then
    echo "skipped: --device $DEVICE"
    return 0
  fi
  "$PYTHON" -m pytest -q -m gpu tests
}

# experiment NAME [--set ...]: the tiny experiment on the device, no tracking, into $OUT/NAME.
experiment() {
  local name="$1"
  shift
  "$PYTHON" -m ticketsmith prune --config configs/tiny.yaml --no-tracking --quiet \
    --set "experiment.output_dir=$OUT/$name" --set "train.device=$DEVICE" \
    --set "train.iterations=$ITERATIONS" --set prune.levels=2 --set train.determinism=strict "$@"
}

MLP=(--set "model.options={hidden: [256]}" --set "data.options={n_train: 1200, n_test: 400, image_size: 16, num_classes: 4}" --set prune.pattern=2:4)
CONV=(--set model.name=conv2 --set "model.options={}" --set "data.options={n_train: 600, n_test: 200, image_size: 16, num_classes: 4, channels: 3}")

determinism() {
  local nets=(mlp conv)
  [[ "$QUICK" == 1 ]] && nets=(mlp)
  experiment mlp_a "${MLP[@]}" && experiment mlp_b "${MLP[@]}" || return
  if [[ "$QUICK" != 1 ]]; then
    experiment conv_a "${CONV[@]}" && experiment conv_b "${CONV[@]}" || return
  fi
  "$PYTHON" - "$OUT" "${nets[@]}" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
for net in sys.argv[2:]:
    a = sorted((out / f"{net}_a").rglob("checkpoint.safetensors"))
    b = sorted((out / f"{net}_b").rglob("checkpoint.safetensors"))
    assert a and len(a) == len(b), f"{net}: {len(a)} vs {len(b)} checkpoints"
    for x, y in zip(a, b):
        tx, ty = load_file(x), load_file(y)
        same = tx.keys() == ty.keys() and all(tx[k].equal(ty[k]) for k in tx)
        assert same, f"{net}: {x.relative_to(out)} differs between two identical runs"
    print(f"{net}: {len(a)} checkpoints identical across two runs")
EOF
}

ticket() {  # the 2:4 MLP's last ticket
  find "$OUT/mlp_a" -path '*level_2/ticket/checkpoint.safetensors' | head -n 1
}

benchmark() {
  local args=(--checkpoint "$(ticket)" --device "$DEVICE" --quick --no-data
              --batch-sizes "1,256" --output "$OUT/benchmark.json")
  [[ -n "$FORMATS" ]] && args+=(--formats "$FORMATS")
  "$PYTHON" -m ticketsmith benchmark "${args[@]}" || return
  "$PYTHON" - "$OUT/benchmark.json" "$DEVICE" <<'EOF'
import json, sys
result, device = json.load(open(sys.argv[1])), sys.argv[2]
timed = {r["format"] for r in result["results"] if r["correct"]}
failed = {r["format"]: r["error"] for r in result["results"] if not r["correct"]}
print("timed:", sorted(timed), "not timed:", failed)
if device == "cuda":
    missing = {"fp16", "bf16", "semi_structured_2:4", "csr"} - timed
    assert not missing, f"CUDA formats not timed: {sorted(missing)}: {failed}"
EOF
}

train_loop() {
  if [[ "$QUICK" == 1 ]]; then
    echo "skipped: --quick"
    return 0
  fi
  "$PYTHON" benchmarks/train_loop.py --data synthetic --device "$DEVICE" --repeats 3
}

serving() {
  "$PYTHON" - "$(ticket)" "$DEVICE" "$OUT/serving_plan" <<'EOF'
import sys
import torch
from ticketsmith.checkpoint import model_from_checkpoint
from ticketsmith.serving.plan.build import build_plan
from ticketsmith.serving.plan.check import check_plan
from ticketsmith.serving.plan.runtime import load_plan
path, device, plan_dir = sys.argv[1], sys.argv[2], sys.argv[3]
model = model_from_checkpoint(path, device)[0]
reference = model_from_checkpoint(path, "cpu")[0]
x = torch.randn(64, *model_from_checkpoint(path)[2]["input_shape"])
with torch.inference_mode():
    out, ref = model(x.to(device)).cpu(), reference(x)
err = float((out - ref).abs().max())
print(f"ticket served on {device}: max |logit - cpu logit| = {err:.2e}")
assert err <= 1e-3 * max(1.0, float(ref.abs().max())), err
build_plan(reference, model_from_checkpoint(path)[2], plan_dir)
check = check_plan(plan_dir, reference, x)
served = load_plan(plan_dir).logits(x.numpy())
print(f"serving plan: routes {', '.join(check['routes'])} match the masked model "
      f"(max |diff| {check['max_abs_error']:.2e}, argmax agreement {check['argmax_agreement']:.0%})")
assert abs(served - ref.numpy()).max() <= 1e-3 * max(1.0, float(ref.abs().max()))
EOF
}

step environment environment
if grep -q $'^environment\t0\t' "$STEPS"; then   # without the device nothing else can run
  step gpu_tests gpu_tests
  step determinism determinism
  step benchmark benchmark
  step train_loop train_loop
  step serving serving
fi

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
    steps[name] = {"ok": rc == "0", "exit_code": int(rc), "seconds": int(seconds),
                   "last_line": log[-1] if log else ""}
env_path = out / "environment.json"
env = json.loads(env_path.read_text()) if env_path.is_file() else {}
ok = all(s["ok"] for s in steps.values())
summary = {"verdict": "PASS" if ok else "FAIL", "environment": env, "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
failed = [n for n, s in steps.items() if not s["ok"]]
where = env.get("gpu") or env.get("device")
print(f"gpu smoke: {summary['verdict']} ({len(steps) - len(failed)}/{len(steps)} steps ok"
      + (f"; failed: {', '.join(failed)}" if failed else "")
      + f") on {where}, torch {env.get('torch')}, CUDA {env.get('cuda')}, driver "
      f"{env.get('driver')}; {out / 'summary.json'}")
sys.exit(0 if ok else 1)
EOF
