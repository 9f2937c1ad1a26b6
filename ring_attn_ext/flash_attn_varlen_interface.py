"""FlashAttention-2's varlen API on one device: flash_attn_varlen_func,
flash_attn_varlen_kvpacked_func and flash_attn_varlen_qkvpacked_func, with its argument names,
layouts and return values, over packed variable-length sequences (varlen.py).

causal and window_size apply within each sequence, aligned to its bottom-right corner as in
flash_attn_func: query i of a sequence with s_q queries and s_k keys sits at key position
i + s_k - s_q.
"""
import functools

from . import checks
from .masks import band_for
from .packing import KV_PACKED, QKV_PACKED, SEPARATE
from .varlen import (PACKED_NAMES, Sequence, VarlenAttentionFunction, check_cu_seqlens, check_max_seqlen,
                     check_packed_tensors)

# The names of (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) in each form's signature.
_CU_NAMES = {SEPARATE: ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
             KV_PACKED: ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
             QKV_PACKED: ("cu_seqlens", "cu_seqlens", "max_seqlen", "max_seqlen")}


def _validate(what, packing, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
              softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
              block_table):
    """Checks everything before any work; returns (ext or None, softmax_scale, sequences)."""
    names = PACKED_NAMES[packing]
    check_packed_tensors((q, k, v), names)
    shape = checks.check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), names)
    softmax_scale, window = checks.check_options(shape.head_dim, dropout_p, softmax_scale, causal, window_size,
                                                 softcap, alibi_slopes, deterministic, return_attn_probs)
    checks.check_deterministic(deterministic, q.device)
    if block_table is not None:
        raise NotImplementedError("block_table: paged key/value caches are not supported yet; pass block_table=None")
    cu_q, cu_k, max_q, max_k = _CU_NAMES[packing]
    bounds_q = check_cu_seqlens(cu_seqlens_q, cu_q, shape.seqlen_q)
    if cu_seqlens_k is cu_seqlens_q and shape.seqlen_k >= bounds_q[-1]:
        bounds_k = bounds_q  # one tensor for both (self-attention): read once
    else:
        bounds_k = check_cu_seqlens(cu_seqlens_k, cu_k, shape.seqlen_k)
    check_max_seqlen(max_seqlen_q, max_q, bounds_q, cu_q)
    check_max_seqlen(max_seqlen_k, max_k, bounds_k, cu_k)
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"{cu_q} and {cu_k} must describe the same number of sequences, got {len(bounds_q) - 1} "
                         f"and {len(bounds_k) - 1}")
    needs_backward = checks.needs_autograd((q, k, v))
    ext = checks.check_device_support(shape, q.device, what, q.dtype, backward=needs_backward)
    return ext, softmax_scale, _sequences(bounds_q, bounds_k, causal, window)


@functools.lru_cache(maxsize=64)
def _sequences(bounds_q, bounds_k, causal, window):
    """The Sequence of every (query run, key run) pair, cached per packing: every attention layer
    of a step asks for the same one, and building it costs about a microsecond per sequence."""
    return tuple(
        Sequence(slice(q_begin, q_end), slice(k_begin, k_end), band_for(q_end - q_begin, k_end - k_begin, causal,
                                                                         window))
        for q_begin, q_end, k_begin, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]))


def _result(out, lse, return_attn_probs):
    return (out, lse, None) if return_attn_probs else out


_COMMON_DOC = """
    cu_seqlens_q / cu_seqlens_k: int32 (or int64) tensors of batch + 1 entries, the cumulative
      sequence lengths: sequence i is rows cu_seqlens[i] : cu_seqlens[i + 1] of the packed tensor.
      They are read on the host on every call (one device-to-host copy each, one in all when they
      are the same tensor): our kernels launch from a table of the sequences. The last entry may
      stop short of the packed tensor's rows: rows after it belong to no sequence and give out 0.
      To capture a call in a CUDA graph, pass them on the host and run the same packing once
      uncaptured first: that call puts the packing's sequence table on the device.
    max_seqlen_q / max_seqlen_k: ints no smaller than the longest sequence (a smaller one raises).
    Other arguments as in flash_attn_func: dropout_p must be 0.0, softcap 0.0, alibi_slopes None;
    deterministic=True raises on CUDA; causal and window_size apply within each sequence, aligned
    bottom-right. block_table (paged caches) must be None.
    return_attn_probs: if True, return (out, lse, None) with lse (heads, total_q) float32 (float64
    for float64 tensors off CUDA); rows that see no key have lse -inf and out 0.

    CUDA tensors run our kernels, all sequences in one launch (float16 or bfloat16, a compiled head_dim);
    tensors on other devices run the PyTorch reference.
"""


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    ext, softmax_scale, sequences = _validate(
        "flash_attn_varlen_func", SEPARATE, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
        block_table)
    out, lse = VarlenAttentionFunction.apply(SEPARATE, ext, softmax_scale, sequences, q, k, v)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    checks.check_packed(kv, "kv", 2, "k and v", varlen=True)
    ext, softmax_scale, sequences = _validate(
        "flash_attn_varlen_kvpacked_func", KV_PACKED, q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs, None)
    out, lse = VarlenAttentionFunction.apply(KV_PACKED, ext, softmax_scale, sequences, q, kv)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    checks.check_packed(qkv, "qkv", 3, "q, k and v", varlen=True)
    ext, softmax_scale, sequences = _validate(
        "flash_attn_varlen_qkvpacked_func", QKV_PACKED, qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
        max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, None)
    out, lse = VarlenAttentionFunction.apply(QKV_PACKED, ext, softmax_scale, sequences, qkv)
    return _result(out, lse, return_attn_probs)


flash_attn_varlen_func.__doc__ = """Attention over packed sequences: q (total_q, heads, head_dim), k and v
    (total_k, heads_kv, head_dim); returns out (total_q, heads, head_dim) in q's dtype.
""" + _COMMON_DOC
flash_attn_varlen_kvpacked_func.__doc__ = """Attention over packed sequences: q (total_q, heads, head_dim) and kv
    (total_k, 2, heads_kv, head_dim) holding k and v; the gradient of kv comes back packed the same way.
""" + _COMMON_DOC
flash_attn_varlen_qkvpacked_func.__doc__ = """Self-attention over packed sequences: qkv (total, 3, heads,
    head_dim) holding q, k and v, delimited by cu_seqlens (batch + 1 entries) with max_seqlen; the
    gradient of qkv comes back packed the same way.
""" + _COMMON_DOC
