"""Context parallelism for packed variable-length sequences by all-gathering K/V (the recipe of
Llama 3's training, and ring-flash-attn's llama3_* functions, with their names and arguments).

The packed token stream (all sequences back to back, cu_seqlens over the whole of it) is cut into
world_size equal contiguous chunks; rank r holds tokens r * L : (r + 1) * L of q, k and v. Every
rank all-gathers K/V (gathered_kv.py) and attends its own queries to the keys of their sequences:
local_k_slice picks those keys out of the gathered stream and cu_seqlens_k delimits them, as
llama3_flash_attn_prepare_cu_seqlens computes.

causal and window_size apply to positions in the global stream: each sequence's queries and keys
are placed where they are in it, so windows are right even when a rank's queries sit in the middle
of a sequence's keys (non-causal).
"""
import numbers

import torch

from . import checks
from .gathered_kv import GatherCall, attend, check_heads_k_stride, check_local_call
from .group_checks import Signature
from .masks import band_at_shift
from .packing import KV_PACKED, QKV_PACKED, SEPARATE
from .varlen import PACKED_NAMES, Sequence, check_cu_seqlens, check_max_seqlen, remember_bounds


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size):
    """What rank `rank` of `world_size` passes to llama3_flash_attn_varlen_func, from cu_seqlens of
    the whole packed stream (its last entry, the stream's length, a multiple of world_size):
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice).

    The rank's queries are tokens rank * L : (rank + 1) * L, cut into the sequences they belong to
    (cu_seqlens_q). Its keys are a slice of the gathered stream: from the start of its first
    sequence to the end of its own chunk (causal: no later key is visible) or to the end of its last
    sequence (non-causal), delimited per sequence by cu_seqlens_k. The tensors have cu_seqlens'
    dtype and device; the maxima are ints, local_k_slice a slice."""
    checks.check_flag(causal, "causal")
    for value, name in ((world_size, "world_size"), (rank, "rank")):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size) with world_size >= 1, got rank {rank}, world_size "
                         f"{world_size}")
    return prepare_from_bounds(check_cu_seqlens(cu_seqlens, "cu_seqlens", None), cu_seqlens.dtype,
                               cu_seqlens.device, causal, rank, world_size)


def prepare_from_bounds(bounds, dtype, device, causal, rank, world_size):
    """llama3_flash_attn_prepare_cu_seqlens on boundaries already read and checked (a tuple from
    check_cu_seqlens), its tensors made with `dtype` on `device`."""
    total = bounds[-1]
    if total == 0 or total % world_size != 0:
        raise ValueError(f"the packed stream's length (cu_seqlens[-1] = {total}) must be a positive multiple of "
                         f"world_size ({world_size}): every rank holds an equal chunk")
    chunk = total // world_size
    begin, end = rank * chunk, (rank + 1) * chunk
    # The sequences this chunk has tokens of, as (start, stop) in the stream.
    spans = [(start, stop) for start, stop in zip(bounds, bounds[1:]) if start < end and stop > begin]
    keys_begin = spans[0][0]
    keys_end = end if causal else spans[-1][1]
    cu_q = [0] + [min(stop, end) - begin for _, stop in spans]
    cu_k = [0] + [min(stop, keys_end) - keys_begin for _, stop in spans]
    lengths_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])]

    def tensor(values):
        made = torch.tensor(values, dtype=dtype, device=device)
        remember_bounds(made, values)  # every layer's call then reads nothing back from the device
        return made

    return tensor(cu_q), tensor(cu_k), max(lengths_q), max(lengths_k), slice(keys_begin, keys_end)


