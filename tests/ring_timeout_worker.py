"""A process of tests/test_ring_timeout.py (run as a script, so a process that hangs or aborts
cannot take pytest with it). Prints one line starting with RESULT for the test to read.

    python ring_timeout_worker.py join TIMEOUT_S
        a two-rank communicator whose second rank never comes: must raise DistBackendError.
    python ring_timeout_worker.py stuck TIMEOUT_S RANK INIT_FILE
        two ranks (one GPU each) run one ring forward together; then rank 0 runs another while
        rank 1 sits idle: rank 0's watchdog must abort it.
    python ring_timeout_worker.py fails TIMEOUT_S RANK INIT_FILE
        two ranks run one ring forward together; then both start another, but rank 1's runs out of
        memory before it enqueues its transfers. Rank 1 must raise that error, and its next call
        must raise DistBackendError (its communicator aborted) instead of pairing with rank 0's
        unmatched transfers; rank 0's watchdog must end rank 0.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

from ring_attn_ext import _ring_cuda
from ring_attn_ext._extension import _C
from ring_attn_ext.ring_plan import build_plan

WORLD_SIZE = 2


def join(timeout_s):
    start = time.monotonic()
    try:
        _C.RingCommunicator(_C.nccl_unique_id(), 0, WORLD_SIZE, 0, timeout_s)
    except dist.DistBackendError as error:
        print(f"RESULT raised after {time.monotonic() - start:.1f} s: {error}", flush=True)
        return
    print("RESULT no error", flush=True)


def first_ring(timeout_s, rank, init_file, seqlen_local=256):
    """Joins the two-rank group, runs one ring forward (which connects the ring) and returns the
    arguments of another: (q, k, v, plan, softmax_scale)."""
    os.environ["RING_ATTN_TIMEOUT_S"] = str(timeout_s)
    torch.cuda.set_device(rank)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD_SIZE)
    # A forward kernel this build has (gpu_suite.sh's builds have a subset of the head dims and dtypes).
    _, head_dim, dtype_name, _ = next(kernel for kernel in _C.compiled_kernels() if kernel[0] == "fwd")
    heads, dtype = 4, getattr(torch, dtype_name)
    q, k, v = (torch.randn(1, seqlen_local, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    plan = build_plan("zigzag", rank, WORLD_SIZE, seqlen_local, True)
    ring = (q, k, v, plan, head_dim ** -0.5)
    _ring_cuda.ring_forward_cuda(*ring[:4], None, ring[4])
    torch.cuda.synchronize()
    print(f"RESULT rank {rank}: first ring done", flush=True)
    return ring


def stuck(timeout_s, rank, init_file):
    q, k, v, plan, scale = first_ring(timeout_s, rank, init_file)
    if rank == 1:
        time.sleep(4 * timeout_s + 30)  # alive, but never calls the ring again
        os._exit(0)
    start = time.monotonic()
    _ring_cuda.ring_forward_cuda(q, k, v, plan, None, scale)  # nobody sends to rank 0 now
    torch.cuda.synchronize()
    print(f"RESULT rank 0: second ring returned after {time.monotonic() - start:.1f} s", flush=True)
    os._exit(0)


def fails(timeout_s, rank, init_file):
    # Blocks of megabytes: the ring's buffers cannot come from space left over in cached segments.
    q, k, v, plan, scale = first_ring(timeout_s, rank, init_file, seqlen_local=8192)
    if rank == 0:
        start = time.monotonic()
        _ring_cuda.ring_forward_cuda(q, k, v, plan, None, scale)  # rank 1 never sends its part
        torch.cuda.synchronize()
        print(f"RESULT rank 0: second ring returned after {time.monotonic() - start:.1f} s", flush=True)
        os._exit(0)
    # No memory beyond what this process holds now, and none of it free: the ring's first buffer
    # cannot be allocated.
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(rank).total_memory
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved(rank) / total, rank)
    filler = use_up_cached_memory()
    try:
        _ring_cuda.ring_forward_cuda(q, k, v, plan, None, scale)
        print("RESULT rank 1: second ring did not fail", flush=True)
    except RuntimeError as error:
        print(f"RESULT rank 1: second ring raised {type(error).__name__}: {error}".replace("\n", " "), flush=True)
    del filler
    torch.cuda.set_per_process_memory_fraction(1.0, rank)
    try:
        _ring_cuda.ring_forward_cuda(q, k, v, plan, None, scale)
        torch.cuda.synchronize()
        print("RESULT rank 1: third ring returned", flush=True)
    except dist.DistBackendError as error:
        print(f"RESULT rank 1: third ring raised DistBackendError: {error}".replace("\n", " "), flush=True)
    time.sleep(4 * timeout_s + 30)  # alive until the test is done with rank 0
    os._exit(0)


def use_up_cached_memory():
    """Allocates, largest blocks first, until the memory cap refuses: space left free inside the
    allocator's cached segments would otherwise serve the ring's smaller buffers."""
    held = []
    for size in (16 << 20, 1 << 20, 64 << 10, 512):
        while True:
            try:
                held.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
    return held


if __name__ == "__main__":
    mode, timeout = sys.argv[1], float(sys.argv[2])
    if mode == "join":
        join(timeout)
    else:
        {"stuck": stuck, "fails": fails}[mode](timeout, int(sys.argv[3]), sys.argv[4])
