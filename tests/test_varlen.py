"""flash_attn_varlen_func and its packed forms (varlen.py, flash_attn_varlen_interface.py) against a
dense attention over the packed rows under an explicit per-sequence mask (conftest's varlen_mask):
CPU float64 end to end, and CUDA by FlashAttention's error rule. Forward, lse and gradients; empty
sequences, sequences without keys, padding rows past cu_seqlens_q[-1], GQA, windows, the errors."""
import re

import pytest
import torch

from conftest import (GRADIENT_EPS, assert_flash_rule, assert_lse_equal, assert_rounded_once, packed_attention,
                      packed_attention_with_grads, poison_cuda_allocator, requires_cuda_extension, skip_unless_built,
                      varlen_mask)
from ring_attn_ext import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

ATOL = 1e-11  # float64 end to end

# (cu_seqlens_q, total_q, cu_seqlens_k, total_k): sequences with fewer and more queries than keys,
# an empty one, one whose queries have no key, and two padding rows after the last sequence.
UNEVEN = ([0, 3, 3, 10, 17], 19, [0, 5, 7, 7, 20], 20)
SELF = ([0, 1, 6, 6, 14, 23], 23, [0, 1, 6, 6, 14, 23], 23)  # q and k alike (self-attention, qkvpacked)


def run_varlen(packing, q, k, v, cu_q, cu_k, max_q, max_k, **options):
    """(out, lse) through the function of `packing`; gradients reach q, k, v's leaves."""
    if packing == "separate":
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **options)
    elif packing == "kvpacked":
        out, lse, _ = flash_attn_varlen_kvpacked_func(q, torch.stack((k, v), dim=1), cu_q, cu_k, max_q, max_k,
                                                      return_attn_probs=True, **options)
    else:
        assert torch.equal(cu_q, cu_k)
        out, lse, _ = flash_attn_varlen_qkvpacked_func(torch.stack((q, k, v), dim=1), cu_q, max_q,
                                                       return_attn_probs=True, **options)
    return out, lse


def lengths_max(bounds):
    return max(b - a for a, b in zip(bounds, bounds[1:]))


CPU_CASES = [
    # (layout of sequences, packing, causal, window_size, heads, heads_kv, softmax_scale)
    (UNEVEN, "separate", False, (-1, -1), 4, 4, None),
    (UNEVEN, "separate", True, (-1, -1), 4, 2, None),
    (UNEVEN, "separate", True, (3, -1), 4, 1, 0.3),
    (UNEVEN, "kvpacked", False, (2, 1), 4, 2, None),
    (UNEVEN, "kvpacked", True, (-1, -1), 2, 2, None),
    (SELF, "qkvpacked", True, (-1, -1), 3, 3, None),
    (SELF, "qkvpacked", False, (1, 2), 3, 3, 0.5),
    (SELF, "separate", True, (4, 0), 6, 3, None),
]


