"""Loads the compiled extension ring_attn_ext._C when this install has one, and keeps the reason
when it does not, so GPU entry points can say why they are unavailable."""

import importlib

try:
    # import_module, unlike `from . import _C`, keeps the real cause ("No module named
    # 'ring_attn_ext._C'") instead of a misleading "partially initialized module" message.
    _C = importlib.import_module("._C", __package__)
    EXTENSION_ERROR = None
except ImportError as error:  # pure-Python install: no nvcc, CPU-only torch, or RING_ATTN_SKIP_CUDA_BUILD=1
    _C = None
    EXTENSION_ERROR = error


def has_extension():
    return _C is not None


def require_extension(what):
    """Returns the compiled module, or raises a RuntimeError that says why it is missing."""
    if _C is None:
        raise RuntimeError(
            f"{what} needs the compiled CUDA extension ring_attn_ext._C, which this install does not have "
            f"({EXTENSION_ERROR}). Install torch with CUDA and nvcc, then `pip install --no-build-isolation .`; "
            "CPU tensors work without it through the PyTorch reference path.")
    return _C
