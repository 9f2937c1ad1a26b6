"""ring-flash-attn's varlen ring functions, with their names and arguments:
ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_func and their _kvpacked_func and
_qkvpacked_func forms.

Every sequence of a packed batch is split across the N ranks on its own, in the function's layout
(sharding.py): "ring" gives rank r the r-th of N contiguous pieces of each sequence, "zigzag" its
chunks r and 2N - 1 - r of 2N. Rank r's q, k and v (total_local, h, d) hold its pieces of all the
sequences back to back, and cu_seqlens, the same on every rank, delimits them: a sequence's global
length is N times its local one (the global cu_seqlens // N). To build the local tensors:
torch.cat([shard(x[b:e], layout, rank, N, dim=0) for b, e in global sequence bounds]).

The keys do not travel around a ring here: every rank all-gathers K/V (gathered_kv.py), the next
heads' gather overlapping the current heads' attention, reorders the gathered rows into whole
sequences and attends each run of its queries to its sequence, masked by global positions. The
arguments and results are ring-flash-attn's; the gathered K/V of heads_k_stride heads (a keyword of
ours; default all k/v heads) take N times the local K/V's memory at once, which a smaller
heads_k_stride bounds.
"""
import functools
import zlib

import torch

from . import checks
from .gathered_kv import GatherCall, attend, check_heads_k_stride, check_local_call
from .group_checks import Signature
from .masks import band_at_shift
from .packing import KV_PACKED, QKV_PACKED, SEPARATE
from .sharding import local_runs
from .varlen import PACKED_NAMES, Sequence, check_cu_seqlens, check_max_seqlen


# Every attention layer of a step sees the same packing: the index is built once (a few small
# tensor operations per sequence and rank) and reused while the packing stays.
@functools.lru_cache(maxsize=8)
def _key_stream(layout, bounds, world_size, rows_per_rank, device):
    """The gathered rows (rank r's rows at r * rows_per_rank onwards) reordered into the sequences'
    global order, sequence after sequence: a LongTensor index on `device` (read only: it is
    shared), or a slice where it is the identity. bounds: cu_seqlens as a tuple."""
    pieces = []
    for begin, end in zip(bounds, bounds[1:]):
        local = end - begin
        index = torch.empty(world_size * local, dtype=torch.long)
        for source in range(world_size):
            for run in local_runs(layout, source, world_size, local):
                index[run.global_start:run.global_start + run.length] = (
                    source * rows_per_rank + begin + run.local_start + torch.arange(run.length))
        pieces.append(index)
    keys = torch.cat(pieces)
    if torch.equal(keys, torch.arange(keys.numel())):
        return slice(0, keys.numel())
    return keys.to(device)


def _query_runs(layout, bounds, rank, world_size, causal, window):
    """varlen.Sequence per run of this rank's queries of each sequence: its local rows, the rows of
    its whole sequence in the key stream, and the band at its global position in the sequence."""
    runs = []
    for begin, end in zip(bounds, bounds[1:]):
        local = end - begin
        keys = slice(world_size * begin, world_size * end)
        for run in local_runs(layout, rank, world_size, local):
            rows = slice(begin + run.local_start, begin + run.local_start + run.length)
            runs.append(Sequence(rows, keys, band_at_shift(run.global_start, causal, window)))
    return tuple(runs)


def _check_call(layout, q, k, v, names, ring_group, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                window_size, alibi_slopes, deterministic, return_attn_probs, heads_k_stride):
    """Validates one rank's arguments; returns (Signature, GatherCall)."""
    shape, scale, window, ext = check_local_call(
        "varlen ring attention", q, k, v, names, "this rank's shards of the packed sequences", ring_group, dropout_p,
        softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs)
    stride = check_heads_k_stride(shape.heads_kv if heads_k_stride is None else heads_k_stride, shape.heads_kv)
    bounds = check_cu_seqlens(cu_seqlens, "cu_seqlens", shape.seqlen_q)
    check_max_seqlen(max_seqlen, "max_seqlen", bounds, "cu_seqlens")
    if layout == "zigzag":
        for index, (begin, end) in enumerate(zip(bounds, bounds[1:])):
            if (end - begin) % 2:
                raise ValueError(f"zigzag holds two equal chunks of every sequence on each rank, so every local "
                                 f"sequence length must be even; sequence {index} of cu_seqlens has {end - begin}")
    world_size = ring_group.world_size
    keys = _key_stream(layout, bounds, world_size, shape.seqlen_q, q.device)
    runs = _query_runs(layout, bounds, ring_group.rank, world_size, causal, window)
    signature = Signature("varlen", (1, *q.shape), (1, *k.shape), q.dtype, q.device.type, layout, causal,
                          tuple(window), scale, heads_k_stride=stride,
                          cu_seqlens_crc=zlib.crc32(str(bounds).encode()),
                          requires_grad=checks.needs_autograd((q, k, v)))
    return signature, GatherCall(ring_group, ext, scale, runs, stride, keys)


