"""llama3_flash_attn_varlen_func and its packed forms (llama3_attention.py) on CPU tensors over
gloo, worlds of 1 to 4 ranks, against dense attention over the whole packed stream (conftest's
varlen_mask: the sequences' block diagonal, causal and windows on stream positions) in float64,
forward, lse and gradients; llama3_flash_attn_prepare_cu_seqlens on a worked example; errors raised
on every rank."""
import pytest
import torch

from conftest import packed_attention, varlen_mask
from ring_attn_ext import (llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func,
                           llama3_flash_attn_varlen_kvpacked_func, llama3_flash_attn_varlen_qkvpacked_func, varlen)
from ring_workers import RankPool
from test_ring_cpu import assert_close, expect_error

ATOL = 1e-11


@pytest.fixture(scope="module")
def pool(request):
    ranks = RankPool(request.param)
    yield ranks
    ranks.close()


def test_prepare_cu_seqlens_worked_example():
    """Stream of 12 tokens in sequences [0, 5), [5, 6), [6, 12) over 3 ranks of 4 tokens."""
    cu = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    expected = {  # (rank, causal): (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)
        (0, True): ([0, 4], [0, 4], 4, 4, slice(0, 4)),
        (0, False): ([0, 4], [0, 5], 4, 5, slice(0, 5)),
        (1, True): ([0, 1, 2, 4], [0, 5, 6, 8], 2, 5, slice(0, 8)),
        (1, False): ([0, 1, 2, 4], [0, 5, 6, 12], 2, 6, slice(0, 12)),
        (2, True): ([0, 4], [0, 6], 4, 6, slice(6, 12)),
        (2, False): ([0, 4], [0, 6], 4, 6, slice(6, 12)),
    }
    for (rank, causal), (cu_q, cu_k, max_q, max_k, keys) in expected.items():
        got = llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, 3)
        assert got[0].tolist() == cu_q and got[1].tolist() == cu_k, (rank, causal, got)
        assert got[0].dtype == torch.int32 and got[2:] == (max_q, max_k, keys), (rank, causal, got)


@pytest.mark.parametrize("arguments, error_type, fragment", [
    ((torch.tensor([0, 5, 7]), True, 0, 3), ValueError, "(cu_seqlens[-1] = 7) must be a positive multiple of "
                                                       "world_size (3)"),
    ((torch.tensor([0, 6]), True, 3, 3), ValueError, "rank must lie in [0, world_size)"),
    ((torch.tensor([0, 6]), 1, 0, 3), TypeError, "causal must be a bool"),
    ((torch.tensor([1, 6]), True, 0, 3), ValueError, "cu_seqlens must start at 0"),
    (([0, 6], True, 0, 3), TypeError, "cu_seqlens must be a torch.Tensor"),
])
def test_prepare_cu_seqlens_rejects_bad_arguments(arguments, error_type, fragment):
    with pytest.raises(error_type) as raised:
        llama3_flash_attn_prepare_cu_seqlens(*arguments)
    assert fragment in str(raised.value)


