"""Single-device attention with FlashAttention-2's public API: flash_attn_func,
flash_attn_kvpacked_func and flash_attn_qkvpacked_func, with its argument names, layouts and return
values.

CUDA tensors run our kernels (ring_attn_ext._C.fwd / _C.bwd); tensors on any other device run the
PyTorch reference (computed in float32 for 16-bit inputs), so the same calls work, and train,
without a GPU. Masks reach the kernels as a band of key offsets (see masks.py).
"""
import torch
from torch.autograd.function import once_differentiable

from . import checks
from .masks import band_for
from .packing import KV_PACKED, NAMES, QKV_PACKED, SEPARATE, pack, unpack
from .reference import attention_reference


def _forward(ext, q, k, v, softmax_scale, band):
    """(out, lse). ext is the compiled module for CUDA tensors, None for the reference path."""
    if ext is not None:
        return ext.fwd(q, k, v, softmax_scale, *band)
    return attention_reference(q, k, v, softmax_scale, *band, upcast=True)


def attention_backward(ext, dout, q, k, v, out, lse, softmax_scale, band):
    """(dq, dk, dv) in the dtype of q."""
    if ext is not None:
        return ext.bwd(checks.kernel_compatible(dout), q, k, v, out, lse, softmax_scale, *band)
    # Reference path: recompute the forward with autograd recording and differentiate it.
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        recomputed, _ = attention_reference(*leaves, softmax_scale, *band, upcast=True)
        return torch.autograd.grad(recomputed, leaves, dout)


def prepare_for_kernels(ext, tensors):
    """On CUDA, copies only the tensors the kernels cannot read in place."""
    if ext is None:
        return tensors
    return [checks.kernel_compatible(t) for t in tensors]


class _AttentionFunction(torch.autograd.Function):
    """apply(packing, ext, softmax_scale, band, *tensors) -> (out, lse); lse is not differentiable.
    tensors are (q, k, v), (q, kv) or (qkv,) as `packing` says; the gradients come back the same way."""

    @staticmethod
    def forward(ctx, packing, ext, softmax_scale, band, *tensors):
        q, k, v = prepare_for_kernels(ext, unpack(packing, tensors))
        out, lse = _forward(ext, q, k, v, softmax_scale, band)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.packing, ctx.ext, ctx.softmax_scale, ctx.band = packing, ext, softmax_scale, band
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        dq, dk, dv = attention_backward(ctx.ext, dout, *ctx.saved_tensors, ctx.softmax_scale, ctx.band)
        return (None, None, None, None, *pack(ctx.packing, dq, dk, dv))


def _validate(what, q, k, v, names, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic, return_attn_probs):
    """Checks everything before any work; returns (ext or None, softmax_scale, band)."""
    shape = checks.check_qkv(q, k, v, names)
    softmax_scale, window = checks.check_options(shape.head_dim, dropout_p, softmax_scale, causal, window_size,
                                                 softcap, alibi_slopes, deterministic, return_attn_probs)
    checks.check_deterministic(deterministic, q.device)
    needs_backward = checks.needs_autograd((q, k, v))
    ext = checks.check_device_support(shape, q.device, what, q.dtype, backward=needs_backward)
    return ext, softmax_scale, band_for(shape.seqlen_q, shape.seqlen_k, causal, window)


def _result(out, lse, return_attn_probs):
    return (out, lse, None) if return_attn_probs else out


_COMMON_DOC = """
    Shared arguments, as in FlashAttention-2:
      dropout_p: must be 0.0 (dropout is not implemented; any other value raises NotImplementedError).
      softmax_scale: scale of q @ k^T before the softmax; None means head_dim ** -0.5.
      causal: causal mask, aligned to the bottom-right corner when seqlen_q != seqlen_k (query i
        sees key j iff j <= i + seqlen_k - seqlen_q).
      window_size: (left, right) sliding window around the same diagonal, -1 meaning unbounded.
      softcap: must be 0.0 (not implemented). alibi_slopes: must be None (not implemented).
      deterministic: True raises NotImplementedError on CUDA, whose backward sums dq across key
        blocks (and dk, dv across the query heads of a group under grouped-query attention) with
        fp32 atomics, so the last bits of those gradients may vary between runs; the CPU path is
        always deterministic and accepts it.
      return_attn_probs: if True, return (out, lse, None) instead of out, where lse (batch, heads,
        seqlen_q) float32 is the natural-log softmax normaliser (-inf, and out 0, for a query that sees
        no key). The probabilities themselves are never materialised, hence None. lse is a constant
        for autograd, as in FlashAttention-2: no gradient flows back through it.

    Heads: query head i uses key/value head i // (heads / heads_kv) (grouped-query attention).
    CUDA tensors must be float16 or bfloat16 with a head_dim compiled into the extension; tensors on
    other devices may be float16, bfloat16, float32 or float64 with any head_dim and run the PyTorch
    reference.
    Raises TypeError / ValueError for invalid arguments, NotImplementedError for unsupported options,
    RuntimeError for CUDA tensors when the extension is not installed.
"""


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    ext, softmax_scale, band = _validate("flash_attn_func", q, k, v, NAMES[SEPARATE], dropout_p, softmax_scale,
                                         causal, window_size, softcap, alibi_slopes, deterministic,
                                         return_attn_probs)
    out, lse = _AttentionFunction.apply(SEPARATE, ext, softmax_scale, band, q, k, v)
    return _result(out, lse, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    checks.check_packed(kv, "kv", 2, "k and v")
    ext, softmax_scale, band = _validate("flash_attn_kvpacked_func", q, kv[:, :, 0], kv[:, :, 1], NAMES[KV_PACKED],
                                         dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                         deterministic, return_attn_probs)
    out, lse = _AttentionFunction.apply(KV_PACKED, ext, softmax_scale, band, q, kv)
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    checks.check_packed(qkv, "qkv", 3, "q, k and v")
    ext, softmax_scale, band = _validate("flash_attn_qkvpacked_func", qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                         NAMES[QKV_PACKED], dropout_p, softmax_scale, causal, window_size, softcap,
                                         alibi_slopes, deterministic, return_attn_probs)
    out, lse = _AttentionFunction.apply(QKV_PACKED, ext, softmax_scale, band, qkv)
    return _result(out, lse, return_attn_probs)


flash_attn_func.__doc__ = """Attention over q (batch, seqlen_q, heads, head_dim), k and v (batch, seqlen_k,
    heads_kv, head_dim); returns out (batch, seqlen_q, heads, head_dim) in q's dtype.
""" + _COMMON_DOC
flash_attn_kvpacked_func.__doc__ = """Attention over q (batch, seqlen_q, heads, head_dim) and kv (batch,
    seqlen_k, 2, heads_kv, head_dim) holding k and v; the gradient of kv comes back packed the same way.
""" + _COMMON_DOC
flash_attn_qkvpacked_func.__doc__ = """Self-attention over qkv (batch, seqlen, 3, heads, head_dim) holding q,
    k and v; the gradient of qkv comes back packed the same way.
""" + _COMMON_DOC
