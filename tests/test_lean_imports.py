"""Every module imports on a machine without TensorRT, pycuda or CUDA, and touches none of them.

Runs in a fresh interpreter so modules imported by other tests do not hide an eager import.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("tensorrt", "tensorrt_bindings", "tensorrt_lean", "pycuda", "cuda", "cupy", "triton")

PROBE = r"""
import importlib, json, pkgutil, sys
failed, names = {}, []
for pkg in ("edge_sr", "calibrate", "runtime", "runtime.backends"):
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
            names.append(info.name)
        except Exception as e:  # report, do not stop
            failed[info.name] = f"{type(e).__name__}: {e}"
import torch
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"imported": names, "failed": failed, "heavy": heavy,
                  "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_all_modules_import_without_gpu_stack():
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}
    for must in ("runtime.backends.tensorrt", "runtime.backends.cuda", "runtime.lowbit",
                 "calibrate.export_plugin"):
        assert must in out["imported"]
    assert out["heavy"] == []
    assert out["cuda_initialized"] is False


def test_cli_help_works_and_stays_lean():
    probe = ("import sys, json; from edge_sr.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
             f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))\n"
             "print(json.dumps({'code': code, 'heavy': heavy}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Usage" in r.stdout and "profile" in r.stdout
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"code": 0, "heavy": []}
    r2 = subprocess.run([sys.executable, "-m", "edge_sr", "--help"], capture_output=True,
                        text=True, timeout=120)
    assert r2.returncode == 0 and "Usage" in r2.stdout
