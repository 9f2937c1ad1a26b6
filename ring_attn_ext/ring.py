"""Ring attention on local shards: the low-level forward and backward.

    forward(q, k, v, *, group=None, causal=False, softmax_scale=None, layout="ring",
            window_size=(-1, -1)) -> (out, lse)
    backward(dout, q, k, v, out, lse, *, same keywords) -> (dq, dk, dv)

q (b, s_local, h, d), k and v (b, s_local, h_kv, d) are this rank's shards of one global sequence
in `layout` (sharding.py); out is this rank's shard of the attention output and lse its (b, h,
s_local) log-sum-exp. causal and window_size apply to GLOBAL token positions. group is the ring's
process group (None: the default group; a world of one needs no torch.distributed at all).

Each call validates its arguments, agrees with the other ranks (group_checks.py: a clear error on
every rank instead of a hang), builds the rank's plan (ring_plan.py), then runs the ring: CUDA
tensors in the C++/NCCL ring (ring_attn_ext._ring_cuda), other tensors in the PyTorch reference
over torch.distributed (ring_reference.py, e.g. CPU tensors on a gloo group).
"""
import typing

import torch
import torch.distributed as dist

from . import checks
from .group_checks import Signature, check_cpu_backend, validate_together
from .masks import check_window_size
from .ring_plan import build_plan
from .ring_reference import ring_backward_reference, ring_forward_reference
from .sharding import check_layout

# The resolved process group: group is None only for a world of one without torch.distributed.
RingGroup = typing.NamedTuple("RingGroup", [("group", typing.Any), ("rank", int), ("world_size", int)])

# What a validated call runs: the rank's plan and the softmax scale as a float.
RingCall = typing.NamedTuple("RingCall", [("group", RingGroup), ("plan", tuple), ("softmax_scale", float)])


def forward(q, k, v, *, group=None, causal=False, softmax_scale=None, layout="ring", window_size=(-1, -1)):
    """(out, lse) of this rank's query shard: out (b, s_local, h, d) in q's dtype, lse (b, h,
    s_local) float32 (float64 for float64 inputs, which run in the reference)."""
    ring_group = resolve_group(group)
    call = validate_together(ring_group.group, ring_group.world_size, lambda: check_call(
        "forward", q, k, v, ring_group, causal, softmax_scale, layout, window_size))
    return run_forward(q, k, v, call)


def backward(dout, q, k, v, out, lse, *, group=None, causal=False, softmax_scale=None, layout="ring",
             window_size=(-1, -1)):
    """(dq, dk, dv) of this rank's shards, in the dtypes of q, k, v, given the forward's out and
    lse (the global ones of this rank's queries, as forward returned them) and dout."""
    ring_group = resolve_group(group)

    def validate():
        signature, call = check_call("backward", q, k, v, ring_group, causal, softmax_scale, layout, window_size)
        check_backward_tensors(dout, out, lse, q)
        return signature, call

    call = validate_together(ring_group.group, ring_group.world_size, validate)
    return run_backward(dout, q, k, v, out, lse, call)


def resolve_group(group):
    """The RingGroup for `group` (None: the default group, or a world of one when
    torch.distributed is not initialised)."""
    initialised = dist.is_available() and dist.is_initialized()
    if group is None:
        if not initialised:
            return RingGroup(None, 0, 1)
        group = dist.group.WORLD
    elif not initialised:
        raise RuntimeError("ring attention got a process group but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, or pass group=None for one process)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("ring attention: this process is not a member of the process group passed as `group`")
    return RingGroup(group, rank, dist.get_world_size(group))


def check_call(operation, q, k, v, ring_group, causal, softmax_scale, layout, window_size):
    """Validates one rank's arguments; returns (Signature, RingCall). Raises an exception naming the
    argument and the rule it breaks."""
    shape = checks.check_qkv(q, k, v)
    if shape.seqlen_q != shape.seqlen_k:
        raise ValueError(f"ring attention needs q, k and v shards of the same sequence: q holds {shape.seqlen_q} "
                         f"tokens and k/v hold {shape.seqlen_k}")
    needs_backward = operation == "backward" or checks.needs_autograd((q, k, v))
    window, call = plan_call(shape, q.dtype, q.device, needs_backward, ring_group, causal, softmax_scale, layout,
                             window_size)
    signature = Signature(operation, tuple(q.shape), tuple(k.shape), q.dtype, q.device.type, layout, causal,
                          tuple(window), call.softmax_scale, requires_grad=needs_backward)
    return signature, call


def plan_call(shape, dtype, device, needs_backward, ring_group, causal, softmax_scale, layout, window_size):
    """The ring's side of check_call for shards of `shape` (a checks.QKVShape with seqlen_q ==
    seqlen_k) and `dtype` on `device`, from metadata alone: returns ((left, right) window, RingCall).
    needs_backward: whether the backward kernels must exist too."""
    checks.check_flag(causal, "causal")
    scale = checks.check_softmax_scale(softmax_scale, shape.head_dim)
    window = check_window_size(window_size)
    check_layout(layout)
    if device.type == "cuda" and ring_group.world_size > 1:
        # Read again when the ring's communicator is made, collectively: a bad setting on one rank
        # must raise here, on every rank, rather than there, where the others would wait for it.
        from ._ring_cuda import timeout_seconds
        timeout_seconds()
    checks.check_device_support(shape, device, "ring attention on CUDA tensors", dtype, backward=needs_backward)
    check_cpu_backend(device, ring_group, "ring attention")
    plan = build_plan(layout, ring_group.rank, ring_group.world_size, shape.seqlen_q, causal, window)
    return window, RingCall(ring_group, plan, scale)


def check_backward_tensors(dout, out, lse, q):
    """dout and out like q; lse (b, h, s_local) float32 (or float64 for float64 q off CUDA)."""
    for t, name in ((dout, "dout"), (out, "out")):
        checks.check_tensor(t, name)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q ({tuple(q.shape)}), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    checks.check_tensor(lse, "lse")
    batch, seqlen, heads, _ = q.shape
    if tuple(lse.shape) != (batch, heads, seqlen):
        raise ValueError(f"lse must have shape (batch, heads, seqlen) = {(batch, heads, seqlen)}, "
                         f"got {tuple(lse.shape)}")
    allowed = (torch.float32, torch.float64) if (q.dtype == torch.float64 and not q.is_cuda) else (torch.float32,)
    if lse.dtype not in allowed:
        raise TypeError(f"lse must be {' or '.join(map(str, allowed))} (as forward returns it), got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on the device of q ({q.device}), got {lse.device}")


def run_forward(q, k, v, call):
    """Runs a validated forward; see forward."""
    group = call.group.group
    if q.is_cuda:
        from ._ring_cuda import ring_forward_cuda  # the compiled ring: only for CUDA tensors
        q, k, v = (checks.kernel_compatible(t) for t in (q, k, v))
        return ring_forward_cuda(q, k, v, call.plan, group, call.softmax_scale)
    return ring_forward_reference(q, k, v, call.plan, group, call.softmax_scale)


def run_backward(dout, q, k, v, out, lse, call):
    """Runs a validated backward; see backward."""
    group = call.group.group
    if q.is_cuda:
        from ._ring_cuda import ring_backward_cuda
        dout, q, k, v, out = (checks.kernel_compatible(t) for t in (dout, q, k, v, out))
        return ring_backward_cuda(dout, q, k, v, out, lse.contiguous(), call.plan, group, call.softmax_scale)
    return ring_backward_reference(dout, q, k, v, out, lse, call.plan, group, call.softmax_scale)
