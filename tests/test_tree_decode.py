"""Tree-attention decoding (ring_attn_ext/tree_decode.py): queries every rank holds, a cache split
unevenly across ranks (empty parts included), against attention over the whole cache.

CPU: gloo processes (worlds 2, 3 and 4) and a world of one, float64 end to end (1e-11). GPU: two
processes on one GPU over gloo (all-reduce of CUDA tensors), our kernel for each part, by
FlashAttention's rule against an fp32 reference and no worse than one kernel call on the whole cache.
"""
import math
import random

import pytest
import torch
import torch.distributed as dist

from conftest import (assert_flash_rule, assert_lse_equal, cuda_kernel_built, max_error, poison_cuda_allocator,
                      requires_cuda_extension)
from ring_attn_ext._extension import _C
from ring_attn_ext.reference import attention_reference
from ring_attn_ext.tree_decode import tree_attn_decode
from ring_workers import RankPool
from test_ring_cpu import assert_close, expect_error


@pytest.fixture(scope="module")
def pool(request):
    ranks = RankPool(request.param)
    yield ranks
    ranks.close()


def full_cache_attention(q, k, v, causal, q_start, scale=None):
    """(out, lse) over the whole cache, from the definition: query i at q_start + i sees key j iff
    j <= q_start + i when causal, every key otherwise."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        visible = torch.arange(k.shape[1])[None, :] <= q_start + torch.arange(q.shape[1])[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def split_points(length, parts, rng):
    """Uneven cut points of [0, length) into `parts` pieces, some of them empty."""
    cuts = sorted(rng.randint(0, length) for _ in range(parts - 1))
    return [0, *cuts, length]


# (batch, s_q, heads, heads_kv, cache length, causal, q_start); q_start None: queries after the cache.
CASES = [
    (2, 1, 4, 4, 23, False, None),
    (1, 1, 8, 2, 40, False, None),
    (2, 3, 4, 1, 31, True, 28),     # the last three cached tokens are the queries' own (speculative)
    (1, 5, 4, 2, 17, True, 6),      # queries in the middle: later ranks' keys are all in the future
    (1, 2, 2, 2, 0, False, None),   # an empty cache: out 0, lse -inf
    (1, 2, 2, 1, 9, True, 0),       # the first query sees only key 0
]


def check_cases(rank, world_size, device=torch.device("cpu"), dtype=torch.float64):
    checked = 0
    for index, (batch, seqlen_q, heads, heads_kv, cache, causal, q_start) in enumerate(CASES):
        generator = torch.Generator().manual_seed(index)
        q = torch.randn(batch, seqlen_q, heads, 8, generator=generator, dtype=torch.float64)
        k, v = (torch.randn(batch, cache, heads_kv, 8, generator=generator, dtype=torch.float64) for _ in range(2))
        cuts = split_points(cache, world_size, random.Random(index))
        mine = slice(cuts[rank], cuts[rank + 1])
        options = dict(causal=causal, q_start=q_start, k_start=cuts[rank]) if causal else {}
        out, lse = tree_attn_decode(*(t.to(device, dtype) for t in (q, k[:, mine], v[:, mine])),
                                    return_lse=True, **options)
        ref_out, ref_lse = full_cache_attention(q, k, v, causal, q_start)
        label = f"case {index} (cache cut at {cuts}) rank {rank}/{world_size}"
        assert_close(f"{label} out", out, ref_out.to(dtype))
        empty = torch.isneginf(ref_lse)  # rows that see no key anywhere
        assert torch.equal(torch.isneginf(lse), empty), f"{label} lse: -inf rows differ"
        assert_close(f"{label} lse", lse.masked_fill(empty, 0), ref_lse.masked_fill(empty, 0))
        checked += 1
    return checked


@pytest.mark.parametrize("pool", [2, 3, 4], indirect=True)
def test_tree_decode_matches_attention_over_the_whole_cache(pool):
    assert pool.run(check_cases) == [len(CASES)] * pool.world_size


def test_tree_decode_on_one_process():
    assert not dist.is_initialized()
    assert check_cases(0, 1) == len(CASES)
    q = torch.randn(1, 1, 2, 8, dtype=torch.float32)
    assert tree_attn_decode(q, q, q).dtype == torch.float32  # out alone, in q's dtype


def errors_on_rank(rank, world_size):
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 5, 2, 8)
    expect_error(ValueError, "needs q_start", lambda: tree_attn_decode(q, k, k, causal=True, k_start=0))
    expect_error(ValueError, "needs k_start", lambda: tree_attn_decode(q, k, k, causal=True, q_start=3, k_start=-1))
    expect_error(ValueError, "only with causal=True", lambda: tree_attn_decode(q, k, k, q_start=3))
    leaf = q.clone().requires_grad_()
    expect_error(NotImplementedError, "forward only", lambda: tree_attn_decode(leaf, k, k))
    # Ranks that disagree raise everywhere (rank 1 is the odd one out).
    odd = rank == 1
    message = expect_error(ValueError, "disagree on q shape", lambda: tree_attn_decode(q[:, :1] if odd else q, k, k))
    assert "the same queries" in message
    expect_error(ValueError, "disagree on q_start", lambda: tree_attn_decode(
        q, k, k, causal=True, q_start=4 if odd else 3, k_start=5 * rank))
    expect_error(ValueError, "disagree on k/v shape", lambda: tree_attn_decode(q, k[:, :, :1] if odd else k,
                                                                               k[:, :, :1] if odd else k))
    # Cache parts of different lengths are no disagreement.
    out = tree_attn_decode(q, k[:, :rank + 1], k[:, :rank + 1])
    assert torch.isfinite(out).all()
    # k_start is this rank's own: one far past int64 on rank 1 hides its keys, and raises nowhere.
    far = tree_attn_decode(q, k, k, causal=True, q_start=3, k_start=2**70 if odd else 0)
    torch.testing.assert_close(far, tree_attn_decode(q, k, k, causal=True, q_start=3, k_start=10**6 if odd else 0))
    return True


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_tree_decode_errors(pool):
    assert pool.run(errors_on_rank) == [True, True]


# GPU: two processes on one GPU, gloo all-reduces of CUDA tensors.

def _gpu_worker(rank, world_size, init_file, head_dim, dtype):
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world_size)
    try:
        for index, (batch, seqlen_q, heads, heads_kv, cache, causal, q_start) in enumerate(
                [(2, 1, 8, 2, 4000, False, None), (1, 4, 8, 8, 3001, True, 2997), (1, 3, 4, 1, 700, True, 100)]):
            generator = torch.Generator().manual_seed(index)

            def draw(length, count):
                return torch.randn(batch, length, count, head_dim, generator=generator).to("cuda", dtype)

            q, k, v = draw(seqlen_q, heads), draw(cache, heads_kv), draw(cache, heads_kv)
            cuts = split_points(cache, world_size, random.Random(index))
            mine = slice(cuts[rank], cuts[rank + 1])
            options = dict(causal=causal, q_start=q_start, k_start=cuts[rank]) if causal else {}
            poison_cuda_allocator()
            out, lse = tree_attn_decode(q, k[:, mine], v[:, mine], return_lse=True, **options)
            band = (None, q_start) if causal else (None, None)  # j - i <= q_start over the whole cache
            scale = head_dim ** -0.5
            ref_out, ref_lse = attention_reference(*(t.float() for t in (q, k, v)), scale, *band)
            same_out, _ = attention_reference(q, k, v, scale, *band, upcast=False)
            flash_out, _ = _C.fwd(q, k, v, scale, *band)
            label = f"case {index} rank {rank}"
            assert out.dtype == dtype
            assert_flash_rule(out, ref_out, same_out, 2, f"{label} out")
            rounding = max_error(ref_out.to(dtype), ref_out)
            assert max_error(out, ref_out) <= 1.5 * max_error(flash_out, ref_out) + rounding / 4 + 1e-6, label
            assert_lse_equal(lse, ref_lse, atol=2e-4, name=f"{label} lse")
    finally:
        dist.destroy_process_group()


@requires_cuda_extension
def test_tree_decode_on_one_gpu_over_gloo():
    from test_ring_gpu import PREFERRED_KERNELS, _spawn_ranks
    for head_dim, dtype in PREFERRED_KERNELS:
        if cuda_kernel_built(head_dim, dtype, backward=False):
            break
    else:
        pytest.skip("this build has a forward kernel for none of " + str(PREFERRED_KERNELS))
    _spawn_ranks(_gpu_worker, 2, head_dim, dtype, "tree decoding over gloo")
