"""The LowBitLinear TensorRT plugin (runtime/plugins) compiled against the real TensorRT headers.

The plugin is compiled to an object file against the public headers of TensorRT 10.3.0 (the version
JetPack 6.1/6.2 ships) and the CUDA runtime headers, with warnings that turn a virtual whose
signature differs from TensorRT's into an error. Nothing is linked (no libnvinfer) or run (no
TensorRT runtime, no GPU needed). Two mutated copies of the plugin must fail to compile, so the check
cannot pass vacuously.

Where things are looked for (each test skips with the reason when one is missing):
- C++ compiler: ``$CXX``, else ``c++``/``g++``/``clang++`` on PATH, else ``nvcc`` as the driver;
- CUDA headers (``cuda_runtime_api.h``): ``$CUDA_HOME``/``$CUDA_PATH``, the installation ``nvcc``
  belongs to, ``/usr/local/cuda``;
- TensorRT headers (``NvInfer.h``): ``$EDGE_SR_TRT_HEADERS``, else ``tensorrt-10.3-headers`` beside
  the shared data folder (``$EDGE_SR_DATA/..``, i.e. ``../shared/tensorrt-10.3-headers``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_sr.paths import REPO_ROOT, data_root

PLUGINS = REPO_ROOT / "runtime" / "plugins"
KERNELS = REPO_ROOT / "runtime" / "kernels"  # esr_lowbit.h, the C API the plugin calls
TRT_FOLDER = "tensorrt-10.3-headers"
# A virtual that does not match TensorRT's exactly fails: `override` on a non-override is an error,
# an unimplemented pure virtual leaves the plugin abstract, and -Werror makes a missing `override`
# an error. The TensorRT and CUDA headers are system headers here (their own warnings are not ours).
WARNINGS = ["-Wall", "-Wextra", "-Werror", "-Werror=overloaded-virtual", "-Werror=suggest-override"]
# GCC reports a hidden base virtual (-Woverloaded-virtual) at the base declaration, i.e. inside the
# TensorRT headers, where system-header warnings are silenced; a second pass includes them as user
# headers with only that warning (as an error), so a same-named method with a different signature
# and no `override` (hiding a non-pure virtual such as getNbTactics) fails too.
HIDDEN_VIRTUAL = ["-Werror=overloaded-virtual", "-Wno-deprecated-declarations"]
TIMEOUT = 120


def _find_compiler() -> tuple[str, bool] | None:
    """(path, is_nvcc) of the compiler to use, or None."""
    env = os.environ.get("CXX")
    if env and shutil.which(shlex.split(env)[0]):
        return shutil.which(shlex.split(env)[0]), False
    for name in ("c++", "g++", "clang++"):
        if path := shutil.which(name):
            return path, False
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    return (nvcc, True) if nvcc else None


def _nvcc_include_dirs() -> list[Path]:
    """Include folders of the CUDA installation ``nvcc`` belongs to (it may be a wrapper script)."""
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    if nvcc is None:
        return []
    real = Path(nvcc).resolve()
    dirs = [real.parent.parent / "include"]
    try:  # nvcc prints its own include path in a dry run; this also sees through wrapper scripts
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "c++", os.devnull], capture_output=True,
                             text=True, timeout=30)
        for m in re.finditer(r'INCLUDES="([^"]*)"', out.stdout + out.stderr):
            dirs += [Path(p[2:].strip('"')) for p in shlex.split(m.group(1)) if p.startswith("-I")]
    except (OSError, subprocess.SubprocessError):
        pass
    return dirs


def _find_cuda_include() -> Path | None:
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [Path("/usr/local/cuda/include")]
    for c in candidates:
        if (c / "cuda_runtime_api.h").is_file():
            return c
    for c in _nvcc_include_dirs():  # only if the cheap places failed: this runs nvcc
        if (c / "cuda_runtime_api.h").is_file():
            return c.resolve()
    return None


def _find_trt_headers() -> Path | None:
    env = os.environ.get("EDGE_SR_TRT_HEADERS")
    if env:
        candidates = [Path(env)]
    else:
        data = data_root(required=False)
        candidates = [data.parent / TRT_FOLDER] if data is not None else []
        candidates.append(REPO_ROOT.parent / "shared" / TRT_FOLDER)
    for c in candidates:
        for d in (c, c / "include"):
            if (d / "NvInfer.h").is_file() and (d / "NvInferRuntime.h").is_file():
                return d
    return None


COMPILER = _find_compiler()
CUDA_INCLUDE = _find_cuda_include()
TRT_INCLUDE = _find_trt_headers()
SKIP_REASON = (
    "no C++ compiler (c++, g++, clang++ or nvcc)" if COMPILER is None
    else "no CUDA headers (cuda_runtime_api.h; set CUDA_HOME)" if CUDA_INCLUDE is None
    else f"no TensorRT headers (set EDGE_SR_TRT_HEADERS, or put {TRT_FOLDER} beside the data folder)"
    if TRT_INCLUDE is None
    else None
)
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def _trt_version() -> tuple[int, int, int]:
    text = (TRT_INCLUDE / "NvInferVersion.h").read_text()
    parts = [re.search(rf"#define NV_TENSORRT_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return tuple(int(m.group(1)) if m else -1 for m in parts)  # type: ignore[return-value]


def _run_compiler(source: Path, obj: Path, flags: list[str], trt_include: str) -> subprocess.CompletedProcess:
    compiler, is_nvcc = COMPILER
    includes = ["-I", str(KERNELS), trt_include, str(TRT_INCLUDE), "-isystem", str(CUDA_INCLUDE)]
    if is_nvcc:  # nvcc hands .cpp files to its host compiler; the warnings go to that compiler
        cmd = [compiler, "-std=c++17", "-c", "-Xcompiler", ",".join([*flags, "-fPIC"])]
    else:
        cmd = [compiler, "-std=c++17", "-c", "-fPIC", *flags]
    cmd += [*includes, str(source), "-o", str(obj)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def _compile(source: Path, obj: Path) -> subprocess.CompletedProcess:
    """Compile one plugin translation unit to an object file (no link), then the hidden-virtual pass."""
    res = _run_compiler(source, obj, WARNINGS, "-isystem")
    if res.returncode != 0:
        return res
    return _run_compiler(source, obj.with_suffix(".hidden.o"), HIDDEN_VIRTUAL, "-I")


def _plugin_sources() -> list[Path]:
    sources = sorted(PLUGINS.glob("*.cpp"))
    assert sources, f"no plugin sources in {PLUGINS}"
    return sources


@pytest.fixture(scope="module")
def plugin_objects(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("plugin_obj")
    objects = []
    for src in _plugin_sources():
        obj = out / (src.stem + ".o")
        res = _compile(src, obj)
        assert res.returncode == 0, f"{src.name} failed to compile against TensorRT headers at " \
                                    f"{TRT_INCLUDE}:\n{res.stderr[-6000:]}"
        assert not res.stderr.strip(), f"{src.name}: compiler diagnostics:\n{res.stderr[-6000:]}"
        assert obj.is_file() and obj.stat().st_size > 0
        objects.append(obj)
    return objects


def test_headers_are_tensorrt_10():
    """IPluginV3 (what the plugin implements) exists from TensorRT 10.0; the shared copy is 10.3.0."""
    major, minor, patch = _trt_version()
    assert major >= 10, f"TensorRT {major}.{minor}.{patch} headers at {TRT_INCLUDE}: IPluginV3 needs >= 10"
    if not os.environ.get("EDGE_SR_TRT_HEADERS"):
        assert (major, minor) == (10, 3), f"{TRT_FOLDER} holds TensorRT {major}.{minor}.{patch}"


def test_plugin_compiles_against_tensorrt(plugin_objects):
    assert len(plugin_objects) == len(_plugin_sources())


def test_plugin_object_defines_the_creator(plugin_objects):
    """The entry points TensorRT's loadLibrary / trtexec --dynamicPlugins look up, and the creator."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the object's symbols")
    text = ""
    for obj in plugin_objects:
        res = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert res.returncode == 0, res.stderr
        text += res.stdout
    symbols = {line.split(maxsplit=2)[2]: line.split()[1] for line in text.splitlines()
               if len(line.split(maxsplit=2)) == 3}
    # extern "C", exported (global text symbols, unmangled)
    assert symbols.get("getCreators") == "T", "getCreators is not a defined global function"
    assert symbols.get("setLoggerFinder") == "T", "setLoggerFinder is not a defined global function"
    names = "\n".join(symbols)
    for method in ("createPlugin(char const*, nvinfer1::PluginFieldCollection const*, "
                   "nvinfer1::TensorRTPhase)",
                   "getFieldNames()",
                   "enqueue(nvinfer1::PluginTensorDesc const*, nvinfer1::PluginTensorDesc const*, "
                   "void const* const*, void* const*, void*, CUstream_st*)"):
        assert method in names, f"{method} not defined in the plugin object"
    assert "LowBitLinearPluginCreator::createPlugin" in names


