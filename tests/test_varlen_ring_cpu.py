"""ring_flash_attn_varlen_func and zigzag_ring_flash_attn_varlen_func with their packed forms
(varlen_ring_attention.py) on CPU tensors over gloo, worlds of 1 to 4 ranks, against dense
attention over the global packed sequences (conftest's varlen_mask) in float64: forward, lse and
gradients of every rank's shards; errors raised on every rank; the main job with --varlen."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import packed_attention, varlen_mask
from ring_attn_ext import __main__ as main_job
from ring_attn_ext import (ring_flash_attn_varlen_func, ring_flash_attn_varlen_kvpacked_func,
                           ring_flash_attn_varlen_qkvpacked_func, zigzag_ring_flash_attn_varlen_func,
                           zigzag_ring_flash_attn_varlen_kvpacked_func, zigzag_ring_flash_attn_varlen_qkvpacked_func)
from ring_attn_ext.sharding import positions, shard
from ring_workers import RankPool
from test_llama3_cpu import assert_rows_match
from test_ring_cpu import expect_error

FUNCTIONS = {
    ("ring", "separate"): ring_flash_attn_varlen_func,
    ("ring", "kvpacked"): ring_flash_attn_varlen_kvpacked_func,
    ("ring", "qkvpacked"): ring_flash_attn_varlen_qkvpacked_func,
    ("zigzag", "separate"): zigzag_ring_flash_attn_varlen_func,
    ("zigzag", "kvpacked"): zigzag_ring_flash_attn_varlen_kvpacked_func,
    ("zigzag", "qkvpacked"): zigzag_ring_flash_attn_varlen_qkvpacked_func,
}


@pytest.fixture(scope="module")
def pool(request):
    ranks = RankPool(request.param)
    yield ranks
    ranks.close()


def global_bounds(layout, world_size, seed):
    """Global cu_seqlens of random sequences whose lengths split in the layout: one of a single
    piece per rank, an empty one, and longer ones."""
    unit = 2 * world_size if layout == "zigzag" else world_size
    generator = torch.Generator().manual_seed(seed)
    lengths = [unit, 0] + (torch.randint(1, 5, (3,), generator=generator) * unit).tolist()
    order = torch.randperm(len(lengths), generator=generator).tolist()
    bounds = [0]
    for index in order:
        bounds.append(bounds[-1] + lengths[index])
    return bounds


def local_rows(layout, bounds, rank, world_size):
    """The global rows of this rank's local rows, sequence after sequence."""
    return torch.cat([begin + positions(end - begin, layout, rank, world_size)
                      for begin, end in zip(bounds, bounds[1:])])


CASES = [
    # (packing, causal, window_size, heads, heads_kv, heads_k_stride, softmax_scale)
    ("separate", True, (-1, -1), 4, 4, None, None),
    ("separate", False, (-1, -1), 4, 2, 1, None),
    ("separate", True, (3, 0), 4, 1, None, 0.4),
    ("separate", False, (2, 1), 4, 2, 2, None),
    ("kvpacked", True, (-1, -1), 4, 2, 1, None),
    ("qkvpacked", False, (-1, 3), 2, 2, None, None),
    ("qkvpacked", True, (-1, -1), 2, 2, 1, None),
]


def check_case(rank, world_size, layout, case, seed):
    packing, causal, window, heads, heads_kv, stride, scale = case
    bounds = global_bounds(layout, world_size, seed)
    generator = torch.Generator().manual_seed(seed)

    def randn(count):
        return torch.randn(bounds[-1], count, 8, dtype=torch.float64, generator=generator)

    q, k, v, dout = randn(heads), randn(heads_kv), randn(heads_kv), randn(heads)
    oracle_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = packed_attention(*oracle_leaves, varlen_mask(bounds, bounds, causal, window), scale)
    ref_out.backward(dout)

    rows = local_rows(layout, bounds, rank, world_size)
    leaves = [t[rows].clone().requires_grad_() for t in (q, k, v)]
    assert torch.equal(leaves[0].detach(), torch.cat([shard(q[b:e], layout, rank, world_size, dim=0)
                                                      for b, e in zip(bounds, bounds[1:])]))
    cu_local = torch.tensor(bounds, dtype=torch.int32) // world_size
    max_local = max(b - a for a, b in zip(bounds, bounds[1:])) // world_size
    options = dict(causal=causal, window_size=window, softmax_scale=scale, return_attn_probs=True,
                   heads_k_stride=stride)
    function = FUNCTIONS[(layout, packing)]
    if packing == "separate":
        out, lse, _ = function(*leaves, cu_local, max_local, **options)
    elif packing == "kvpacked":
        out, lse, _ = function(leaves[0], torch.stack(leaves[1:], dim=1), cu_local, max_local, **options)
    else:
        out, lse, _ = function(torch.stack(leaves, dim=1), cu_local, max_local, **options)
    out.backward(dout[rows])
    assert_rows_match(f"rank {rank} of {world_size}, {layout}, cu_seqlens {bounds}, {case}", rows, out, lse, leaves,
                      ref_out, ref_lse, oracle_leaves)


