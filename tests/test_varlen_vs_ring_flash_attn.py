"""Switching from ring-flash-attn by changing an import, for packed sequences: its
llama3_flash_attn_prepare_cu_seqlens and ours give the same cu_seqlens, maxima and key slices, and
its llama3_flash_attn_varlen_func, ring_flash_attn_varlen_func and zigzag_ring_flash_attn_varlen_func
and ours the same out, lse and gradients for the same arguments, on CPU processes over gloo.

ring-flash-attn 0.1.8 comes from the peers folder (shared/peers: its wheel and a flash_attn
stand-in); the tests skip without it. Its varlen functions call flash-attn's varlen kernels, which
have no CPU build: here they are given benchmarks/bench_varlen.py's adapters over a stand-in for
PyTorch's FlashAttention-2 varlen operators that runs our flash_attn_varlen_func, so what is
compared is the two libraries' distributed plumbing (the prepared cu_seqlens, gathers or ring
steps, head strides, which keys each query meets): in float64 for llama3, in float32 for the ring
functions (ring-flash-attn's zigzag keeps its running out and lse in fp32).
"""
import os
import sys
import types

import pytest
import torch

import ring_attn_ext as ra
from ring_workers import RankPool
from test_ring_cpu import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_varlen  # noqa: E402  (benchmarks/ is not a package)


def peers_dir():
    for path in (os.environ.get("PEERS_DIR"), os.path.join(ROOT, ".carry", "peers"),
                 os.path.join(os.path.dirname(ROOT), "shared", "peers")):
        if path and os.path.isfile(os.path.join(path, "peers.py")):
            return path
    return None


PEERS_DIR = peers_dir()
pytestmark = pytest.mark.skipif(PEERS_DIR is None, reason="needs the peers folder with ring-flash-attn's wheel "
                                                          "($PEERS_DIR, .carry/peers or ../shared/peers)")


def ring_flash_attn():
    """ring-flash-attn, imported through peers.py (which unpacks the wheels on first use)."""
    if PEERS_DIR not in sys.path:
        sys.path.insert(0, PEERS_DIR)
    import peers
    return peers.ring_flash_attn()


def window_of(left, right):
    return (-1 if left is None else left, -1 if right is None else right)


def cpu_flash_operators():
    """Stand-ins for torch.ops.aten._flash_attention_forward/backward with cumulative lengths,
    computed by our flash_attn_varlen_func, as the `torch` that bench_varlen.torch_varlen_kernels
    takes."""
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, return_debug_mask, scale=None,
                window_size_left=None, window_size_right=None):
        out, lse, _ = ra.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                                                window_size=window_of(window_size_left, window_size_right),
                                                return_attn_probs=True)
        return out, lse, None, None, None

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, philox_seed, philox_offset,
                 scale=None, window_size_left=None, window_size_right=None):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            recomputed = ra.flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                                   causal=causal, window_size=window_of(window_size_left,
                                                                                        window_size_right))
            return torch.autograd.grad(recomputed, leaves, dout)

    operators = types.SimpleNamespace(_flash_attention_forward=forward, _flash_attention_backward=backward)
    return types.SimpleNamespace(ops=types.SimpleNamespace(aten=operators), zeros=torch.zeros, empty=torch.empty,
                                 int64=torch.int64, empty_like=torch.empty_like, autograd=torch.autograd)


def test_prepare_cu_seqlens_matches_ring_flash_attn():
    rfa = ring_flash_attn()
    for world_size in (1, 2, 3, 4, 8):
        for seed in range(10):
            bounds = bench_varlen.sequence_bounds(16 * world_size, 1, 21, seed)
            cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
            for rank in range(world_size):
                for causal in (True, False):
                    ours = ra.llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size)
                    theirs = rfa.llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size)
                    what = f"cu_seqlens {bounds}, rank {rank} of {world_size}, causal={causal}"
                    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), what
                    assert ours[2:4] == (int(theirs[2]), int(theirs[3])) and ours[4] == theirs[4], what


