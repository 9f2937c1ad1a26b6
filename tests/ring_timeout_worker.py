"""A process of tests/test_ring_timeout.py (run as a script, so a process that hangs or aborts
cannot take pytest with it). Prints one line starting with RESULT for the test to read.

    python ring_timeout_worker.py join TIMEOUT_S
        a two-rank communicator whose second rank never comes: must raise DistBackendError.
    python ring_timeout_worker.py stuck TIMEOUT_S RANK INIT_FILE
        two ranks (one GPU each) run one ring forward together; then rank 0 runs another while
        rank 1 sits idle: rank 0's watchdog must abort it.
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


def stuck(timeout_s, rank, init_file):
    os.environ["RING_ATTN_TIMEOUT_S"] = str(timeout_s)
    torch.cuda.set_device(rank)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD_SIZE)
    seqlen_local, heads, head_dim = 256, 4, _C.supported_head_dims()[0]
    q, k, v = (torch.randn(1, seqlen_local, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan = build_plan("zigzag", rank, WORLD_SIZE, seqlen_local, True)
    _ring_cuda.ring_forward_cuda(q, k, v, plan, None, head_dim ** -0.5)  # both ranks: connects the ring
    torch.cuda.synchronize()
    print(f"RESULT rank {rank}: first ring done", flush=True)
    if rank == 1:
        time.sleep(4 * timeout_s + 30)  # alive, but never calls the ring again
        os._exit(0)
    start = time.monotonic()
    _ring_cuda.ring_forward_cuda(q, k, v, plan, None, head_dim ** -0.5)  # nobody sends to rank 0 now
    torch.cuda.synchronize()
    print(f"RESULT rank 0: second ring returned after {time.monotonic() - start:.1f} s", flush=True)
    os._exit(0)


if __name__ == "__main__":
    mode, timeout = sys.argv[1], float(sys.argv[2])
    if mode == "join":
        join(timeout)
    else:
        stuck(timeout, int(sys.argv[3]), sys.argv[4])
