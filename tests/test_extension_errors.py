"""Errors raised inside the compiled extension must arrive in Python as exceptions, never as a
crash. Each case runs in a fresh interpreter so that a crash shows up as a failed test with its exit
code rather than taking the test session down."""
import subprocess
import sys

import pytest

from conftest import requires_cuda_extension

SETUP = """
import torch
from ring_attn_ext._extension import _C
d = _C.supported_head_dims()[0]
q = torch.randn(1, 8, 2, d, device="cuda", dtype=torch.bfloat16)
"""

CASES = {
    "mismatched k head_dim": ("_C.fwd(q, q[..., :8].contiguous(), q, 1.0, None, None)", "ValueError",
                              "k must have shape"),
    "mismatched dtypes": ("_C.fwd(q, q.half(), q, 1.0, None, None)", "TypeError", "must have the same dtype"),
    "float32 inputs": ("_C.fwd(q.float(), q.float(), q.float(), 1.0, None, None)", "TypeError",
                       "must be float16 or bfloat16"),
    "bad softmax_scale": ("_C.fwd(q, q, q, -1.0, None, None)", "ValueError", "softmax_scale must be"),
    "no query heads": ("_C.fwd(q[:, :, :0], q, q, 1.0, None, None)", "ValueError", "at least one head"),
    # Heads run along the grid's z dimension, which CUDA caps at 65535 blocks.
    "too many heads": ("w = torch.zeros(1, 1, 65536, d, device='cuda', dtype=q.dtype); "
                       "_C.fwd(w, w[:, :, :1], w[:, :, :1], 1.0, None, None)", "ValueError",
                       "must each be at most 65535"),
    # A varlen launch whose grid would have no blocks along x.
    "varlen max_seqlen 0": ("_C.varlen_fwd(q[0], q[0], q[0], torch.zeros_like(q[0]), torch.zeros(2, 8, device='cuda'), "
                            "torch.tensor([[0, 8, 0, 8, -8, 8]], dtype=torch.int32, device='cuda'), 0, 0, 1.0, False)",
                            "ValueError", "must be at least 1 when sequences has entries"),
    "wrong accumulator dtype": ("_C.fwd_merge(q, q, q, q, torch.zeros(1, 2, 8, device='cuda'), 1.0, None, None)",
                                "TypeError", "out_accum must be float32"),
}


@requires_cuda_extension
@pytest.mark.parametrize("case", sorted(CASES))
def test_extension_argument_errors_raise(case):
    call, exception, message = CASES[case]
    script = SETUP + f"""
try:
    {call}
except {exception} as error:
    assert "{message}" in str(error), str(error)
    print("raised as expected")
else:
    raise SystemExit("no exception")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr[-2000:]}"
    assert "raised as expected" in result.stdout
