"""A rank that dies or stops calling the ring must not hang the others (csrc/ring/
ring_communicator.h): host-side waits raise torch.distributed.DistBackendError after
RING_ATTN_TIMEOUT_S, and transfers stuck on the GPU end the process with a message. The GPU cases
run in child processes (tests/ring_timeout_worker.py) under a deadline, so a regression shows as a
failure rather than as a hung test run."""
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import requires_cuda_extension
from ring_attn_ext import _ring_cuda

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ring_timeout_worker.py")
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_timeout_defaults_to_ten_minutes(monkeypatch):
    monkeypatch.delenv("RING_ATTN_TIMEOUT_S", raising=False)
    assert _ring_cuda.timeout_seconds() == 600.0


@pytest.mark.parametrize("text,seconds", [("2.5", 2.5), (" 30 ", 30.0), ("", 600.0)])
def test_timeout_reads_the_environment(monkeypatch, text, seconds):
    monkeypatch.setenv("RING_ATTN_TIMEOUT_S", text)
    assert _ring_cuda.timeout_seconds() == seconds


@pytest.mark.parametrize("text", ["ten", "0", "-5", "inf", "nan"])
def test_bad_timeout_is_rejected_by_name(monkeypatch, text):
    monkeypatch.setenv("RING_ATTN_TIMEOUT_S", text)
    with pytest.raises(ValueError, match="RING_ATTN_TIMEOUT_S must be a positive number of seconds"):
        _ring_cuda.timeout_seconds()


def run_worker(args):
    env = dict(os.environ, **MULTICAST_OFF)
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(process, deadline_s):
    try:
        out, err = process.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the worker hung past {deadline_s} s\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
    return process.returncode, out, err


@requires_cuda_extension
def test_joining_a_ring_whose_peer_never_comes_raises():
    timeout_s = 3
    returncode, out, err = finish(run_worker(["join", timeout_s]), 120)
    assert "RESULT raised" in out, f"rc {returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert f"timed out after {timeout_s} s in joining the ring" in out, out
    elapsed = float(out.split("RESULT raised after ")[1].split(" s")[0])
    assert timeout_s <= elapsed < timeout_s + 30, f"raised after {elapsed} s for a timeout of {timeout_s} s"


@requires_cuda_extension
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs (one process per GPU)")
def test_a_ring_left_alone_by_its_peer_is_aborted():
    timeout_s = 5
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "rendezvous")
        ranks = [run_worker(["stuck", timeout_s, rank, init_file]) for rank in range(2)]
        returncode, out, err = finish(ranks[0], 180)
        ranks[1].kill()
        ranks[1].communicate()
    report = f"rc {returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert "RESULT rank 0: first ring done" in out, report
    assert "second ring returned" not in out, report
    # Either the transfers were enqueued and the watchdog ended the process, or the enqueue itself
    # waited and raised: both within the timeout, both saying why.
    aborted = returncode == -signal.SIGABRT and "made no progress within the timeout" in err
    raised = returncode != 0 and "DistBackendError" in err and f"timed out after {timeout_s} s" in err
    assert aborted or raised, report
