"""Context parallelism for packed variable-length sequences by all-gathering K/V (the recipe of
Llama 3's training, and ring-flash-attn's llama3_* functions, with their names and arguments).

The packed token stream (all sequences back to back, cu_seqlens over the whole of it) is cut into
world_size equal contiguous chunks; rank r holds tokens r * L : (r + 1) * L of q, k and v. Every
rank all-gathers K/V, heads_k_stride k/v heads at a time (the gather of the next heads runs while
the current ones are computed, and bounds the memory the gathered copies take), and attends its
own queries to the keys of their sequences: local_k_slice picks those keys out of the gathered
stream and cu_seqlens_k delimits them, as llama3_flash_attn_prepare_cu_seqlens computes. The
backward gathers K/V again, computes dK/dV for the gathered rows in fp32 and reduce-scatters them
back to the ranks that own the rows.

causal and window_size apply to positions in the global stream: each sequence's queries and keys
are placed where they are in it, so windows are right even when a rank's queries sit in the middle
of a sequence's keys (non-causal).

Per rank, each sequence is one call of our kernels (varlen.py); CUDA tensors gather over the
group's CUDA backend (NCCL), through host copies where the group has none (gloo); other tensors
run the PyTorch reference over the group (gloo).
"""
import numbers
import typing

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import checks
from .collectives import all_gather_single, reduce_scatter_single
from .flash_attn_interface import prepare_for_kernels
from .group_checks import Signature, backend_supports_cpu, backend_supports_cuda, validate_together
from .masks import band_at_shift
from .packing import KV_PACKED, QKV_PACKED, SEPARATE, pack, unpack
from .ring import resolve_group
from .ring_reference import accumulation_dtype
from .varlen import (Sequence, check_cu_seqlens, check_max_seqlen, check_packed_form, check_packed_tensors,
                     empty_result, varlen_backward, varlen_forward)

# What a validated call runs.
Llama3Call = typing.NamedTuple("Llama3Call", [("group", typing.Any), ("ext", typing.Any),
                                              ("softmax_scale", float), ("sequences", tuple),
                                              ("heads_k_stride", int), ("key_rows", slice)])


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
    bounds = check_cu_seqlens(cu_seqlens, "cu_seqlens", None)
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
        return torch.tensor(values, dtype=cu_seqlens.dtype, device=cu_seqlens.device)

    return tensor(cu_q), tensor(cu_k), max(lengths_q), max(lengths_k), slice(keys_begin, keys_end)


def _check_call(q, k, v, names, ring_group, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                return_attn_probs):
    """Validates one rank's arguments; returns (Signature, Llama3Call)."""
    check_packed_tensors((q, k, v), names)
    shape = checks.check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), names)
    if shape.seqlen_q != shape.seqlen_k:
        raise ValueError(f"{names[0]} and {names[1]} must hold the same tokens, this rank's chunk of the packed "
                         f"stream: {shape.seqlen_q} and {shape.seqlen_k} rows")
    scale, window = checks.check_options(shape.head_dim, dropout_p, softmax_scale, causal, window_size, 0.0,
                                         alibi_slopes, deterministic, return_attn_probs)
    checks.check_deterministic(deterministic, q.device)
    if (not isinstance(heads_k_stride, numbers.Integral) or isinstance(heads_k_stride, bool)
            or not 1 <= heads_k_stride <= shape.heads_kv or shape.heads_kv % heads_k_stride != 0):
        raise ValueError(f"heads_k_stride must be an int that divides the {shape.heads_kv} k/v heads (the heads "
                         f"gathered at a time), got {heads_k_stride!r}")
    chunk, world_size = shape.seqlen_q, ring_group.world_size
    if (not isinstance(local_k_slice, slice) or local_k_slice.step not in (None, 1)
            or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                       for x in (local_k_slice.start, local_k_slice.stop))
            or not 0 <= local_k_slice.start <= local_k_slice.stop <= chunk * world_size):
        raise ValueError(f"local_k_slice must be a slice(start, stop) of the gathered stream's {chunk * world_size} "
                         f"rows (0 <= start <= stop), as llama3_flash_attn_prepare_cu_seqlens returns; got "
                         f"{local_k_slice!r}")
    bounds_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", chunk)
    bounds_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", local_k_slice.stop - local_k_slice.start)
    check_max_seqlen(max_seqlen_q, "max_seqlen_q", bounds_q, "cu_seqlens_q")
    check_max_seqlen(max_seqlen_k, "max_seqlen_k", bounds_k, "cu_seqlens_k")
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(bounds_q) - 1} and {len(bounds_k) - 1}")
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    ext = checks.check_device_support(shape, q.device, "llama3 varlen attention on CUDA tensors", q.dtype,
                                      backward=needs_backward)
    if world_size > 1 and not q.is_cuda and not backend_supports_cpu(ring_group.group):
        raise ValueError(f"llama3 varlen attention on {q.device.type} tensors needs a process group with a CPU "
                         f"backend such as gloo; this group's backend is {dist.get_backend(ring_group.group)}")
    # Query row i of sequence s sits at stream position rank * chunk + bounds_q[s] + i, key row j at
    # local_k_slice.start + bounds_k[s] + j: the band's shift is the difference of the two starts.
    q_start, k_start = ring_group.rank * chunk, local_k_slice.start
    sequences = tuple(
        Sequence(slice(q_begin, q_end), slice(k_begin, k_end),
                 band_at_shift((q_start + q_begin) - (k_start + k_begin), causal, window))
        for q_begin, q_end, k_begin, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]))
    signature = Signature("llama3", (1, *q.shape), (1, *k.shape), q.dtype, q.device.type, None, causal,
                          tuple(window), scale, heads_k_stride=heads_k_stride)
    return signature, Llama3Call(ring_group, ext, scale, sequences, heads_k_stride,
                                 slice(local_k_slice.start, local_k_slice.stop))


