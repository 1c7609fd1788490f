"""Make the issue-16 input cases and FP32 engines of the reference checkpoints (docs/results/inputs.md).

Run: python scripts/make_input_cases.py [DIR]   (default /tmp/issue16; needs EDGE_SR_DATA)
Writes DIR/cases/* (the smallest case of each row) and DIR/engine-x{2,3} (the reference
SwinIR-light x2/x3 exported in FP32 at 64x64 tiles, as tests/test_upscale.py does, since
`edge-sr build` always calibrates).
"""
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import ExifTags, Image

from edge_sr.checkpoints import load_model, read_checkpoint
from edge_sr.models.state_dict import unwrap_state_dict
from edge_sr.onnx_export import export_fp_onnx
from runtime.engine import FP32_FILE, MODEL_FILE, Manifest, file_entry, write_manifest

torch.set_num_threads(1)
D = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/issue16")
C = D / "cases"
C.mkdir(parents=True, exist_ok=True)

for s in (2, 3):
    e = D / f"engine-x{s}"
    if not (e / "manifest.json").exists():
        e.mkdir(exist_ok=True)
        m = load_model(f"swinir-light-x{s}-ref").model
        export_fp_onnx(m, e / MODEL_FILE, tile=(64, 64))
        export_fp_onnx(m, e / FP32_FILE, tile=(64, 64))
        write_manifest(e, Manifest(name=f"ref-x{s}-fp32", model={"name": f"swinir-light-x{s}-ref"},
                                   scale=s, bits=None, backend="onnxruntime", tile=[64, 64],
                                   batch=1, overlap=16, precision="fp32",
                                   files={"model": file_entry(e, MODEL_FILE),
                                          "fp32": file_entry(e, FP32_FILE)}))

# 1: 48x32 JPEG stored sideways, Orientation 6 (upright it is 32x48: red top, blue bottom)
up = np.zeros((48, 32, 3), np.uint8)
up[:24] = (200, 30, 30)
up[24:] = (30, 30, 200)
ex = Image.Exif()
ex[ExifTags.Base.Orientation] = 6
Image.fromarray(up).transpose(Image.Transpose.ROTATE_90).save(C / "sideways.jpg", exif=ex,
                                                               quality=95)
# 2: RGBA 48x40, left 16 columns alpha 0 over pure green
rng = np.random.default_rng(0)
rgba = np.concatenate([np.full((40, 48, 3), (120, 90, 60), np.uint8),
                       np.full((40, 48, 1), 255, np.uint8)], axis=2)
rgba[:, :16] = (0, 255, 0, 0)
Image.fromarray(rgba, "RGBA").save(C / "cutout.png")
# 3: grey 16-bit PNG, values 0..200
Image.fromarray(rng.integers(0, 201, (40, 48), dtype=np.uint16)).save(C / "dark16.png")
# 4: float32 TIFF in [0, 1]
Image.fromarray(rng.random((40, 48), dtype=np.float32), "F").save(C / "float.tif")
# 5, 6: eval folders
for name, (w, h) in {"Tiny": (14, 14), "Thin": (200, 6)}.items():
    (C / name / "HR").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(C / name / "HR" / "a.png")
Image.fromarray(rng.integers(0, 256, (3, 100, 3), dtype=np.uint8)).save(C / "thin.png")
# 7: 61x45 MJPEG AVI at 24000/1001 fps
wr = cv2.VideoWriter(str(C / "odd.avi"), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 24,
                     (61, 45))
for i in range(5):
    wr.write(np.full((45, 61, 3), 40 * i + 20, np.uint8))
wr.release()
b = bytearray((C / "odd.avi").read_bytes())
i = b.index(b"strh") + 8
b[i + 20:i + 28] = struct.pack("<II", 1001, 24000)
i = b.index(b"avih") + 8
b[i:i + 4] = struct.pack("<I", 41708)
(C / "odd.avi").write_bytes(bytes(b))
# 8: the reference x2 state dict in three wrappers
from safetensors.torch import save_file  # noqa: E402

from edge_sr.paths import data_root  # noqa: E402

sd = unwrap_state_dict(read_checkpoint(data_root() / "models" / "swinir_light_x2_ref.pth"))
torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, C / "compiled.pth")
torch.save({"model_state_dict": sd, "epoch": 10}, C / "training.pth")
save_file(sd, str(C / "ref_x2.safetensors"))
print("ok")