# Each mutation changes one signature of the plugin so that it no longer matches TensorRT's; the
# mutated copy must fail to compile (so a mismatch cannot slip through the check above).
MUTATIONS = {
    # `override` kept, const dropped: "marked override, but does not override"
    "override-mismatch": ("int32_t getNbOutputs() const noexcept override",
                          "int32_t getNbOutputs() noexcept override", "getNbOutputs"),
    # `override` dropped, parameter type changed: hides the base virtual (-Werror=overloaded-virtual)
    # and leaves the pure virtual unimplemented (the plugin class becomes abstract)
    "hidden-virtual": ("IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override",
                       "IPluginV3* attachToContext(IPluginResourceContext const* /*context*/) noexcept",
                       "attachToContext"),
    # a method hiding a non-pure virtual (const added, no `override`): only -Woverloaded-virtual sees it
    "hidden-default-virtual": ("int32_t getNbOutputs() const noexcept override { return 1; }",
                               "int32_t getNbOutputs() const noexcept override { return 1; }\n"
                               "    int32_t getNbTactics() const noexcept { return 0; }", "getNbTactics"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_wrong_signature_fails_to_compile(name, tmp_path):
    old, new, method = MUTATIONS[name]
    src = PLUGINS / "lowbit_linear_plugin.cpp"
    text = src.read_text()
    assert text.count(old) == 1, f"mutation {name!r} no longer matches the plugin source: update the test"
    bad = tmp_path / src.name
    bad.write_text(text.replace(old, new))
    res = _compile(bad, tmp_path / "bad.o")
    assert res.returncode != 0, f"a wrong {method} signature ({name}) compiled:\n{res.stderr[-3000:]}"
    assert method in res.stderr, f"failed, but not on {method}:\n{res.stderr[-3000:]}"
