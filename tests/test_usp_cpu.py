"""Ulysses x ring attention on CPU tensors over gloo (usp_process_groups.py, ulysses.py,
usp_attention.py), against full attention on the unsharded tensors in float64, forward and
backward, for every way to split worlds of 2, 4 and 6 ranks into Ulysses groups and rings.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from ring_attn_ext import __main__ as main_job
from ring_attn_ext import ulysses
from ring_attn_ext import usp_process_groups
from ring_attn_ext.sharding import shard
from ring_attn_ext.usp_attention import heads_kv_repeat, usp_attn_func
from ring_attn_ext.usp_process_groups import usp_groups
from ring_workers import RankPool
from test_ring_cpu import assert_close, expect_error, oracle


@pytest.fixture(scope="module")
def pool(request):
    ranks = RankPool(request.param)
    yield ranks
    ranks.close()


def cases(degree, world_size):
    """Every layout, causal or not, k/v heads split (h_kv a multiple of U) or replicated (h_kv
    dividing U, MQA included), a window, batch 1 and 2, shards of one token per piece."""
    heads = 2 * degree
    result = []
    for layout in ("ring", "zigzag", "stripe"):
        for causal in (False, True):
            result.append(dict(layout=layout, causal=causal, heads=heads, heads_kv=heads, seqlen_local=2, batch=2))
            result.append(dict(layout=layout, causal=causal, heads=heads, heads_kv=1, seqlen_local=3, batch=1))
        result.append(dict(layout=layout, causal=True, heads=heads, heads_kv=degree, seqlen_local=1, batch=1,
                           window_size=(3, 0), softmax_scale=0.4))
        if degree > 2 and degree % 2 == 0:  # h_kv a divisor of U other than 1
            result.append(dict(layout=layout, causal=True, heads=heads, heads_kv=2, seqlen_local=2, batch=1))
    if world_size * 3 > 12:  # the largest worlds: a subset, every layout still causal, split and replicated
        result = [case for case in result if case["causal"]]
    return result


def check_case(rank, world_size, groups, case, seed):
    degree = groups.ulysses_degree
    layout, causal = case["layout"], case["causal"]
    window, scale = case.get("window_size", (-1, -1)), case.get("softmax_scale")
    if layout == "zigzag" and case["seqlen_local"] * degree % 2:
        return 0  # zigzag needs an even part per ring rank
    generator = torch.Generator().manual_seed(seed)
    seqlen = case["seqlen_local"] * world_size

    def randn(heads):
        return torch.randn(case["batch"], seqlen, heads, 8, generator=generator, dtype=torch.float64)

    q, k, v, dout = randn(case["heads"]), randn(case["heads_kv"]), randn(case["heads_kv"]), randn(case["heads"])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = oracle(*leaves, causal, window, scale)
    ref = dict(zip(("dq", "dk", "dv"), torch.autograd.grad((ref_out * dout).sum(), leaves)))
    ref.update(out=ref_out.detach(), lse=ref_lse.detach())

    def mine(t, dim=1):
        return shard(t, layout, rank, world_size, dim=dim, ulysses_degree=degree)

    inputs = [mine(t).requires_grad_() for t in (q, k, v)]
    out, lse, probs = usp_attn_func(*inputs, softmax_scale=scale, causal=causal, window_size=window,
                                    return_attn_probs=True, groups=groups, layout=layout)
    assert probs is None
    (out * mine(dout)).sum().backward()
    label = f"{case} U={degree} rank {rank}/{world_size}"
    assert_close(f"{label} out", out, mine(ref["out"]))
    assert_close(f"{label} lse", lse, mine(ref["lse"], dim=2))
    for name, leaf in zip(("dq", "dk", "dv"), inputs):
        assert_close(f"{label} {name}", leaf.grad, mine(ref[name]))
    return 1


def all_cases_on_rank(rank, world_size, degree):
    groups = usp_groups(degree)
    assert (groups.ulysses_rank, groups.ring_rank) == (rank % degree, rank // degree)
    assert dist.get_process_group_ranks(groups.ulysses_group) == list(
        range(rank - rank % degree, rank - rank % degree + degree))
    assert dist.get_process_group_ranks(groups.ring_group) == list(range(rank % degree, world_size, degree))
    return sum(check_case(rank, world_size, groups, case, seed=100 * degree + index)
               for index, case in enumerate(cases(degree, world_size)))


@pytest.mark.parametrize("pool, degree", [(2, 1), (2, 2), (4, 2), (4, 4), (6, 2), (6, 3)], indirect=["pool"])
def test_usp_matches_full_attention(pool, degree):
    counts = pool.run(all_cases_on_rank, degree)
    assert counts[0] > 0 and counts == [counts[0]] * pool.world_size


def exchange_round_trip_on_rank(rank, world_size):
    """The all-to-all on its own: sequence_to_heads gathers the group's pieces of the sequence in
    rank order for this rank's slice of heads; heads_to_sequence undoes it; lse likewise."""
    group = dist.group.WORLD
    heads, pieces = 2 * world_size, 3
    # Global (b, world_size * pieces, heads, d) with values that name their position and head.
    full = torch.arange(2 * world_size * pieces * heads * 4, dtype=torch.float64).view(2, world_size * pieces, heads, 4)
    local = full[:, rank * pieces:(rank + 1) * pieces]
    kv = full[:, rank * pieces:(rank + 1) * pieces, :world_size] + 0.5  # another head count, same exchange
    gathered, gathered_kv = ulysses.sequence_to_heads((local, kv), group, world_size)
    assert torch.equal(gathered, full[:, :, 2 * rank:2 * rank + 2])
    assert torch.equal(gathered_kv, full[:, :, rank:rank + 1] + 0.5)
    (back,) = ulysses.heads_to_sequence((gathered,), group, world_size)
    assert torch.equal(back, local)
    lse = full[..., 0].transpose(1, 2)  # (b, heads, s)
    mine = lse[:, 2 * rank:2 * rank + 2]
    assert torch.equal(ulysses.lse_heads_to_sequence(mine.contiguous(), group, world_size),
                       lse[:, :, rank * pieces:(rank + 1) * pieces])
    return True


