"""Packed variable-length sequences in one kernel launch (ring_attn_ext._C.varlen_fwd and
varlen_bwd_accumulate) instead of one launch per sequence.

The kernels read a table on the device, one int32 row per sequence: (q_begin, q_end, k_begin,
k_end, key_offset_min, key_offset_max), the band clamped into [-s_q, s_k] as the C++ API clamps a
plain call's (csrc/flash/flash_params.h, PackedSequence). They trust it, so it is built here only
from an already checked list of varlen.Sequence. Sequences without queries or without keys are
left out: their rows keep the caller's out 0 and lse -inf, and their gradients stay 0.

A backward launch must not hold two entries whose keys overlap (without GQA the kernel adds a key
block's dK/dV without atomics), so its entries are spread over launches with disjoint keys: one for
packed sequences, two for the zigzag layout's two query runs per sequence. A launch holds at most
65535 entries (the grid's y dimension).

Tables are cached per packing (LRU), so the attention layers of a step build and copy theirs to
the device once. The cache may drop a table while a kernel queued on another stream than the one
that made it has yet to read it, so each use is recorded with the allocator; and a table read under
CUDA graph capture is kept for good, since the graph reads it again on every replay
(_hold_for_current_stream). Capture finds its tables in the cache: a packing must have run once,
uncaptured, before (the warm-up that torch.cuda.graph asks for anyway).
"""
import bisect
import collections
import functools
import typing

import torch

from . import checks
from .masks import clamp_key_offset

MAX_ENTRIES = 65535


class Launch(typing.NamedTuple):
    """One kernel launch: the table on the device and what sizes and picks its kernel."""
    table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    is_masked: bool


def _entry(sequence):
    rows, keys = sequence.queries, sequence.keys
    s_q, s_k = rows.stop - rows.start, keys.stop - keys.start
    lo, hi = sequence.band
    lo = -s_q if lo is None else clamp_key_offset(lo, s_q, s_k)
    hi = s_k if hi is None else clamp_key_offset(hi, s_q, s_k)
    return rows.start, rows.stop, keys.start, keys.stop, lo, hi


def _masks(entry):
    """Whether the entry's band hides some key from some query (else an unmasked kernel serves it)."""
    q_begin, q_end, k_begin, k_end, lo, hi = entry
    return not (lo <= -(q_end - q_begin - 1) and hi >= k_end - k_begin - 1)


def _disjoint_key_groups(entries):
    """Entries split greedily into groups whose key ranges do not overlap, order kept within each."""
    groups = []  # (sorted key starts, their ends, entries)
    for entry in entries:
        start, end = entry[2], entry[3]
        for starts, ends, members in groups:
            i = bisect.bisect_right(starts, start)
            if (i == 0 or ends[i - 1] <= start) and (i == len(starts) or starts[i] >= end):
                starts.insert(i, start)
                ends.insert(i, end)
                members.append(entry)
                break
        else:
            groups.append(([start], [end], [entry]))
    return [members for _, _, members in groups]


def _is_capturing(device):
    """Whether the current stream of `device` is being captured into a CUDA graph."""
    if device.type != "cuda":  # the tables of the CPU tests
        return False
    with torch.cuda.device(device):  # torch 2.11's Stream has no is_capturing
        return torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=64)
def _launches(entries, device, disjoint_keys):
    if _is_capturing(device):  # copying the tables in would wait for the stream, which capture forbids
        raise RuntimeError("varlen attention under CUDA graph capture needs its packing's sequence tables on the "
                           "device already: run it once uncaptured with the same cu_seqlens (and causal and "
                           "window_size) before capturing, as a warm-up")
    groups = _disjoint_key_groups(entries) if disjoint_keys else [list(entries)]
    result = []
    for group in groups:
        for first in range(0, len(group), MAX_ENTRIES):
            chunk = group[first:first + MAX_ENTRIES]
            result.append(Launch(torch.tensor(chunk, dtype=torch.int32, device=device),
                                 max(e[1] - e[0] for e in chunk), max(e[3] - e[2] for e in chunk),
                                 any(_masks(e) for e in chunk)))
    return tuple(result)


