"""Build script for ring_attn_ext.

    pip install --no-build-isolation .        # or -e . for development

Environment variables:
    MAX_JOBS             parallel compile jobs (ninja). nvcc needs 3-5 GB of RAM per job here.
    NVCC_THREADS         threads per nvcc job (default 1).
    RING_ATTN_CUDA_ARCHS semicolon-separated targets (default "90a;80"): 90a is Hopper
                         (H100/H200), 80 Ampere.
    RING_ATTN_HEAD_DIMS  comma-separated head dims to compile (default: all of 32,64,96,128,256).
    RING_ATTN_DTYPES     comma-separated dtypes to compile (default: fp16,bf16).
    RING_ATTN_DISABLE_BACKWARD=1  compile forward kernels only (inference builds; the backward
                         entry points then raise a clear error).
    CUTLASS_PATH         a CUTLASS checkout to use instead of third_party/cutlass or the
                         nvidia-cutlass wheel.
    CUDA_HOME            the CUDA toolkit (default: /usr/local/cuda when it exists).
    RING_ATTN_SKIP_CUDA_BUILD=1  install the pure-Python package only.

Without nvcc, or with a CPU-only torch, the package installs as pure Python: the reference path
(CPU tensors, gloo process groups) works and the GPU entry points raise a clear error.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ALL_HEAD_DIMS = (32, 64, 96, 128, 256)
ALL_DTYPES = ("fp16", "bf16")


def log(message):
    print(f"ring_attn_ext setup: {message}", file=sys.stderr)


def default_cuda_home():
    # torch guesses CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script
    # (/usr/local/bin/nvcc here) the guess is /usr/local and linking fails on -lcudart.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def reason_to_skip_cuda():
    """Returns why the CUDA extension cannot be built here, or None if it can."""
    if os.environ.get("RING_ATTN_SKIP_CUDA_BUILD", "0") == "1":
        return "RING_ATTN_SKIP_CUDA_BUILD=1"
    try:
        import torch
    except ImportError:
        return "torch is not installed (install torch first, then build with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
    return None


def cutlass_include_dir():
    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(os.path.join(os.environ["CUTLASS_PATH"], "include"))
    candidates.append(os.path.join(ROOT, "third_party", "cutlass", "include"))
    try:
        import cutlass_library
        candidates.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    for path in candidates:
        if os.path.exists(os.path.join(path, "cute", "tensor.hpp")):
            return path
    raise RuntimeError(
        "ring_attn_ext needs the CUTLASS/CuTe headers and found none. Either\n"
        "  pip install nvidia-cutlass==4.2.0.0\n"
        "or point CUTLASS_PATH at a CUTLASS (>= 4.2) checkout, or clone one into third_party/cutlass.\n"
        f"Looked in: {candidates}")


def nccl_dirs():
    """The NCCL that torch ships (nvidia-nccl-cu13), so one NCCL lives in the process."""
    try:
        import nvidia.nccl
    except ImportError:
        raise RuntimeError("ring_attn_ext links the NCCL that torch ships (package nvidia-nccl-cu13), "
                           "which is not installed: pip install nvidia-nccl-cu13")
    base = list(nvidia.nccl.__path__)[0]
    return os.path.join(base, "include"), os.path.join(base, "lib")


def selected(env_name, allowed, cast):
    raw = os.environ.get(env_name)
    if not raw:
        return list(allowed)
    values = [cast(v.strip()) for v in raw.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise RuntimeError(f"{env_name}={raw!r}: {bad} not among {list(allowed)}")
    return values


def instantiation_sources():
    head_dims = selected("RING_ATTN_HEAD_DIMS", ALL_HEAD_DIMS, int)
    dtypes = selected("RING_ATTN_DTYPES", ALL_DTYPES, str)
    pattern = re.compile(r"flash_(fwd|bwd)_hdim(\d+)_(fp16|bf16)_(full|masked)\.cu$")
    sources = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "flash", "instantiations", "*.cu"))):
        match = pattern.search(path)
        if not match:
            continue
        if match.group(1) == "bwd" and os.environ.get("RING_ATTN_DISABLE_BACKWARD", "0") == "1":
            continue
        if int(match.group(2)) in head_dims and match.group(3) in dtypes:
            sources.append(path)
    return sources


def gencode_flags():
    archs = os.environ.get("RING_ATTN_CUDA_ARCHS", "90a;80")
    flags = []
    for arch in [a.strip() for a in archs.split(";") if a.strip()]:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    nccl_include, nccl_lib = nccl_dirs()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "flash", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "flash", "*.cu")))
    sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "ring", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "ring", "*.cu")))
    sources += instantiation_sources()
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "flash"), cutlass_include_dir(),
                    nccl_include]
    nvcc_flags = [
        "-O3", "-DNDEBUG", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
        # torch's cpp_extension defines these to keep half operators out of its own headers; CuTe needs them.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        f"--threads={os.environ.get('NVCC_THREADS', '1')}",
    ] + gencode_flags()
    return CUDAExtension(
        name="ring_attn_ext._C",
        sources=[os.path.relpath(s, ROOT) for s in sources],
        include_dirs=include_dirs,
        library_dirs=[nccl_lib],
        libraries=[":libnccl.so.2"],
        extra_link_args=[f"-Wl,-rpath,{nccl_lib}"],
        extra_compile_args={"cxx": ["-O3", "-DNDEBUG"], "nvcc": nvcc_flags},
    )


def extension_setup_kwargs():
    default_cuda_home()
    reason = reason_to_skip_cuda()
    if reason is not None:
        log(f"building the pure-Python package only, without the CUDA extension: {reason}.")
        return {}
    from torch.utils.cpp_extension import BuildExtension
    return {
        "ext_modules": [cuda_extension()],
        "cmdclass": {"build_ext": BuildExtension},
    }


setup(
    packages=find_packages(include=["ring_attn_ext", "ring_attn_ext.*"]),
    **extension_setup_kwargs(),
)
