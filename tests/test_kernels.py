"""esr_lowbit: packing, the pure-PyTorch reference of the low-bit linear, nvcc compilation, and
(on a CUDA GPU only) the kernels against PyTorch's fake-quant model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from calibrate.qmodules import QuantLinear
from calibrate.quantizer import fake_quant_nograd
from edge_sr.paths import REPO_ROOT
from runtime import lowbit as lb

KERNELS = REPO_ROOT / "runtime" / "kernels"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists()
                                else None)
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")


def _quant_linear(bits: int, groups: int, shared: bool, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    out = 36 if groups == 3 else 24
    q = QuantLinear(nn.Linear(20, out), bits, groups=groups, shared_input=shared)
    for i, aq in enumerate(q.act_quantizers):
        aq.set_bounds(-1.1 - 0.13 * i, 1.3 + 0.21 * i)
    for i, (wq, w) in enumerate(zip(q.weight_quantizers, q.weight_blocks())):
        wq.set_bounds(float(w.detach().min()) * (0.9 + 0.05 * i), float(w.detach().max()) * 0.95)
    return q.eval()


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_roundtrip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 37), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = lb.pack_weights(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-37 // (32 // bits)))
    assert torch.equal(lb.unpack_weights(packed, 37, bits), codes)


def test_pack_layout_is_the_documented_one():
    # 3 bits: 10 codes per word, code k at bits [3k, 3k+3), bits 30-31 unused
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 7]], dtype=torch.uint8)
    packed = lb.pack_weights(codes, 3)
    expected = sum(int(c) << (3 * k) for k, c in enumerate(codes[0, :10].tolist()))
    assert packed.shape == (1, 2)
    assert int(packed[0, 0]) & 0xFFFFFFFF == expected
    assert int(packed[0, 1]) == 7
    with pytest.raises(ValueError):
        lb.pack_weights(torch.tensor([[8]], dtype=torch.uint8), 3)


def test_native_packing_matches_python(tmp_path):
    """The C packer (host code, built here with the C++ compiler) agrees with the Python one."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path / "libesr_host.so"
    subprocess.run([cxx, "-O1", "-shared", "-fPIC", "-DESR_NO_CUDA", "-I", str(KERNELS),
                    str(KERNELS / "pack.cpp"), "-o", str(so)], check=True, timeout=60)
    lib = lb.load_library(so)
    assert lib.esr_has_cuda() == 0 and lib.esr_version() == 1
    g = torch.Generator().manual_seed(1)
    for bits in (2, 3, 4, 5, 8):
        codes = torch.randint(0, 2**bits, (7, 61), generator=g).to(torch.uint8)
        assert torch.equal(lb.pack_weights_native(codes, bits, lib), lb.pack_weights(codes, bits))
    bad = torch.full((1, 3), 4, dtype=torch.uint8)
    assert lib.esr_pack_weights(bad.data_ptr(), 1, 3, 2, torch.empty(1, dtype=torch.int32)
                                .data_ptr()) == 3  # ESR_ERR_CODE_RANGE


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_reproduce_fake_quant_bit_exactly(bits):
    x = torch.randn(4000) * 2
    lower, upper = torch.tensor(-1.37), torch.tensor(2.11)
    q = lb.quantize_codes(x, lower, upper, bits)
    step = lb.grid_step(lower, upper, bits)
    assert int(q.max()) <= 2**bits - 1
    assert torch.equal(lower + step * q.float(), fake_quant_nograd(x, lower, upper, bits))


@pytest.mark.parametrize("bits,groups,shared", [(2, 1, True), (3, 3, False), (4, 3, True),
                                                (8, 1, True)])
def test_reference_linear_equals_fake_quant_linear(bits, groups, shared):
    q = _quant_linear(bits, groups, shared)
    x = torch.randn(3, 17, 20) * 1.2
    p = lb.params_from_quant_linear(q)
    with torch.no_grad():
        want = q(x)
        got = lb.lowbit_linear_reference(x, p)
        w_fq = torch.cat([wq(w) for wq, w in zip(q.weight_quantizers, q.weight_blocks())])
    assert p.act_groups == (1 if shared else groups)
    assert torch.equal(p.dequantized_weight(), w_fq)  # weight grid bit-exact
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


def test_disabled_quantizer_is_refused():
    q = _quant_linear(4, 1, True)
    q.act_quantizers[0].enabled = False
    from edge_sr.errors import EdgeSRError

    with pytest.raises(EdgeSRError):
        lb.params_from_quant_linear(q)


def test_missing_library_says_how_to_build(tmp_path):
    from edge_sr.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="make kernels"):
        lb.load_library(tmp_path / "nope.so")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """The kernels compile for sm_80 (object + PTX); compile only, no libcuda needed."""
    common = [NVCC, "-std=c++17", "-O2", "-I", str(KERNELS), "-arch=sm_80"]
    src = str(KERNELS / "lowbit.cu")
    subprocess.run(common + ["-c", src, "-o", str(tmp_path / "lowbit.o")], check=True,
                   timeout=120, capture_output=True)
    subprocess.run(common + ["-ptx", src, "-o", str(tmp_path / "lowbit.ptx")], check=True,
                   timeout=120, capture_output=True)
    ptx = (tmp_path / "lowbit.ptx").read_text()
    assert (tmp_path / "lowbit.o").stat().st_size > 0
    assert "dp4a" in ptx and ".target sm_80" in ptx
    assert "lowbitLinearKernel" in ptx and "fakeQuantKernel" in ptx
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-g", str(tmp_path / "lowbit.o")], capture_output=True,
                              text=True, check=True).stdout
        for name in ("esr_fake_quant_f32", "esr_lowbit_linear", "esr_lowbit_linear_fused",
                     "esr_quantize_act"):
            assert f" T {name}" in syms


