"""A rank that dies or stops calling the ring must not hang the others (csrc/ring/
ring_communicator.h): host-side waits raise torch.distributed.DistBackendError after
RING_ATTN_TIMEOUT_S, transfers stuck on the GPU end the process with a message, and a ring that
fails on one rank aborts that rank's communicator instead of leaving it out of step with its
peers. The GPU cases run in child processes (tests/ring_timeout_worker.py) under a deadline, so a
regression shows as a failure rather than as a hung test run."""
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


class _FakeCommunicator:
    def __init__(self, error=None):
        self.error, self.destroyed = error, False

    def destroy(self):
        self.destroyed = True
        if self.error is not None:
            raise self.error


def test_exit_releases_every_communicator_even_when_one_fails(monkeypatch):
    first, second = RuntimeError("first"), RuntimeError("second")
    communicators = {("a", 0): _FakeCommunicator(first), ("b", 0): _FakeCommunicator(),
                     ("c", 1): _FakeCommunicator(second)}
    monkeypatch.setattr(_ring_cuda, "_COMMUNICATORS", dict(communicators))
    with pytest.raises(RuntimeError) as raised:
        _ring_cuda.destroy_communicators()
    assert raised.value is first
    assert all(comm.destroyed for comm in communicators.values())
    assert not _ring_cuda._COMMUNICATORS


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


def run_two_ranks(mode, timeout_s):
    """Runs the worker's `mode` as ranks 0 and 1 (one GPU each) until rank 0 ends, then ends rank 1;
    returns (rank 0's exit code, its stdout, its stderr, rank 1's stdout, a report of it all)."""
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "rendezvous")
        ranks = [run_worker([mode, timeout_s, rank, init_file]) for rank in range(2)]
        returncode, out, err = finish(ranks[0], 180)
        ranks[1].kill()
        out_1, err_1 = ranks[1].communicate()
    report = (f"rank 0: rc {returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}\n"
              f"rank 1: stdout:\n{out_1}\nstderr:\n{err_1[-3000:]}")
    return returncode, out, err, out_1, report


@requires_cuda_extension
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs (one process per GPU)")
def test_a_ring_left_alone_by_its_peer_is_aborted():
    timeout_s = 5
    returncode, out, err, _, report = run_two_ranks("stuck", timeout_s)
    assert "RESULT rank 0: first ring done" in out, report
    assert "second ring returned" not in out, report
    # Either the transfers were enqueued and the watchdog ended the process, or the enqueue itself
    # waited and raised: both within the timeout, both saying why.
    aborted = returncode == -signal.SIGABRT and "made no progress within the timeout" in err
    raised = returncode != 0 and "DistBackendError" in err and f"timed out after {timeout_s} s" in err
    assert aborted or raised, report


@requires_cuda_extension
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs (one process per GPU)")
def test_a_ring_that_fails_on_one_rank_aborts_its_communicator():
    returncode, out, err, out_1, report = run_two_ranks("fails", 5)
    assert "RESULT rank 1: first ring done" in out_1, report
    # Rank 1's failure is its own error, raised as it happened...
    failure = [line for line in out_1.splitlines() if line.startswith("RESULT rank 1: second ring")]
    assert failure and "raised" in failure[0] and "out of memory" in failure[0].lower(), report
    # ...and its next call does not pair with rank 0's stale transfers: the communicator is gone.
    assert "RESULT rank 1: third ring raised DistBackendError" in out_1, report
    assert "an earlier ring call failed on this rank" in out_1, report
    # Rank 0, whose ring can never finish, is not left hanging or handed results: its watchdog ends
    # it, or, if NCCL learns of the abort while rank 0 still enqueues, the enqueue raises.
    assert "second ring returned" not in out, report
    aborted = returncode == -signal.SIGABRT and "Ending this process" in err
    raised = returncode != 0 and "DistBackendError" in err
    assert aborted or raised, report