@pytest.mark.parametrize("pool", [4], indirect=True)
def test_ulysses_exchange_moves_heads_and_tokens(pool):
    assert pool.run(exchange_round_trip_on_rank) == [True] * 4


def errors_on_rank(rank, world_size):
    """Bad arguments raise on every rank, naming the rule; none hangs."""
    expect_error(ValueError, "ulysses_degree (3) must divide world_size (4)", lambda: usp_groups(3))
    expect_error(ValueError, "every rank must pass the same one", lambda: usp_groups(2 if rank else 4))
    groups = usp_groups(2)
    generator = torch.Generator().manual_seed(1)

    def randn(heads, seqlen=2):
        return torch.randn(1, seqlen, heads, 8, generator=generator, dtype=torch.float64)

    q, kv = randn(4), randn(2)
    expect_error(ValueError, "must be a multiple of ulysses_degree=2",
                 lambda: usp_attn_func(randn(3), randn(3), randn(3), groups=groups))
    expect_error(ValueError, "k and v have 3 heads",
                 lambda: usp_attn_func(randn(6), randn(3), randn(3), groups=groups))
    expect_error(ValueError, "same sequence", lambda: usp_attn_func(q, randn(2, 4), randn(2, 4), groups=groups))
    expect_error(NotImplementedError, "dropout_p", lambda: usp_attn_func(q, kv, kv, dropout_p=0.1, groups=groups))
    expect_error(TypeError, "groups must be the UspGroups",
                 lambda: usp_attn_func(q, kv, kv, groups=dist.group.WORLD))
    # Rank 1 alone passes another layout: every rank raises instead of waiting in an exchange.
    expect_error(ValueError, "disagree on layout", lambda: usp_attn_func(
        q, kv, kv, causal=True, groups=groups, layout="stripe" if rank == 1 else "zigzag"))
    # Rank 1 alone passes groups of another Ulysses degree (the same local shapes): it would enter
    # other exchanges than the rest.
    pure_ulysses = usp_groups(4)
    expect_error(ValueError, "disagree on ulysses_degree", lambda: usp_attn_func(
        q, kv, kv, causal=True, groups=pure_ulysses if rank == 1 else groups))
    # Rank 3 alone passes bad heads: the others learn that it rejected its arguments.
    bad = rank == 3
    expect_error(ValueError, "must be a multiple" if bad else "rank(s) [3] of the process group rejected",
                 lambda: usp_attn_func(randn(3) if bad else q, randn(3) if bad else kv, randn(3) if bad else kv,
                                       groups=groups))
    # return_attn_probs is not compared across the ranks: rank 1 alone asking for lse must find the
    # others in the same exchanges (lse travels back on every call).
    result = usp_attn_func(q, kv, kv, causal=True, groups=groups, return_attn_probs=rank == 1)
    assert (result[0] if rank == 1 else result).shape == q.shape
    # The groups still work afterwards.
    out = usp_attn_func(q, kv, kv, causal=True, groups=groups)
    assert out.shape == q.shape and torch.isfinite(out).all()
    return True