@pytest.mark.parametrize("sequences, packing, causal, window_size, heads, heads_kv, softmax_scale", CPU_CASES)
def test_varlen_matches_dense_attention_on_cpu(sequences, packing, causal, window_size, heads, heads_kv,
                                               softmax_scale):
    bounds_q, total_q, bounds_k, total_k = sequences
    generator = torch.Generator().manual_seed(len(bounds_q) * 7 + heads_kv)

    def randn(rows, count):
        return torch.randn(rows, count, 8, dtype=torch.float64, generator=generator)

    q, k, v = randn(total_q, heads), randn(total_k, heads_kv), randn(total_k, heads_kv)
    dout = randn(total_q, heads)
    cu_q, cu_k = torch.tensor(bounds_q, dtype=torch.int32), torch.tensor(bounds_k, dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = run_varlen(packing, *leaves, cu_q, cu_k, lengths_max(bounds_q) + 1, lengths_max(bounds_k),
                          causal=causal, window_size=window_size, softmax_scale=softmax_scale)
    out.backward(dout)

    oracle_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = varlen_mask(bounds_q, bounds_k, causal, window_size)
    ref_out, ref_lse = packed_attention(*oracle_leaves, mask, softmax_scale)
    ref_out.backward(dout)
    assert lse.dtype == torch.float64 and lse.shape == (heads, total_q)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without keys differ"
    finite = ~torch.isneginf(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= ATOL
    for name, actual, expected in (("out", out, ref_out), ("dq", leaves[0].grad, oracle_leaves[0].grad),
                                   ("dk", leaves[1].grad, oracle_leaves[1].grad),
                                   ("dv", leaves[2].grad, oracle_leaves[2].grad)):
        error = (actual - expected).abs().max().item()
        assert error <= ATOL, f"{name}: max error {error:.3g}"
    assert not out[bounds_q[-1]:].any() and not leaves[0].grad[bounds_q[-1]:].any(), "padding rows must stay 0"


def test_varlen_returns_out_alone_by_default():
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_varlen_rereads_cu_seqlens_changed_in_place():
    """A cu_seqlens tensor from the caller is read on every call: a change in place must be seen by
    the next call, also one that leaves the version counter alone (through .data or a NumPy view,
    as a torch.distributed broadcast into the tensor does); tensors made under inference_mode (no
    version counter) work."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(12, 2, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    writes = [lambda bounds: cu.copy_(torch.tensor(bounds)), lambda bounds: cu.data.copy_(torch.tensor(bounds)),
              lambda bounds: cu.numpy().__setitem__(slice(None), bounds)]
    for write, bounds in zip(writes * 2, ([0, 5, 12], [0, 9, 12], [0, 2, 12], [0, 7, 12], [0, 11, 12], [0, 5, 12])):
        write(bounds)  # the same tensor, changed in place
        out = flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True)
        expected, _ = packed_attention(q, k, v, varlen_mask(bounds, bounds, True, (-1, -1)))
        assert (out - expected).abs().max() <= ATOL, bounds
    with torch.inference_mode():
        frozen = torch.tensor(bounds, dtype=torch.int32)
        out = flash_attn_varlen_func(q, k, v, frozen, frozen, 12, 12, causal=True)
    assert (out - expected).abs().max() <= ATOL


def test_bf16_on_cpu_rounds_once():
    """bf16 through the CPU path, forward and backward, against the same call in float64 (exact):
    every partial result stays in fp32, so the error stays near that of rounding the exact result
    (a delta or a sequence's gradients rounded to bf16 first would double it)."""
    generator = torch.Generator().manual_seed(12)
    cu = torch.tensor([0, 40, 41, 100], dtype=torch.int32)
    q, k, v, dout = (2 * torch.randn(100, 4, 64, generator=generator) for _ in range(4))
    results = {}
    for dtype in (torch.bfloat16, torch.float64):
        leaves = [t.to(torch.bfloat16).to(dtype).requires_grad_() for t in (q, k, v)]
        out = flash_attn_varlen_func(*leaves, cu, cu, 59, 59, causal=True)
        results[dtype] = (out, *torch.autograd.grad(out, leaves, dout.to(torch.bfloat16).to(dtype)))
    for name, actual, exact in zip(("out", "dq", "dk", "dv"), results[torch.bfloat16], results[torch.float64]):
        assert_rounded_once(name, actual, exact)


def test_varlen_checks_cu_seqlens_again_after_in_place_change():
    """The host copy of cu_seqlens is checked when it is read; a tensor that passed once and is then
    changed in place into a bad one must fail the checks on its next use."""
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    flash_attn_varlen_func(q, q, q, cu, cu, 4, 4)
    cu[1] = 5  # lengths 5 and 1: max_seqlen 4 is now too small
    with pytest.raises(ValueError, match=re.escape("max_seqlen_q (4) is smaller than the longest sequence")):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 5)
    cu[1] = 7  # would decrease
    with pytest.raises(ValueError, match="cu_seqlens_q must never decrease: sequence 1"):
        flash_attn_varlen_func(q, q, q, cu, cu, 7, 7)


def bad_varlen_calls():
    q, k = torch.randn(6, 2, 8), torch.randn(6, 1, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return [
        (ValueError, "q must have 3 dimensions (total_tokens, heads, head_dim)",
         lambda: flash_attn_varlen_func(q[None], k, k, cu, cu, 4, 4)),
        (TypeError, "cu_seqlens_q must be int32 (or int64)",
         lambda: flash_attn_varlen_func(q, k, k, cu.float(), cu, 4, 4)),
        (ValueError, "cu_seqlens_k must start at 0",
         lambda: flash_attn_varlen_func(q, k, k, cu, cu + 1, 4, 4)),
        (ValueError, "cu_seqlens_q must never decrease: sequence 1",
         lambda: flash_attn_varlen_func(q, k, k, torch.tensor([0, 4, 2]), cu, 4, 4)),
        (ValueError, "cu_seqlens_k ends at 7, past the 6 rows",
         lambda: flash_attn_varlen_func(q, k, k, cu, torch.tensor([0, 2, 7]), 4, 5)),
        (ValueError, "max_seqlen_q (3) is smaller than the longest sequence of cu_seqlens_q (4)",
         lambda: flash_attn_varlen_func(q, k, k, cu, cu, 3, 4)),
        (TypeError, "max_seqlen_k must be an int", lambda: flash_attn_varlen_func(q, k, k, cu, cu, 4, 4.0)),
        (ValueError, "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences",
         lambda: flash_attn_varlen_func(q, k, k, cu, torch.tensor([0, 6]), 4, 6)),
        (ValueError, "must divide the number of heads",
         lambda: flash_attn_varlen_func(torch.randn(6, 3, 8), k.expand(6, 2, 8), k.expand(6, 2, 8), cu, cu, 4, 4)),
        (NotImplementedError, "block_table", lambda: flash_attn_varlen_func(q, k, k, cu, cu, 4, 4, block_table=cu)),
        (NotImplementedError, "dropout_p", lambda: flash_attn_varlen_func(q, k, k, cu, cu, 4, 4, dropout_p=0.1)),
        (ValueError, "kv must have shape (total_tokens, 2, heads, head_dim)",
         lambda: flash_attn_varlen_kvpacked_func(q, k, cu, cu, 4, 4)),
        (ValueError, "max_seqlen (2) is smaller than the longest sequence of cu_seqlens (4)",
         lambda: flash_attn_varlen_qkvpacked_func(torch.stack((q, q, q), dim=1), cu, 2)),
    ]


@pytest.mark.parametrize("error_type, fragment, call", bad_varlen_calls())
def test_varlen_rejects_bad_arguments(error_type, fragment, call):
    with pytest.raises(error_type) as raised:
        call()
    assert fragment in str(raised.value)


# On CUDA: our kernels, one launch for all sequences, by FlashAttention's rule (2x the same-dtype error for out,
# 3x for gradients) against the float64 dense attention.
GPU_SEQUENCES = [
    ([0, 1, 18, 145, 145, 400, 657], 660, [0, 1, 30, 145, 200, 400, 657], 657),
    ([0, 128, 256, 384], 384, [0, 128, 256, 384], 384),
]


@requires_cuda_extension
@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("head_dim", [64, 128, 32, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sequences", GPU_SEQUENCES, ids=("uneven", "equal"))
@pytest.mark.parametrize("causal, window_size, heads_kv", [(False, (-1, -1), 8), (True, (-1, -1), 2),
                                                           (True, (100, 0), 1), (False, (64, 64), 2)])
def test_varlen_cuda_matches_dense_attention(head_dim, dtype, sequences, causal, window_size, heads_kv):
    skip_unless_built(head_dim, dtype, backward=True)
    bounds_q, total_q, bounds_k, total_k = sequences
    generator = torch.Generator(device="cuda").manual_seed(head_dim + heads_kv)

    def randn(rows, count):
        return torch.randn(rows, count, head_dim, device="cuda", dtype=dtype, generator=generator)

    q, k, v, dout = randn(total_q, 8), randn(total_k, heads_kv), randn(total_k, heads_kv), randn(total_q, 8)
    cu_q = torch.tensor(bounds_q, dtype=torch.int32, device="cuda")
    cu_k = torch.tensor(bounds_k, dtype=torch.int32, device="cuda")
    mask = varlen_mask(bounds_q, bounds_k, causal, window_size, device="cuda")

    ref_out, ref_lse, ref_grads = packed_attention_with_grads(q, k, v, dout, mask, torch.float64)
    same_out, _, same_grads = packed_attention_with_grads(q, k, v, dout, mask, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    poison_cuda_allocator()
    out, lse, _ = flash_attn_varlen_func(*leaves, cu_q, cu_k, lengths_max(bounds_q), lengths_max(bounds_k),
                                         causal=causal, window_size=window_size, return_attn_probs=True)
    out.backward(dout)
    assert_flash_rule(out, ref_out, same_out, 2, "out")
    assert_lse_equal(lse, ref_lse, atol=1e-3)
    for name, leaf, ref, same in zip(("dq", "dk", "dv"), leaves, ref_grads, same_grads):
        assert_flash_rule(leaf.grad, ref, same, 3, name, eps=GRADIENT_EPS)
