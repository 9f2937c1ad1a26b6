"""The CUDA ring: the NCCL communicator of each process group, and the calls into the C++ ring
scheduler (csrc/ring/) that runs a plan of ring_plan.py on CUDA tensors.

    ring_forward_cuda(q, k, v, plan, group, softmax_scale) -> (out, lse)
    ring_backward_cuda(dout, q, k, v, out, lse, plan, group, softmax_scale) -> (dq, dk, dv)

q, k, v, dout, out: this rank's shards (b, s_local, h, d) / (b, s_local, h_kv, d), CUDA, float16 or
bfloat16, laid out as the kernels need (checks.kernel_compatible); lse: float32 (b, h, s_local) of
the global forward; plan: build_plan's steps for this rank; group: the ring's process group (None:
the default group; unused for a plan of one step, which needs no torch.distributed). Every rank of
the group must call together. ring.py validates the arguments and agrees them across ranks first.

The ring has its own NCCL communicator, made once per (group, device): group rank 0 draws an
ncclUniqueId, the group broadcasts it, every rank joins. It lives until destroy_communicators(),
which runs at exit (processes that end without running atexit handlers, such as multiprocessing
workers, call it themselves). A rank that dies or stops calling the ring cannot hang the others:
see timeout_seconds(). One thread at a time may run rings on a process group: calls from two
threads at once would interleave their transfers in a different order on each rank.

For tests, a whole ring also runs on one GPU, the virtual ranks exchanging blocks by device copies
through the same C++ scheduler:

    ring_forward_loopback(q_shards, k_shards, v_shards, plans, softmax_scale) -> (outs, lses)
    ring_backward_loopback(dout_shards, q_shards, k_shards, v_shards, out_shards, lse_shards, plans,
                           softmax_scale) -> (dqs, dks, dvs)
"""
import atexit
import math
import os

import torch
import torch.distributed as dist

from ._extension import require_extension

# (process group, CUDA device index) -> _C.RingCommunicator
_COMMUNICATORS = {}
DEFAULT_TIMEOUT_S = 600.0


def ring_forward_cuda(q, k, v, plan, group, softmax_scale):
    C = require_extension("ring attention on CUDA tensors")
    comm = _communicator_for(plan, group, q.device)
    return C.ring_fwd(q, k, v, _plan_lists(plan), comm, float(softmax_scale))


def ring_backward_cuda(dout, q, k, v, out, lse, plan, group, softmax_scale):
    C = require_extension("ring attention on CUDA tensors")
    comm = _communicator_for(plan, group, q.device)
    return C.ring_bwd(dout, q, k, v, out, lse, _plan_lists(plan), comm, float(softmax_scale))


def ring_forward_loopback(q_shards, k_shards, v_shards, plans, softmax_scale):
    C = require_extension("the loopback ring")
    outs, lses = C.ring_fwd_loopback(list(q_shards), list(k_shards), list(v_shards),
                                     [_plan_lists(plan) for plan in plans], float(softmax_scale))
    return list(outs), list(lses)


def ring_backward_loopback(dout_shards, q_shards, k_shards, v_shards, out_shards, lse_shards, plans, softmax_scale):
    C = require_extension("the loopback ring")
    dqs, dks, dvs = C.ring_bwd_loopback(list(dout_shards), list(q_shards), list(k_shards), list(v_shards),
                                        list(out_shards), list(lse_shards), [_plan_lists(plan) for plan in plans],
                                        float(softmax_scale))
    return list(dqs), list(dks), list(dvs)


def _plan_lists(plan):
    """build_plan's tuples of Piece as plain lists of plain tuples, what the C++ side converts."""
    return [[tuple(piece) for piece in step] for step in plan]


def _communicator_for(plan, group, device):
    """None for a ring of one rank (nothing travels); otherwise the cached communicator of
    (group, device), made on first use (collective over the group)."""
    if len(plan) == 1:
        return None
    if group is None:
        group = dist.group.WORLD
    world_size = dist.get_world_size(group)
    if len(plan) != world_size:
        raise ValueError(f"plan has {len(plan)} steps but the process group has {world_size} ranks")
    key = (group, device.index)
    comm = _COMMUNICATORS.get(key)
    if comm is None:
        comm = _make_communicator(group, device)
        _COMMUNICATORS[key] = comm
    return comm


def timeout_seconds():
    """The ring's NCCL timeout: RING_ATTN_TIMEOUT_S in the environment, else 600 s (PyTorch's own
    NCCL default). A join, connection or enqueue that makes no progress for that long aborts the
    ring's communicator and raises torch.distributed.DistBackendError; transfers stuck on the GPU
    end the process with a message on stderr (their results would be wrong)."""
    text = os.environ.get("RING_ATTN_TIMEOUT_S", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"RING_ATTN_TIMEOUT_S must be a positive number of seconds, got {text!r}")
    return seconds


def _make_communicator(group, device):
    C = require_extension("ring attention on CUDA tensors")
    timeout_s = timeout_seconds()
    rank = dist.get_rank(group)
    box = [C.nccl_unique_id() if rank == 0 else None]
    # An NCCL group broadcasts through the current CUDA device: make it this ring's.
    with torch.cuda.device(device):
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return C.RingCommunicator(box[0], rank, dist.get_world_size(group), device.index, timeout_s)


@atexit.register
def destroy_communicators():
    """Releases the NCCL resources of every ring communicator of this process (atexit runs it
    while CUDA is still up). A later ring call makes a new communicator, collectively. A
    communicator that fails to release (its peers exited with transfers unfinished: the release
    waits for them until the timeout) does not keep the others from being released; the first
    such error is raised after all were tried."""
    communicators = list(_COMMUNICATORS.values())
    _COMMUNICATORS.clear()
    first_error = None
    for comm in communicators:
        try:
            comm.destroy()
        except Exception as error:  # every communicator gets its turn; the first error is raised below
            first_error = first_error or error
    if first_error is not None:
        raise first_error