def subgroup_parent_on_rank(rank, world_size):
    """usp_groups over a subgroup works where torch makes subgroups without splitting the default
    group's communicator (gloo), and is refused where it splits (a device bound to the default group),
    since the ranks outside the subgroup would never join the split."""
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in order
    parent = halves[rank // 2]
    groups = usp_groups(2, group=parent)
    assert groups.world_size == 2 and groups.ring_degree == 1 and groups.rank == rank % 2
    q = torch.randn(1, 2, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank // 2))
    out = usp_attn_func(q, q, q, groups=groups)  # both ranks of a half hold the same q: the same rows
    assert torch.isfinite(out).all()
    saved = usp_process_groups._subgroups_split_the_default_group
    usp_process_groups._subgroups_split_the_default_group = lambda: True
    try:
        expect_error(ValueError, "call usp_groups on every rank with group=None", lambda: usp_groups(2, group=parent))
        assert usp_groups(2).world_size == 4  # the default group itself is fine
    finally:
        usp_process_groups._subgroups_split_the_default_group = saved
    return True


@pytest.mark.parametrize("pool", [4], indirect=True)
def test_usp_groups_inside_a_subgroup(pool):
    assert pool.run(subgroup_parent_on_rank) == [True] * 4


@pytest.mark.parametrize("pool", [4], indirect=True)
def test_usp_errors_raise_on_every_rank(pool):
    assert pool.run(errors_on_rank) == [True] * 4


def test_kv_heads_are_replicated_only_as_often_as_needed():
    """k/v heads fewer than the Ulysses degree: ulysses_degree / heads_kv copies give each rank of a
    group exactly one k/v head (more would be right too, but move more through the exchanges)."""
    assert heads_kv_repeat(8, 2, 4) == 2 and heads_kv_repeat(8, 1, 4) == 4
    assert heads_kv_repeat(8, 4, 4) == 1 and heads_kv_repeat(16, 8, 4) == 1


def test_usp_groups_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        usp_groups(1)


def test_main_job_with_ulysses_groups():
    """`python -m ring_attn_ext --ulysses-degree 2` on 4 CPU processes: 2 rings of Ulysses pairs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "ring_attn_ext", "--device", "cpu", "--world-size", "4", "--ulysses-degree", "2",
               "--seqlen", "16", "--heads", "4", "--kv-heads", "1", "--head-dim", "8"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "Ulysses x ring attention (2 x 2)" in result.stdout, result.stdout
    rows = [row for row in map(str.split, result.stdout.splitlines()) if row[:2] in (["ring", "4"], ["zigzag", "4"],
                                                                                     ["stripe", "4"])]
    assert len(rows) == 3 and all(row[-1] == "pass" for row in rows), result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--ulysses-degree", "3"], "--ulysses-degree 3: ulysses_degree (3) must divide world_size (4)"),
    (["--ulysses-degree", "0"], "--ulysses-degree 0: ulysses_degree must be a positive int"),
    (["--ulysses-degree", "4", "--heads", "6"], "q has 6 heads, which must be a multiple of ulysses_degree=4"),
    (["--ulysses-degree", "4", "--kv-heads", "3", "--heads", "12"], "k and v have 3 heads; with ulysses_degree=4"),
    (["--ulysses-degree", "2", "--seqlen", "6", "--layouts", "zigzag"],
     "multiple of 2 * (world_size / ulysses_degree) = 4"),
    (["--ulysses-degree", "2", "--seqlen", "10"], "must be a multiple of ulysses_degree"),
])
def test_main_job_rejects_bad_ulysses_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_job.parse_args(["--device", "cpu", "--world-size", "4", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