class _PendingGather:
    """The all-gather of `local` (chunk, ...) over the group into (world_size * chunk, ...), rank
    order, started at construction; wait() returns it."""

    def __init__(self, local, ring_group):
        self.work = None
        if ring_group.world_size == 1:
            self.result = local
            return
        self.result = local.new_empty((ring_group.world_size * local.shape[0], *local.shape[1:]))
        if local.is_cuda and not backend_supports_cuda(ring_group.group):
            host = torch.empty(self.result.shape, dtype=local.dtype)  # a group without a CUDA backend (gloo)
            all_gather_single(host, local.cpu(), group=ring_group.group)
            self.result.copy_(host)
        else:
            self.work = all_gather_single(self.result, local, group=ring_group.group, async_op=True)

    def wait(self):
        if self.work is not None:
            self.work.wait()  # on NCCL: the current stream waits, not the host
        return self.result


def _reduce_scatter(full, ring_group):
    """Sums `full` (world_size * chunk, ...) over the group; returns this rank's chunk rows."""
    if ring_group.world_size == 1:
        return full
    local = full.new_empty((full.shape[0] // ring_group.world_size, *full.shape[1:]))
    if full.is_cuda and not backend_supports_cuda(ring_group.group):
        host = torch.empty(local.shape, dtype=local.dtype)
        reduce_scatter_single(host, full.cpu(), group=ring_group.group)
        return local.copy_(host)
    reduce_scatter_single(local, full, group=ring_group.group)
    return local


def _gathered_kv_heads(k, v, call):
    """Yields (first k/v head, gathered (world_size * chunk, 2 * stride, d) holding k's then v's
    heads first : first + stride), gathering the next heads while the caller works on these."""
    stride = call.heads_k_stride

    def start(first):
        return _PendingGather(torch.cat((k[:, first:first + stride], v[:, first:first + stride]), dim=1), call.group)

    pending = start(0)
    for first in range(0, k.shape[1], stride):
        gathered = pending.wait()
        if first + stride < k.shape[1]:
            pending = start(first + stride)
        yield first, gathered


def _forward(q, k, v, call):
    out, lse = empty_result(q, q.shape[1])
    stride, group_size = call.heads_k_stride, q.shape[1] // k.shape[1]
    for first, gathered in _gathered_kv_heads(k, v, call):
        heads = slice(first * group_size, (first + stride) * group_size)
        keys = gathered[call.key_rows]
        varlen_forward(call.ext, q[:, heads], keys[:, :stride], keys[:, stride:], call.sequences, call.softmax_scale,
                       out[:, heads], lse[heads])
    return out, lse


def _backward(dout, q, k, v, out, lse, call):
    dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
    stride, group_size = call.heads_k_stride, q.shape[1] // k.shape[1]
    for first, gathered in _gathered_kv_heads(k, v, call):
        heads = slice(first * group_size, (first + stride) * group_size)
        keys = gathered[call.key_rows]
        # dK/dV of every gathered row, summed over the ranks in fp32 (float64 for float64).
        dkv = torch.zeros(gathered.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        rows = dkv[call.key_rows]
        varlen_backward(call.ext, dout[:, heads], q[:, heads], keys[:, :stride], keys[:, stride:], out[:, heads],
                        lse[heads], call.sequences, call.softmax_scale, dq[:, heads], rows[:, :stride],
                        rows[:, stride:])
        local = _reduce_scatter(dkv, call.group)
        dk[:, first:first + stride] = local[:, :stride]
        dv[:, first:first + stride] = local[:, stride:]
    return dq, dk, dv


class _Llama3Function(torch.autograd.Function):
    """apply(packing, call, *tensors) -> (out, lse); tensors packed along dimension 1."""

    @staticmethod
    def forward(ctx, packing, call, *tensors):
        q, k, v = prepare_for_kernels(call.ext, unpack(packing, tensors, dim=1))
        out, lse = _forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.packing, ctx.call = packing, call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        # No cross-rank check: the inputs are the forward's, which every rank agreed on.
        dq, dk, dv = _backward(dout, *ctx.saved_tensors, ctx.call)
        return (None, None, *pack(ctx.packing, dq, dk, dv, dim=1))


_NAMES = {SEPARATE: ("q", "k", "v"), KV_PACKED: ("q", "kv[:, 0]", "kv[:, 1]"),
          QKV_PACKED: ("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]")}


def _run(packing, tensors, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
         dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs, group):
    ring_group = resolve_group(group)
    call = validate_together(ring_group.group, ring_group.world_size, lambda: _check_call(
        *unpack(packing, tensors, dim=1), _NAMES[packing], ring_group, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
        deterministic, return_attn_probs))
    out, lse = _Llama3Function.apply(packing, call, *tensors)
    return (out, lse, None) if return_attn_probs else out


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
    check_packed_form(kv, "kv", 2, "k and v")
    return _run(KV_PACKED, (q, kv), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                return_attn_probs, group)


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False, group=None):
    check_packed_form(qkv, "qkv", 3, "q, k and v")
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