def stream_bounds(world_size, chunk, seed):
    """cu_seqlens of a stream of world_size * chunk tokens cut at random: sequences of one token,
    sequences that cross chunk boundaries, and (when it comes out so) sequences over several chunks."""
    total = world_size * chunk
    generator = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, total, (max(1, total // 4),), generator=generator).tolist()))
    return [0, *cuts, total]


CASES = [
    # (packing, causal, window_size, heads, heads_kv, heads_k_stride, softmax_scale)
    ("separate", True, (-1, -1), 4, 4, 4, None),
    ("separate", False, (-1, -1), 4, 2, 1, None),
    ("separate", True, (3, 0), 4, 1, 1, 0.4),
    ("separate", False, (2, 1), 4, 2, 2, None),  # a window where queries sit inside their keys
    ("kvpacked", True, (-1, -1), 4, 2, 1, None),
    ("kvpacked", False, (-1, 3), 2, 2, 2, None),
    ("qkvpacked", True, (-1, -1), 2, 2, 1, None),
    ("qkvpacked", False, (-1, -1), 2, 2, 2, None),
]


def run_llama3(packing, q, k, v, prepared, heads_k_stride, **options):
    cu_q, cu_k, max_q, max_k, keys = prepared
    arguments = (cu_q, cu_k, max_q, max_k, heads_k_stride, keys)
    if packing == "separate":
        return llama3_flash_attn_varlen_func(q, k, v, *arguments, return_attn_probs=True, **options)
    if packing == "kvpacked":
        return llama3_flash_attn_varlen_kvpacked_func(q, torch.stack((k, v), dim=1), *arguments,
                                                      return_attn_probs=True, **options)
    return llama3_flash_attn_varlen_qkvpacked_func(torch.stack((q, k, v), dim=1), *arguments, return_attn_probs=True,
                                                   **options)


def check_case(rank, world_size, case, chunk, seed):
    packing, causal, window, heads, heads_kv, stride, scale = case
    bounds = stream_bounds(world_size, chunk, seed)
    total = bounds[-1]
    generator = torch.Generator().manual_seed(seed)

    def randn(count):
        return torch.randn(total, count, 8, dtype=torch.float64, generator=generator)

    q, k, v, dout = randn(heads), randn(heads_kv), randn(heads_kv), randn(heads)
    oracle_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = packed_attention(*oracle_leaves, varlen_mask(bounds, bounds, causal, window), scale)
    ref_out.backward(dout)

    rows = slice(rank * chunk, (rank + 1) * chunk)
    leaves = [t[rows].clone().requires_grad_() for t in (q, k, v)]
    prepared = llama3_flash_attn_prepare_cu_seqlens(torch.tensor(bounds, dtype=torch.int32), causal, rank,
                                                    world_size)
    out, lse, _ = run_llama3(packing, *leaves, prepared, stride, causal=causal, window_size=window,
                             softmax_scale=scale)
    out.backward(dout[rows])
    assert_rows_match(f"rank {rank}, cu_seqlens {bounds}, {case}", rows, out, lse, leaves, ref_out, ref_lse,
                      oracle_leaves)


def assert_rows_match(what, rows, out, lse, leaves, ref_out, ref_lse, oracle_leaves):
    """This rank's out, lse and the gradients of its leaves equal the oracle's at `rows` (a slice
    or an index of the global rows)."""
    try:
        assert_close("out", out, ref_out[rows])
        assert_close("lse", lse, ref_lse[:, rows])
        for name, leaf, oracle_leaf in zip(("dq", "dk", "dv"), leaves, oracle_leaves):
            assert_close(name, leaf.grad, oracle_leaf.grad[rows])
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from error


def all_cases_on_rank(rank, world_size, chunk):
    for number, case in enumerate(CASES):
        for seed in (number, number + 100):
            check_case(rank, world_size, case, chunk, seed)
    return True


def test_llama3_in_one_process_without_torch_distributed():
    all_cases_on_rank(0, 1, chunk=9)


def test_prepared_cu_seqlens_are_not_read_back(monkeypatch):
    """The tensors llama3_flash_attn_prepare_cu_seqlens makes are known on the host: a layer's call
    reads nothing back from them (on CUDA each read waits for the GPU's queue), unless they were
    changed in place since."""
    cu_q, cu_k, max_q, max_k, keys = llama3_flash_attn_prepare_cu_seqlens(
        torch.tensor([0, 3, 8], dtype=torch.int32), True, 0, 1)
    q = torch.randn(8, 2, 8, dtype=torch.float64)

    def no_read(tensor, name):
        raise AssertionError(f"{name} was read back")

    monkeypatch.setattr(varlen, "_read_bounds", no_read)
    out = llama3_flash_attn_varlen_func(q, q, q, cu_q, cu_k, max_q, max_k, 2, keys, causal=True)
    assert out.shape == q.shape
    cu_q[1] = 4
    with pytest.raises(AssertionError, match="cu_seqlens_q was read back"):
        llama3_flash_attn_varlen_func(q, q, q, cu_q, cu_k, max_q, max_k, 2, keys, causal=True)


@pytest.mark.parametrize("pool", [2, 3, 4], indirect=True)
def test_llama3_matches_full_attention(pool):
    assert pool.run(all_cases_on_rank, 7) == [True] * pool.world_size


def errors_on_rank(rank, world_size):
    """Bad arguments raise on every rank, naming the rule; none hangs."""
    chunk = 4
    bounds = torch.tensor([0, 3, chunk * world_size], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, keys = llama3_flash_attn_prepare_cu_seqlens(bounds, True, rank, world_size)
    q, kv = torch.randn(chunk, 4, 8, dtype=torch.float64), torch.randn(chunk, 2, 8, dtype=torch.float64)

    def call(q=q, k=kv, cu_k=cu_k, max_k=max_k, stride=2, keys=keys, **options):
        return llama3_flash_attn_varlen_func(q, k, k, cu_q, cu_k, max_q, max_k, stride, keys, causal=True, **options)

    expect_error(ValueError, "heads_k_stride must be an int that divides the 2 k/v heads", lambda: call(stride=3))
    expect_error(ValueError, "local_k_slice must be a slice(start, stop)", lambda: call(keys=(0, 4)))
    expect_error(ValueError, "cu_seqlens_k ends at", lambda: call(cu_k=cu_k + torch.tensor([0] * (len(cu_k) - 1) + [1]),
                                                                max_k=max_k + 1))
    expect_error(ValueError, "must hold the same tokens", lambda: call(k=kv[:3]))
    # Every rank passes what was prepared for another rank.
    theirs = llama3_flash_attn_prepare_cu_seqlens(bounds, True, world_size - 1 - rank, world_size)
    expect_error(ValueError, "must come from llama3_flash_attn_prepare_cu_seqlens for this rank", lambda: (
        llama3_flash_attn_varlen_func(q, kv, kv, *theirs[:4], 2, theirs[4], causal=True)))
    short_q = cu_q - (cu_q == chunk).to(cu_q.dtype)  # made for a chunk one token shorter
    expect_error(ValueError, f"cu_seqlens_q must end at {chunk}, the rows of this rank's chunk", lambda: (
        llama3_flash_attn_varlen_func(q, kv, kv, short_q, cu_k, max_q, max_k, 2, keys, causal=True)))
    expect_error(NotImplementedError, "dropout_p", lambda: call(dropout_p=0.5))
    expect_error(NotImplementedError, "alibi_slopes", lambda: call(alibi_slopes=torch.ones(4)))
    # Rank 1 alone gathers one head at a time: every rank raises instead of hanging in a gather.
    expect_error(ValueError, "disagree on heads_k_stride", lambda: call(stride=1 if rank == 1 else 2))
    # Rank 0 alone passes bad heads: the others learn that it rejected its arguments.
    bad = rank == 0
    expect_error(ValueError, "must divide the number" if bad else "rank(s) [0] of the process group rejected",
                 lambda: call(q=torch.randn(chunk, 3, 8, dtype=torch.float64) if bad else q))
    # Rank 0 alone passes a kv that does not hold k and v: the others raise too, none waits.
    packed = torch.stack((kv, kv), dim=1)
    expect_error(ValueError, "kv must have shape (total_tokens, 2, heads, head_dim)" if bad else
                 "rank(s) [0] of the process group rejected", lambda: llama3_flash_attn_varlen_kvpacked_func(
                     q, packed[:, :1] if bad else packed, cu_q, cu_k, max_q, max_k, 2, keys, causal=True))
    out = call()  # the group still works afterwards
    assert out.shape == q.shape and torch.isfinite(out).all()
    return True


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_llama3_errors_raise_on_every_rank(pool):
    assert pool.run(errors_on_rank) == [True] * 2
