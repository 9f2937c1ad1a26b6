"""Attention of packed sequences whose K/V are spread over the ranks of a process group, by
all-gathering K/V: the engine of the llama3 functions (llama3_attention.py) and of the varlen ring
functions (varlen_ring_attention.py), which differ only in how the sequences lie across the ranks.

Every rank all-gathers K/V, heads_k_stride k/v heads at a time (the gather of the next heads runs
while the current ones are computed; fewer heads at a time bound the memory the gathered copies
take), picks out of the gathered rows (rank order) the key stream its queries need (`keys`: a slice,
or an index that also reorders), and attends each run of its queries to the keys of its sequence
(`sequences`, varlen.py: one launch of our kernels for all runs on CUDA, the reference elsewhere). The
backward gathers K/V again, computes dK/dV of the gathered rows in fp32 and reduce-scatters them
back to the ranks that own the rows.

CUDA tensors gather over the group's CUDA backend (NCCL), through host copies where the group has
none (gloo); other tensors run over the group's CPU backend (gloo).
"""
import numbers
import typing

import torch
from torch.autograd.function import once_differentiable

from . import checks
from .collectives import all_gather_single, reduce_scatter_single
from .flash_attn_interface import prepare_for_kernels
from .group_checks import backend_supports_cuda, check_cpu_backend, validate_together
from .packing import pack, unpack
from .ring import resolve_group
from .ring_reference import accumulation_dtype
from .varlen import check_packed_tensors, empty_result, varlen_backward, varlen_forward

# What a validated call runs: group is the RingGroup (ring.resolve_group); ext the compiled module
# or None (reference); sequences the varlen.Sequence runs of this rank's queries over the key
# stream; keys the key stream as a slice or a LongTensor index of the gathered rows.
GatherCall = typing.NamedTuple("GatherCall", [("group", typing.Any), ("ext", typing.Any),
                                              ("softmax_scale", float), ("sequences", tuple),
                                              ("heads_k_stride", int), ("keys", typing.Any)])


def check_local_call(what, q, k, v, names, holding, ring_group, dropout_p, softmax_scale, causal, window_size,
                     alibi_slopes, deterministic, return_attn_probs):
    """What every function on this engine checks: this rank's q, k, v (rows, h or h_kv, d) holding
    the same tokens (`holding` says which), the options, the kernels for the device and a group that
    can carry the tensors. what: the function family, for the messages. Returns (checks.QKVShape,
    softmax_scale as a float, (left, right) window, the compiled module or None)."""
    check_packed_tensors((q, k, v), names)
    shape = checks.check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), names)
    if shape.seqlen_q != shape.seqlen_k:
        raise ValueError(f"{names[0]} and {names[1]} must hold the same tokens, {holding}: {shape.seqlen_q} and "
                         f"{shape.seqlen_k} rows")
    scale, window = checks.check_options(shape.head_dim, dropout_p, softmax_scale, causal, window_size, 0.0,
                                         alibi_slopes, deterministic, return_attn_probs)
    checks.check_deterministic(deterministic, q.device)
    needs_backward = checks.needs_autograd((q, k, v))
    ext = checks.check_device_support(shape, q.device, f"{what} on CUDA tensors", q.dtype, backward=needs_backward)
    check_cpu_backend(q.device, ring_group, what)
    return shape, scale, window, ext


def check_heads_k_stride(heads_k_stride, heads_kv):
    if (not isinstance(heads_k_stride, numbers.Integral) or isinstance(heads_k_stride, bool)
            or not 1 <= heads_k_stride <= heads_kv or heads_kv % heads_k_stride != 0):
        raise ValueError(f"heads_k_stride must be an int that divides the {heads_kv} k/v heads (the heads "
                         f"gathered at a time), got {heads_k_stride!r}")
    return int(heads_k_stride)


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
        keys = gathered[call.keys]
        varlen_forward(call.ext, q[:, heads], keys[:, :stride], keys[:, stride:], call.sequences, call.softmax_scale,
                       out[:, heads], lse[heads])
    return out, lse


def _backward(dout, q, k, v, out, lse, call):
    dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
    stride, group_size = call.heads_k_stride, q.shape[1] // k.shape[1]
    for first, gathered in _gathered_kv_heads(k, v, call):
        heads = slice(first * group_size, (first + stride) * group_size)
        keys = gathered[call.keys]
        # dK/dV of every gathered row, summed over the ranks in fp32 (float64 for float64).
        dkv = torch.zeros(gathered.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        in_place = isinstance(call.keys, slice)  # a slice is a view of dkv; an index needs a copy back
        rows = dkv[call.keys] if in_place else torch.zeros_like(keys, dtype=dkv.dtype)
        varlen_backward(call.ext, dout[:, heads], q[:, heads], keys[:, :stride], keys[:, stride:], out[:, heads],
                        lse[heads], call.sequences, call.softmax_scale, dq[:, heads], rows[:, :stride],
                        rows[:, stride:])
        if not in_place:
            dkv.index_copy_(0, call.keys, rows)
        local = _reduce_scatter(dkv, call.group)
        dk[:, first:first + stride] = local[:, :stride]
        dv[:, first:first + stride] = local[:, stride:]
    return dq, dk, dv


def attend(packing, tensors, group, return_attn_probs, check_call):
    """Runs one call of a function on this engine: check_call(q, k, v, ring_group) -> (Signature,
    GatherCall) validates this rank's arguments on every rank together (group_checks.py), then the
    attention runs; returns out, or (out, lse, None) with return_attn_probs."""
    ring_group = resolve_group(group)

    def validate():
        # The packed tensor's shape too is checked inside the agreement: a rank that rejects it
        # makes every rank raise instead of leaving them waiting in the agreement's collective.
        checks.check_packing(packing, tensors, varlen=True)
        return check_call(*unpack(packing, tensors, dim=1), ring_group)

    call = validate_together(ring_group.group, ring_group.world_size, validate)
    out, lse = GatheredKVFunction.apply(packing, call, *tensors)
    return (out, lse, None) if return_attn_probs else out


class GatheredKVFunction(torch.autograd.Function):
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