# (id of a tuple of sequences, device, disjoint_keys) -> (that tuple, its launches): callers that
# keep one tuple per packing (flash_attn_varlen_func's cache) skip rebuilding the entries, whose
# cost grows with the number of sequences. The cache entry holds the tuple, so no other object can
# take its id while the entry lives.
_BY_IDENTITY = collections.OrderedDict()
_IDENTITY_CACHE_SIZE = 64


def launches(sequences, device, disjoint_keys):
    """The launches that cover `sequences` (varlen.Sequence) on `device`; with disjoint_keys, no
    launch holds two entries whose key ranges overlap."""
    device = torch.device(device)
    key = (id(sequences), device, disjoint_keys)
    hit = _BY_IDENTITY.get(key)
    if hit is not None:
        _BY_IDENTITY.move_to_end(key)
        return hit[1]
    entries = tuple(_entry(s) for s in sequences
                    if s.queries.stop > s.queries.start and s.keys.stop > s.keys.start)
    result = _launches(entries, device, disjoint_keys)
    if isinstance(sequences, tuple):  # immutable, so the launches stay right for it
        _BY_IDENTITY[key] = (sequences, result)
        if len(_BY_IDENTITY) > _IDENTITY_CACHE_SIZE:
            _BY_IDENTITY.popitem(last=False)
    return result


# Tables read by captured CUDA graphs, by id: a replay reads a table long after the cache may have
# dropped it, and nothing tells when the graph itself is gone.
_KEPT_FOR_GRAPHS = {}


def _hold_for_current_stream(launch):
    """Tells the caching allocator that the current stream reads the launch's table, so that freeing
    it (cache eviction) cannot hand its memory to the stream that made it before this read ran (a
    no-op on the stream that made it). Under graph capture the table is kept for the process's life."""
    device = launch.table.device
    launch.table.record_stream(torch.cuda.current_stream(device))
    if _is_capturing(device):
        _KEPT_FOR_GRAPHS[id(launch.table)] = launch.table
    return launch


def packed_forward(ext, q, k, v, sequences, softmax_scale, out, lse):
    """Writes every sequence's rows of out (total_q, h, d) and lse (h, total_q)."""
    for launch in map(_hold_for_current_stream, launches(sequences, q.device, disjoint_keys=False)):
        ext.varlen_fwd(q, k, v, out, lse, launch.table, launch.max_seqlen_q, launch.max_seqlen_k, softmax_scale,
                       launch.is_masked)


def packed_backward(ext, dout, q, k, v, out, lse, sequences, softmax_scale, dq, dk, dv):
    """Adds every sequence's gradients into dq (total_q, h, d), dk and dv (total_k, h_kv, d). dK/dV
    accumulate in place when their destinations are float32, else in float32 buffers added at the end."""
    dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dout = checks.kernel_compatible(dout)
    # delta = rowsum(dout * out) per row; the same pass zero-fills dq_accum.
    delta = ext.bwd_delta(dout.unsqueeze(0), out.unsqueeze(0), dq_accum.unsqueeze(0))[0]
    dk_accum, dv_accum = (t if t.dtype == torch.float32 else torch.zeros(t.shape, dtype=torch.float32,
                                                                         device=t.device) for t in (dk, dv))
    for launch in map(_hold_for_current_stream, launches(sequences, q.device, disjoint_keys=True)):
        ext.varlen_bwd_accumulate(dout, q, k, v, lse, delta, dq_accum, dk_accum, dv_accum, launch.table,
                                  launch.max_seqlen_q, launch.max_seqlen_k, softmax_scale, launch.is_masked)
    dq.add_(dq_accum)
    for destination, accum in ((dk, dk_accum), (dv, dv_accum)):
        if accum is not destination:
            destination.add_(accum)