def all_cases_on_rank(rank, world_size):
    for layout in ("ring", "zigzag"):
        for number, case in enumerate(CASES):
            check_case(rank, world_size, layout, case, seed=number)
    return True


def test_varlen_ring_in_one_process_without_torch_distributed():
    all_cases_on_rank(0, 1)


@pytest.mark.parametrize("pool", [2, 3, 4], indirect=True)
def test_varlen_ring_matches_full_attention(pool):
    assert pool.run(all_cases_on_rank) == [True] * pool.world_size


def errors_on_rank(rank, world_size):
    """Bad arguments raise on every rank, naming the rule; none hangs."""
    q, kv = torch.randn(6, 4, 8, dtype=torch.float64), torch.randn(6, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    expect_error(ValueError, "every local sequence length must be even; sequence 0 of cu_seqlens has 3",
                 lambda: zigzag_ring_flash_attn_varlen_func(q, kv, kv, torch.tensor([0, 3, 6]), 3))
    expect_error(ValueError, "heads_k_stride must be an int that divides the 2 k/v heads",
                 lambda: ring_flash_attn_varlen_func(q, kv, kv, cu, 4, heads_k_stride=3))
    expect_error(ValueError, "max_seqlen (3) is smaller than the longest sequence of cu_seqlens (4)",
                 lambda: ring_flash_attn_varlen_func(q, kv, kv, cu, 3))
    expect_error(NotImplementedError, "dropout_p", lambda: ring_flash_attn_varlen_func(q, kv, kv, cu, 4, 0.1))
    # Rank 1 alone packs its sequences differently: every rank raises instead of attending to wrong keys.
    expect_error(ValueError, "disagree on cu_seqlens", lambda: ring_flash_attn_varlen_func(
        q, kv, kv, torch.tensor([0, 4, 6], dtype=torch.int32) if rank == 1 else cu, 4))
    expect_error(ValueError, "disagree on layout", lambda: (
        zigzag_ring_flash_attn_varlen_func if rank == 0 else ring_flash_attn_varlen_func)(q, kv, kv, cu, 4))
    # Rank 0 alone passes a qkv that does not hold q, k and v: the others raise too, none waits.
    qkv = torch.stack((kv, kv, kv), dim=1)
    expect_error(ValueError, "qkv must have shape (total_tokens, 3, heads, head_dim)" if rank == 0 else
                 "rank(s) [0] of the process group rejected", lambda: zigzag_ring_flash_attn_varlen_qkvpacked_func(
                     qkv[:, :2] if rank == 0 else qkv, cu, 4))
    out = zigzag_ring_flash_attn_varlen_func(q, kv, kv, cu, 4, causal=True)  # the group still works afterwards
    assert out.shape == q.shape and torch.isfinite(out).all()
    return True


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_varlen_ring_errors_raise_on_every_rank(pool):
    assert pool.run(errors_on_rank) == [True] * 2


def test_main_job_with_packed_sequences():
    """`python -m ring_attn_ext --varlen` on 3 CPU processes: llama3, ring and zigzag varlen."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "ring_attn_ext", "--device", "cpu", "--world-size", "3", "--varlen",
               "--seqlen", "48", "--heads", "4", "--kv-heads", "2", "--head-dim", "8"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "packed variable-length sequences" in result.stdout, result.stdout
    rows = [row for row in map(str.split, result.stdout.splitlines())
            if row[:2] in (["llama3", "3"], ["ring", "3"], ["zigzag", "3"])]
    assert len(rows) == 3 and all(row[-1] == "pass" for row in rows), result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--seqlen", "20"], "multiple of 2 * world-size = 8; got 20"),
    (["--ulysses-degree", "2"], "leave --batch and --ulysses-degree at 1"),
    (["--batch", "2"], "leave --batch and --ulysses-degree at 1"),
    (["--layouts", "stripe"], "--layouts: unknown ['stripe']; choose from llama3, ring, zigzag"),
])
def test_main_job_rejects_bad_varlen_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_job.parse_args(["--device", "cpu", "--world-size", "4", "--varlen", "--seqlen", "32", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