def check_call(q, k, v, names, ring_group, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
               local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
               return_attn_probs):
    """Validates one rank's arguments; returns (Signature, GatherCall)."""
    shape, scale, window, ext = check_local_call(
        "llama3 varlen attention", q, k, v, names, "this rank's chunk of the packed stream", ring_group, dropout_p,
        softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs)
    heads_k_stride = check_heads_k_stride(heads_k_stride, shape.heads_kv)
    chunk, world_size = shape.seqlen_q, ring_group.world_size
    if (not isinstance(local_k_slice, slice) or local_k_slice.step not in (None, 1)
            or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                       for x in (local_k_slice.start, local_k_slice.stop))
            or not 0 <= local_k_slice.start <= local_k_slice.stop <= chunk * world_size):
        raise ValueError(f"local_k_slice must be a slice(start, stop) of the gathered stream's {chunk * world_size} "
                         f"rows (0 <= start <= stop), as llama3_flash_attn_prepare_cu_seqlens returns; got "
                         f"{local_k_slice!r}")
    bounds_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", chunk)
    if bounds_q[-1] != chunk:
        # Every row of a chunk belongs to a sequence of the stream; a shorter cu_seqlens_q was made
        # for a shorter chunk, and its rows would sit at the wrong stream positions.
        raise ValueError(f"cu_seqlens_q must end at {chunk}, the rows of this rank's chunk (q), as "
                         f"llama3_flash_attn_prepare_cu_seqlens makes it for a stream of {chunk} tokens per rank; "
                         f"got {bounds_q[-1]}")
    bounds_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", local_k_slice.stop - local_k_slice.start)
    check_max_seqlen(max_seqlen_q, "max_seqlen_q", bounds_q, "cu_seqlens_q")
    check_max_seqlen(max_seqlen_k, "max_seqlen_k", bounds_k, "cu_seqlens_k")
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(bounds_q) - 1} and {len(bounds_k) - 1}")
    # Query row i of sequence s sits at stream position rank * chunk + bounds_q[s] + i, key row j at
    # local_k_slice.start + bounds_k[s] + j: the band's shift is the difference of the two starts.
    q_start, k_start = ring_group.rank * chunk, local_k_slice.start
    for index, (q_begin, q_end, k_begin, k_end) in enumerate(zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])):
        # A sequence's queries are among its keys, wherever they are cut: arguments prepared for
        # another rank (a global rank passed for a subgroup's, say) break that somewhere.
        if q_end > q_begin and not k_start + k_begin <= q_start + q_begin < q_start + q_end <= k_start + k_end:
            raise ValueError(
                f"sequence {index}: its queries (stream positions {q_start + q_begin} to {q_start + q_end - 1}) "
                f"must lie among its keys ({k_start + k_begin} to {k_start + k_end - 1}); cu_seqlens_q, "
                f"cu_seqlens_k and local_k_slice must come from llama3_flash_attn_prepare_cu_seqlens for this "
                f"rank ({ring_group.rank} of {world_size} in the group)")
    sequences = tuple(
        Sequence(slice(q_begin, q_end), slice(k_begin, k_end),
                 band_at_shift((q_start + q_begin) - (k_start + k_begin), causal, window))
        for q_begin, q_end, k_begin, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]))
    signature = Signature("llama3", (1, *q.shape), (1, *k.shape), q.dtype, q.device.type, None, causal,
                          tuple(window), scale, heads_k_stride=heads_k_stride,
                          requires_grad=checks.needs_autograd((q, k, v)))
    return signature, GatherCall(ring_group, ext, scale, sequences, heads_k_stride,
                                 slice(local_k_slice.start, local_k_slice.stop))


def _run(packing, tensors, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
         dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs, group):
    return attend(packing, tensors, group, return_attn_probs, lambda q, k, v, ring_group: check_call(
        q, k, v, PACKED_NAMES[packing], ring_group, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
        return_attn_probs))


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                  local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None):
    return _run(SEPARATE, (q, k, v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
               local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                return_attn_probs, group)


def llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                           causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                           return_attn_probs=False, group=None):
    return _run(KV_PACKED, (q, kv), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
               local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                return_attn_probs, group)


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False, group=None):
    return _run(QKV_PACKED, (qkv,), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
               local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                return_attn_probs, group)


_COMMON_DOC = """
    This rank's chunk of the packed stream: rows rank * L : (rank + 1) * L of the global q, k, v.
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k and local_k_slice come from
    llama3_flash_attn_prepare_cu_seqlens(cu_seqlens of the whole stream, causal, rank, world_size).
    heads_k_stride: how many k/v heads one all-gather carries (it must divide heads_kv); fewer
      means less memory for gathered copies and more, smaller collectives.
    group: the process group (None: the default group, or one process without torch.distributed).
    dropout_p must be 0.0 and alibi_slopes None (NotImplementedError otherwise); deterministic=True
    raises on CUDA. With return_attn_probs=True returns (out, lse, None), lse (heads, L) float32
    (float64 for float64 tensors off CUDA). Every rank must call together with chunks of the same
    shape and the same options; a rank that disagrees, or rejects its own arguments, makes every
    rank raise instead of hanging. Autograd works (dK/dV summed over the ranks in fp32).
"""

llama3_flash_attn_varlen_func.__doc__ = """Attention of this rank's queries q (L, heads, head_dim) over the
    keys of their sequences, gathered from every rank's k and v (L, heads_kv, head_dim); returns out
    (L, heads, head_dim) in q's dtype.
""" + _COMMON_DOC
llama3_flash_attn_varlen_kvpacked_func.__doc__ = """As llama3_flash_attn_varlen_func with kv (L, 2, heads_kv,
    head_dim) holding k and v; the gradient of kv comes back packed the same way.
""" + _COMMON_DOC
llama3_flash_attn_varlen_qkvpacked_func.__doc__ = """As llama3_flash_attn_varlen_func with qkv (L, 3, heads,
    head_dim) holding q, k and v; the gradient of qkv comes back packed the same way.
""" + _COMMON_DOC