# ---- GPU (skipped without one) ----------------------------------------------------------------


def _gpu_lib():
    try:
        return lb.load_library()
    except Exception as e:  # noqa: BLE001 - MissingDependencyError or a load failure
        pytest.skip(f"kernel library not built ({e})")


@gpu
@pytest.mark.parametrize("bits", range(2, 9))
def test_gpu_fake_quant_bit_exact(bits):
    _gpu_lib()
    x = torch.randn(100_003) * 2
    lower, upper = torch.tensor(-1.37), torch.tensor(2.11)
    got = lb.fake_quant_cuda(x.cuda(), lower.cuda(), upper.cuda(), bits).cpu()
    want = fake_quant_nograd(x, lower, upper, bits)  # CPU torch: true-division step
    assert torch.equal(got, want)


@gpu
@pytest.mark.parametrize("bits,groups,shared", [(2, 1, True), (3, 3, False), (4, 3, True),
                                                (8, 1, True)])
def test_gpu_lowbit_linear_within_fp16_noise(bits, groups, shared):
    _gpu_lib()
    q = _quant_linear(bits, groups, shared)
    p = lb.params_from_quant_linear(q)
    x = torch.randn(4, 333, 20)
    with torch.no_grad():
        want = q(x)
    got = lb.lowbit_linear_cuda(x.cuda(), p.to("cuda")).float().cpu()
    tol = 2e-3 * want.abs().max().item() + 1e-3
    assert (got - want).abs().max().item() < tol
    x16 = x.half()  # an FP16 input is quantized from its FP16 values
    with torch.no_grad():
        want16 = q(x16.float())
    got16 = lb.lowbit_linear_cuda(x16.cuda(), p.to("cuda")).float().cpu()
    assert (got16 - want16).abs().max().item() < tol


# ---- the CUDA kernel bodies, emulated on the CPU ---------------------------------------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """lowbit_kernels.cuh compiled as host C++ (one std::thread per CUDA thread, see
    runtime/kernels/host_emulation.cpp): the kernels' indexing and maths, without a GPU."""
    import ctypes

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    so = tmp_path_factory.mktemp("emu") / "libemu.so"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-shared",
                        "-fPIC", "-I", str(KERNELS), str(KERNELS / "host_emulation.cpp"), "-o",
                        str(so)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"g++ cannot build the emulation (needs C++20 <barrier>, _Float16): "
                    f"{r.stderr[-300:]}")
    lib = ctypes.CDLL(str(so))
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.emu_fake_quant_f32.argtypes = [vp, vp, i64, vp, vp, i32]
    lib.emu_lowbit_linear_fused.argtypes = [vp, i32, i64, i64, i64, i32, vp, vp, i32, vp, i32,
                                            vp, vp, vp, vp, i32]
    return lib


def test_emulated_fake_quant_kernel_bit_exact(emulated):
    x = torch.randn(1000) * 2
    lo, up = torch.tensor([-1.37]), torch.tensor([2.11])
    for bits in range(2, 9):
        y = torch.empty_like(x)
        emulated.emu_fake_quant_f32(x.data_ptr(), y.data_ptr(), x.numel(), lo.data_ptr(),
                                    up.data_ptr(), bits)
        assert torch.equal(y, fake_quant_nograd(x, lo[0], up[0], bits))


@pytest.mark.parametrize("bits,groups,shared", [(2, 1, True), (3, 3, False), (4, 3, True),
                                                (8, 1, True)])
def test_emulated_lowbit_linear_kernel(emulated, bits, groups, shared):
    """Several M/N blocks, K not a multiple of the tile, 3 activation groups: FP32 output equals
    the fake-quant linear to float noise, FP16 output to FP16 rounding."""
    torch.manual_seed(bits)
    for k, m in ((20, 70), (45, 130)):  # K below and above one 32-code chunk
        q = QuantLinear(nn.Linear(k, 36 if groups == 3 else 24), bits, groups=groups,
                        shared_input=shared)
        for i, aq in enumerate(q.act_quantizers):
            aq.set_bounds(-1.1 - 0.13 * i, 1.3 + 0.21 * i)
        for wq, w in zip(q.weight_quantizers, q.weight_blocks()):
            wq.set_bounds(float(w.detach().min()), float(w.detach().max()))
        p = lb.params_from_quant_linear(q)
        x = torch.randn(m, k)
        with torch.no_grad():
            want = q(x)
        for x_dtype, out_dtype in ((0, torch.float32), (1, torch.float16)):
            xin = x if x_dtype == 0 else x.half()
            with torch.no_grad():
                ref = want if x_dtype == 0 else q(xin.float())
            out = torch.empty(m, p.out_features, dtype=out_dtype)
            emulated.emu_lowbit_linear_fused(
                xin.data_ptr(), x_dtype, m, k, p.out_features, p.act_groups,
                p.act_lower.data_ptr(), p.act_upper.data_ptr(), bits, p.packed.data_ptr(), bits,
                p.w_lower.data_ptr(), p.w_scale.data_ptr(), p.bias.data_ptr(), out.data_ptr(),
                0 if out_dtype == torch.float32 else 1)
            err = (out.float() - ref).abs().max().item()
            scale = ref.abs().max().item()
            assert err < (1e-5 if out_dtype == torch.float32 else 2 ** -10) * max(scale, 1.0)
