"""Argument validation shared by the public entry points (single-device and ring).

Every check raises an exception that names the offending argument and the rule it breaks:
TypeError for a wrong type or dtype, ValueError for a wrong shape or value, NotImplementedError for
a FlashAttention-2 option this package does not implement (rejected rather than silently ignored).
The checks only read metadata (shape, dtype, device, strides), never data, except
kernel_compatible, which the CUDA path calls just before it hands tensors to the kernels.
"""
import math
import numbers
from typing import NamedTuple

import torch

from ._extension import require_extension
from .masks import check_window_size
from .packing import KV_PACKED, QKV_PACKED
from .reference import default_softmax_scale

# The kernels' launch grids put the batch and the heads in their y and z dimensions, which CUDA
# limits to 65535 blocks.
MAX_GRID_YZ = 65535
# The kernels move 16 bytes per thread, so every row they read must start on a 16-byte boundary.
KERNEL_ALIGNMENT_BYTES = 16
CUDA_DTYPES = (torch.float16, torch.bfloat16)
# What the reference computes in off CUDA (float8 and the like have no matrix products there).
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REFERENCE_DTYPES_TEXT = "float16, bfloat16, float32 or float64"


class QKVShape(NamedTuple):
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    heads_kv: int
    head_dim: int


def check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_qkv(q, k, v, names=("q", "k", "v")):
    """q (b, s_q, h, d), k and v (b, s_k, h_kv, d) with h % h_kv == 0, one dtype (float16 or
    bfloat16 on CUDA; float32 and float64 too elsewhere) and one device. `names` are the names the
    messages use (packed callers pass e.g. "kv[:, :, 0]"). Returns the dimensions as a QKVShape."""
    q_name, k_name, v_name = names
    for t, name in zip((q, k, v), names):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, seqlen, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if q.is_cuda and q.dtype not in CUDA_DTYPES:
        raise TypeError(f"{q_name} must be float16 or bfloat16 on CUDA (the kernels' dtypes), got {q.dtype}; "
                        f"tensors on other devices may be {_REFERENCE_DTYPES_TEXT}")
    if q.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"{q_name} must be {_REFERENCE_DTYPES_TEXT} (the PyTorch reference's dtypes off CUDA), "
                        f"got {q.dtype}")
    for t, name in ((k, k_name), (v, v_name)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of {q_name} ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of {q_name} ({q.device}), got {t.device}")
    batch, seqlen_q, heads, head_dim = q.shape
    batch_k, seqlen_k, heads_kv, head_dim_k = k.shape
    if batch < 1 or heads < 1 or head_dim < 1:
        raise ValueError(f"{q_name} must have a positive batch size, head count and head_dim, "
                         f"got shape {tuple(q.shape)}")
    if batch_k != batch:
        raise ValueError(f"{k_name} must have the batch size of {q_name} ({batch}), got {batch_k}")
    if head_dim_k != head_dim:
        raise ValueError(f"{k_name} must have the head_dim of {q_name} ({head_dim}), got {head_dim_k}")
    if v.shape != k.shape:
        raise ValueError(f"{v_name} must have the shape of {k_name} ({tuple(k.shape)}), got {tuple(v.shape)}")
    if heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(f"the number of heads of {k_name} and {v_name} ({heads_kv}) must divide the number "
                         f"of heads of {q_name} ({heads}) (grouped-query attention needs h % h_kv == 0)")
    return QKVShape(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)


def check_packed(t, name, count, what, varlen=False):
    """A packed tensor (b, s, count, heads, d), or (total, count, heads, d) with varlen (packed
    variable-length sequences): kv with count 2 or qkv with count 3."""
    check_tensor(t, name)
    leading = ("total_tokens",) if varlen else ("batch", "seqlen")
    if t.dim() != len(leading) + 3 or t.shape[len(leading)] != count:
        raise ValueError(f"{name} must have shape ({', '.join(leading)}, {count}, heads, head_dim) holding {what}, "
                         f"got shape {tuple(t.shape)}")


def needs_autograd(tensors):
    """Whether autograd will run a backward through a call on `tensors`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_packing(packing, tensors, varlen=False):
    """The packed tensor of a kv- or qkv-packed call (packing.py) has the packed shape; nothing to
    check for separate q, k, v."""
    if packing == KV_PACKED:
        check_packed(tensors[1], "kv", 2, "k and v", varlen)
    elif packing == QKV_PACKED:
        check_packed(tensors[0], "qkv", 3, "q, k and v", varlen)


def check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_dropout_p(dropout_p):
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a number, got {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {dropout_p!r}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p!r}: dropout is not supported yet; pass dropout_p=0.0")


def check_softcap(softcap):
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a number, got {softcap!r}")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap={softcap!r}: logit soft-capping is not supported yet; pass softcap=0.0")


def check_alibi_slopes(alibi_slopes):
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported yet; pass alibi_slopes=None")


def check_softmax_scale(softmax_scale, head_dim):
    """The scale as a float: head_dim ** -0.5 when None, else a positive finite number."""
    if softmax_scale is None:
        return default_softmax_scale(head_dim)
    if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be None or a number, got {softmax_scale!r}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return float(softmax_scale)


def check_options(head_dim, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs):
    """FlashAttention-2's keyword options. Returns (softmax_scale as a float, (left, right) window).
    return_attn_probs=True makes the entry points return (out, lse, None): lse is the fp32
    natural-log softmax normaliser (b, h, s_q); the attention probabilities themselves are never
    materialised (FlashAttention-2 returns them only for its dropout tests)."""
    check_dropout_p(dropout_p)
    check_softcap(softcap)
    check_alibi_slopes(alibi_slopes)
    check_flag(causal, "causal")
    check_flag(deterministic, "deterministic")
    check_flag(return_attn_probs, "return_attn_probs")
    window = check_window_size(window_size)
    return check_softmax_scale(softmax_scale, head_dim), window


def check_deterministic(deterministic, device):
    """deterministic=True asks for bitwise-reproducible gradients. The CUDA backward adds dq (and,
    under GQA, dk/dv) with fp32 atomics, whose order varies, so CUDA rejects it rather than
    ignoring it; the CPU reference is always deterministic."""
    check_flag(deterministic, "deterministic")
    if deterministic and device.type == "cuda":
        raise NotImplementedError("deterministic=True: the CUDA backward is not deterministic yet (fp32 atomic "
                                  "adds); pass deterministic=False (CPU tensors are always deterministic)")


_KERNEL_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def check_device_support(shape, device, what, dtype=None, backward=True):
    """CUDA tensors need the compiled extension with kernels for this head_dim and dtype (forward,
    and backward when gradients may be needed); other devices run the PyTorch reference, which
    supports any head_dim. Returns the extension module or None. Checked here, against the build's
    kernel list, so an uncompiled combination never reaches the C++ layer."""
    if device.type != "cuda":
        return None
    for size, name in ((shape.batch, "batch size"), (shape.heads, "number of heads")):
        if size > MAX_GRID_YZ:
            raise ValueError(f"q's {name} is {size}, but at most {MAX_GRID_YZ} fit a dimension of the CUDA kernels' "
                             f"launch grid ({what}): split the call")
    ext = require_extension(what)
    supported = list(ext.supported_head_dims())
    if shape.head_dim not in supported:
        raise ValueError(f"head_dim {shape.head_dim} is not supported on CUDA by this build; compiled head dims: "
                         f"{supported} (rebuild with RING_ATTN_HEAD_DIMS including it, or use CPU tensors)")
    if dtype in _KERNEL_DTYPE_NAMES:
        built = {(direction, head_dim, name) for direction, head_dim, name, _ in ext.compiled_kernels()}
        for direction in ("fwd", "bwd") if backward else ("fwd",):
            if (direction, shape.head_dim, _KERNEL_DTYPE_NAMES[dtype]) not in built:
                raise ValueError(f"this build has no {'forward' if direction == 'fwd' else 'backward'} kernel for "
                                 f"head_dim {shape.head_dim} and dtype {dtype} (rebuild with RING_ATTN_DTYPES / "
                                 "RING_ATTN_HEAD_DIMS including it, and without RING_ATTN_DISABLE_BACKWARD=1)")
    return ext


def is_kernel_compatible(t):
    """What the kernels need: a contiguous last dimension, a 16-byte aligned start and 16-byte
    multiple strides in the batch, sequence and head dimensions (a dimension of size 1 is never
    stepped over, so its stride does not matter)."""
    if t.stride(-1) != 1 or t.data_ptr() % KERNEL_ALIGNMENT_BYTES != 0:
        return False
    return all((stride * t.element_size()) % KERNEL_ALIGNMENT_BYTES == 0 or size == 1
               for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def kernel_compatible(t):
    """t itself when the kernels can read it in place, else a fresh contiguous copy (a fresh
    allocation is aligned, so the copy always qualifies for the head dims the kernels support)."""
    if is_kernel_compatible(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)