def _run(layout, packing, tensors, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
         alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride):
    return attend(packing, tensors, group, return_attn_probs, lambda q, k, v, ring_group: _check_call(
        layout, q, k, v, PACKED_NAMES[packing], ring_group, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
        window_size, alibi_slopes, deterministic, return_attn_probs, heads_k_stride))


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None, *, heads_k_stride=None):
    return _run("ring", SEPARATE, (q, k, v), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride)


def ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                         causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                         return_attn_probs=False, group=None, *, heads_k_stride=None):
    return _run("ring", KV_PACKED, (q, kv), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride)


def ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                          causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                          return_attn_probs=False, group=None, *, heads_k_stride=None):
    return _run("ring", QKV_PACKED, (qkv,), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride)


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None, *, heads_k_stride=None):
    return _run("zigzag", SEPARATE, (q, k, v), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride)


def zigzag_ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                deterministic=False, return_attn_probs=False, group=None, *,
                                                heads_k_stride=None):
    return _run("zigzag", KV_PACKED, (q, kv), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride)


def zigzag_ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                 causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                 deterministic=False, return_attn_probs=False, group=None, *,
                                                 heads_k_stride=None):
    return _run("zigzag", QKV_PACKED, (qkv,), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride)


_COMMON_DOC = """
    cu_seqlens: int32 (or int64), the cumulative LOCAL sequence lengths, the same on every rank;
      max_seqlen: an int no smaller than the longest local sequence. causal and window_size apply
      to positions within each (global) sequence. group: the process group (None: the default
      group, or one process without torch.distributed). heads_k_stride (keyword; ours): k/v heads
      per all-gather, a divisor of heads_kv (default: all of them). dropout_p must be 0.0 and
      alibi_slopes None; deterministic=True raises on CUDA. With return_attn_probs=True returns
      (out, lse, None), lse (heads, total_local) float32 (float64 for float64 tensors off CUDA).
      Every rank must call together with the same shapes, cu_seqlens and options; a rank that
      disagrees, or rejects its own arguments, makes every rank raise instead of hanging.
"""
_SHAPES = {SEPARATE: "q (total_local, heads, head_dim), k and v (total_local, heads_kv, head_dim)",
           KV_PACKED: "q and kv (total_local, 2, heads_kv, head_dim)",
           QKV_PACKED: "qkv (total_local, 3, heads, head_dim)"}


def _document(function, layout, packing):
    function.__doc__ = (f"Attention of this rank's {layout}-layout shards of packed sequences, {_SHAPES[packing]}, "
                        "over their whole sequences; returns out (total_local, heads, head_dim) in q's dtype, "
                        "autograd included (packed gradients come back packed).\n" + _COMMON_DOC)


for _arguments in ((ring_flash_attn_varlen_func, "ring", SEPARATE),
                   (ring_flash_attn_varlen_kvpacked_func, "ring", KV_PACKED),
                   (ring_flash_attn_varlen_qkvpacked_func, "ring", QKV_PACKED),
                   (zigzag_ring_flash_attn_varlen_func, "zigzag", SEPARATE),
                   (zigzag_ring_flash_attn_varlen_kvpacked_func, "zigzag", KV_PACKED),
                   (zigzag_ring_flash_attn_varlen_qkvpacked_func, "zigzag", QKV_PACKED)):
    _document(*_arguments)