def same_results_on_rank(rank, world_size):
    rfa = ring_flash_attn()
    kernels = bench_varlen.torch_varlen_kernels(cpu_flash_operators())
    bench_varlen.give_rfa_varlen_kernels(rfa, *kernels[:2])
    for seed, (causal, heads_kv, stride) in enumerate(((True, 4, 4), (True, 2, 1), (False, 4, 2), (False, 1, 1))):
        bounds = bench_varlen.sequence_bounds(12 * world_size, 2, 17, seed)
        chunk = bounds[-1] // world_size
        rows = slice(rank * chunk, (rank + 1) * chunk)
        generator = torch.Generator().manual_seed(seed)
        q, k, v, dout = (torch.randn(bounds[-1], heads, 16, dtype=torch.float64, generator=generator)[rows]
                         for heads in (4, heads_kv, heads_kv, 4))
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        results = []
        for library in (ra, rfa):
            cu_q, cu_k, max_q, max_k, keys = library.llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank,
                                                                                           world_size)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse, _ = library.llama3_flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, stride, keys,
                                                                causal=causal, return_attn_probs=True)
            out.backward(dout)
            results.append((out, lse.to(torch.float64), *(t.grad for t in leaves)))
        for name, ours, theirs in zip(("out", "lse", "dq", "dk", "dv"), *results):
            assert_close(f"rank {rank}, cu_seqlens {bounds}, causal={causal}, heads_kv {heads_kv}, stride {stride}: "
                         + name, ours, theirs, atol=1e-12)
    return True


def same_ring_results_on_rank(rank, world_size):
    """ring_flash_attn_varlen_func and zigzag_ring_flash_attn_varlen_func, every rank holding its
    shards of each sequence and the shared local cu_seqlens: out and lse. (Not the gradients:
    ring-flash-attn's varlen backward keeps two rings of send/recv in flight at once, which gloo's
    CPU transport aborts on; ours are checked against dense attention in test_varlen_ring_cpu.py.)"""
    rfa = ring_flash_attn()
    bench_varlen.give_rfa_varlen_kernels(rfa, *bench_varlen.torch_varlen_kernels(cpu_flash_operators())[:2])
    seed = 0
    for layout, unit in (("ring", world_size), ("zigzag", 2 * world_size)):
        # ring-flash-attn's zigzag asserts causal=True.
        for causal, heads_kv in ((True, 4), (True, 2), (layout == "zigzag", 1)):
            seed += 1
            generator = torch.Generator().manual_seed(seed)
            local_lengths = (torch.randint(1, 4, (3,), generator=generator) * (unit // world_size)).tolist()
            cu_seqlens = torch.tensor([0] + local_lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            total_local = int(cu_seqlens[-1])
            # Any local values will do: both libraries read them as this rank's shards.
            torch.manual_seed(seed * 10 + rank)
            # float32: ring-flash-attn's zigzag keeps its running out and lse in fp32 and cannot take float64.
            q, k, v = (torch.randn(total_local, heads, 16) for heads in (4, heads_kv, heads_kv))
            results = []
            for library in (ra, rfa):
                function = getattr(library, f"{'zigzag_' if layout == 'zigzag' else ''}ring_flash_attn_varlen_func")
                out, lse, _ = function(q, k, v, cu_seqlens, max(local_lengths), causal=causal, return_attn_probs=True)
                results.append((out, lse))
            for name, ours, theirs in zip(("out", "lse"), *results):
                assert_close(f"rank {rank}, {layout}, local cu_seqlens {cu_seqlens.tolist()}, causal={causal}, "
                             f"heads_kv {heads_kv}: {name}", ours, theirs, atol=1e-5)
    return True


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("body", [same_results_on_rank, same_ring_results_on_rank], ids=("llama3", "ring_zigzag"))
def test_varlen_functions_match_ring_flash_attn(world_size, body):
    ring_flash_attn()  # unpacks the wheels here, before the ranks import them
    pool = RankPool(world_size)
    try:
        assert pool.run(body) == [True] * world_size
    finally:
        pool.close()
