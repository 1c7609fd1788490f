#!/usr/bin/env bash
# The prepared check for a lent GPU machine with TensorRT (issue 6; the trt grid since issue 18),
# <= 8 minutes in total. Without TensorRT, scripts/gpu_session.sh is the one to run (issues 18/19).
#   1. TensorRT presence (python module, libnvinfer, trtexec)
#   2. build the esr_lowbit kernels for this GPU and run their self-test + the GPU pytest cases
#   3. profile x2 SwinIR-light W8A8 / W4A4 (kernels) against FP16 / FP32 on a 256x256 LR tile
#   4. where TensorRT exists: FP16, INT8 (W8A8) and W4A4 engines, output PSNR against ONNX Runtime
# Results go under $OUT (default results/gpu_check): summary.json, log.txt and one file per step.
# Usage (repo root): OUT=/tmp/out bash scripts/gpu_check.sh      PY=python3 picks the interpreter.
# Every step has its own timeout and failure is recorded, never fatal.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 EDGE_SR_OFFLINE=1
START=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/log.txt"; }
step() {  # step NAME TIMEOUT CMD...: run, keep its output, record the exit status
  local name=$1 limit=$2; shift 2
  log "step $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name $rc" >>"$OUT/status.txt"
  log "step $name -> rc=$rc"; tail -n 5 "$OUT/$name.txt" | sed 's/^/    /' | tee -a "$OUT/log.txt"
  return $rc
}

# ---- 0. the machine --------------------------------------------------------------------------
step machine 30 bash -c 'nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv; nvcc --version; '"$PY"' -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"'
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
CC=${CC:-80}

# ---- 1. TensorRT presence ------------------------------------------------------------------------
step tensorrt 60 bash -c "$PY -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)'; echo \"python rc=\$?\"; ldconfig -p | grep -i nvinfer; echo \"ldconfig rc=\$?\"; which trtexec; echo \"trtexec rc=\$?\"; $PY -c 'import cuda.bindings; print(\"cuda-python ok\")'"
HAVE_TRT=0; $PY -c "import tensorrt" >/dev/null 2>&1 && HAVE_TRT=1

# ---- 2. kernels ------------------------------------------------------------------------------------
step kernels_build 240 bash -c "cmake -S runtime/kernels -B build/kernels -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=$CC && cmake --build build/kernels -j8"
step kernels_selftest 60 ./build/kernels/esr_lowbit_test
step kernels_pytest 240 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_backends.py -rs

# ---- 3. CUDA-backend profile -----------------------------------------------------------------------
step profile_cuda 240 $PY - "$OUT" <<'PYEOF'
import json, sys, torch
from edge_sr.models.swinir import SwinIRLight
from runtime.backends.cuda import latency_student, profile_cuda
torch.manual_seed(0)
fp = SwinIRLight(2).eval()  # random weights: latency does not depend on them
students = {"w8a8": latency_student(fp, 8), "w4a4": latency_student(fp, 4)}
rows = profile_cuda(fp, students, input_size=(256, 256), batch=1, runs=30, warmup=5)
json.dump({"note": "SwinIR-light x2, random weights, latency-only bounds, 256x256 LR tile",
           "rows": rows}, open(f"{sys.argv[1]}/profile_cuda.json", "w"), indent=2)
for r in rows:
    print(f"{r['precision']:6s} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
          f"{r['throughput_fps']:7.1f} fps  peak {r['peak_mem_mib']:7.0f} MiB  "
          f"x{r.get('ratio_vs_fp16', 0):.2f} vs fp16  x{r.get('ratio_vs_fp32', 0):.2f} vs fp32  {r['device']}")
PYEOF

# ---- 4. TensorRT engines (only where TensorRT exists) -----------------------------------------------
if [ "$HAVE_TRT" = 1 ]; then
  step tensorrt_engines 300 $PY - "$OUT" <<'PYEOF'
import json, sys, numpy as np, onnx, torch
from calibrate.export_qdq import ExportConfig, build_qdq
from edge_sr.models.swinir import SwinIRLight
from runtime.backends.cuda import latency_student
from runtime.backends.tensorrt import BuildConfig, TensorRTBackend, build_engine
import onnxruntime as ort
out = sys.argv[1]
torch.manual_seed(0)
fp = SwinIRLight(2).eval()
tile, results = (64, 64), {}
graphs = {}
for name, bits in (("int8_w8a8", 8), ("w4a4", 4)):
    # the trt grid (symmetric weights, integer zero points): plain Q/DQ, no correction terms
    proto, _ = build_qdq(latency_student(fp, bits, grid="trt"), ExportConfig(target="trt", tile=tile))
    graphs[name] = proto
x = torch.rand(1, 3, *tile)
torch.onnx.export(fp, x, f"{out}/fp32.onnx", input_names=["lr"], output_names=["sr"], opset_version=17, dynamo=False)
graphs["fp16"] = onnx.load(f"{out}/fp32.onnx")
data = np.random.default_rng(0).random((4, 3, *tile), dtype=np.float32)
for name, proto in graphs.items():
    path = f"{out}/{name}.onnx"; onnx.save(proto, path)
    try:
        facts = build_engine(path, f"{out}/{name}.engine", BuildConfig(timing_cache=f"{out}/timing.cache"))
        be = TensorRTBackend(f"{out}/{name}.engine")
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        ref = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: d[None]})[0] for d in data])
        got = be.run(data)
        mse = float(np.mean((np.clip(got, 0, 1) - np.clip(ref, 0, 1)) ** 2))
        results[name] = {"psnr_vs_ort_db": 10 * np.log10(1 / max(mse, 1e-12)), **facts}
    except Exception as e:  # record and go on
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(name, results[name])
json.dump(results, open(f"{out}/tensorrt_engines.json", "w"), indent=2, default=str)
PYEOF
else
  log "TensorRT not present: engine builds skipped (step 4 of the acceptance awaits a TensorRT machine)"
  echo "tensorrt_engines skipped" >>"$OUT/status.txt"
fi

$PY - "$OUT" "$HAVE_TRT" "$START" <<'PYEOF'
import json, sys, time, pathlib
out = pathlib.Path(sys.argv[1])
status = dict(line.split(maxsplit=1) for line in (out / "status.txt").read_text().splitlines())
summary = {"tensorrt_present": sys.argv[2] == "1", "steps": status,
           "seconds": round(time.time() - int(sys.argv[3]), 1)}
for f in ("profile_cuda.json", "tensorrt_engines.json"):
    if (out / f).is_file():
        summary[f[:-5]] = json.loads((out / f).read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps(summary["steps"]))
PYEOF
log "done"
