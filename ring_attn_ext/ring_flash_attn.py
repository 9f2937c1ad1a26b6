"""ring-flash-attn's public functions (version 0.1.8), as drop-in replacements:

    ring_flash_attn_func, zigzag_ring_flash_attn_func, stripe_flash_attn_func
    and their _kvpacked_func (q, kv) and _qkvpacked_func (qkv) forms

with its arguments (q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None) and return values:
out, or (out, lse, None) with return_attn_probs=True (lse (b, h, s_local) float32; float64 for
float64 inputs, which run in the PyTorch reference; a constant for autograd, as in
FlashAttention-2). Inputs are the rank's local shards in the
function's layout ("ring": contiguous, "zigzag", "stripe"; see sharding.py); kv is
(b, s, 2, h_kv, d), qkv (b, s, 3, h, d), and their gradients come back packed.

Differences from ring-flash-attn, all deliberate: non-causal attention is accepted in every
layout; window_size is applied to global token positions (ring-flash-attn passes it to every
block with block-local positions); dropout_p != 0 and alibi_slopes raise NotImplementedError
instead of being silently wrong or asserted; deterministic=True is honoured on CPU tensors (the
reference ring is deterministic) and raises NotImplementedError on CUDA tensors.
"""
import torch
from torch.autograd.function import once_differentiable

from . import checks, ring
from .packing import KV_PACKED, NAMES, QKV_PACKED, SEPARATE, pack, unpack
from .group_checks import validate_together

class RingAttentionFunction(torch.autograd.Function):
    """apply(call, packing, *tensors) -> (out, lse); lse is not differentiable. tensors are
    (q, k, v), (q, kv) or (qkv,) as `packing` says; the gradients match them."""

    @staticmethod
    def forward(ctx, call, packing, *tensors):
        q, k, v = unpack(packing, tensors)
        out, lse = ring.run_forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.packing = call, packing
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        # No cross-rank check here: the inputs are the forward's, on which every rank agreed.
        dq, dk, dv = ring.run_backward(dout, *ctx.saved_tensors, ctx.call)
        return (None, None, *pack(ctx.packing, dq, dk, dv))


def _ring_attention(layout, packing, tensors, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    deterministic, return_attn_probs, group):
    ring_group = ring.resolve_group(group)

    def validate():
        # Every check runs inside validate_together, so a rank that rejects its arguments makes all
        # ranks raise instead of leaving them waiting in the ring.
        checks.check_packing(packing, tensors)
        checks.check_dropout_p(dropout_p)
        checks.check_alibi_slopes(alibi_slopes)
        checks.check_flag(return_attn_probs, "return_attn_probs")
        q, k, v = unpack(packing, tensors)
        names = NAMES[packing]
        checks.check_qkv(q, k, v, names)
        checks.check_deterministic(deterministic, q.device)
        return ring.check_call("forward", q, k, v, ring_group, causal, softmax_scale, layout, window_size)

    call = validate_together(ring_group.group, ring_group.world_size, validate)
    out, lse = RingAttentionFunction.apply(call, packing, *tensors)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the contiguous ('ring') layout: q (b, s, h, d), k and v (b, s, h_kv, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("ring", SEPARATE, (q, k, v), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_kvpacked_func(
        q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the contiguous ('ring') layout: q (b, s, h, d) and kv (b, s, 2, h_kv, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("ring", KV_PACKED, (q, kv), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_qkvpacked_func(
        qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the contiguous ('ring') layout: qkv (b, s, 3, h, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("ring", QKV_PACKED, (qkv,), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the 'zigzag' layout: q (b, s, h, d), k and v (b, s, h_kv, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("zigzag", SEPARATE, (q, k, v), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_kvpacked_func(
        q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the 'zigzag' layout: q (b, s, h, d) and kv (b, s, 2, h_kv, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("zigzag", KV_PACKED, (q, kv), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_qkvpacked_func(
        qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the 'zigzag' layout: qkv (b, s, 3, h, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("zigzag", QKV_PACKED, (qkv,), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def stripe_flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the 'stripe' layout: q (b, s, h, d), k and v (b, s, h_kv, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("stripe", SEPARATE, (q, k, v), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def stripe_flash_attn_kvpacked_func(
        q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the 'stripe' layout: q (b, s, h, d) and kv (b, s, 2, h_kv, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("stripe", KV_PACKED, (q, kv), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)


def stripe_flash_attn_qkvpacked_func(
        qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention on local shards in the 'stripe' layout: qkv (b, s, 3, h, d).
    Returns out, or (out, lse, None) with return_attn_probs=True."""
    return _ring_attention("stripe", QKV_PACKED, (qkv,), dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group)
