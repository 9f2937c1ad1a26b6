"""Sharding layouts: positions, shard/unshard round trips, errors (ring_attn_ext/sharding.py)."""
import pytest
import torch

from ring_attn_ext.sharding import LAYOUTS, local_runs, positions, shard, tokens_per_rank, unshard

WORLD_SIZES = range(1, 9)


def expected_positions(seqlen, layout, rank, world_size):
    """The layouts as DESIGN.md states them, written out independently of sharding.py."""
    if layout == "ring":
        size = seqlen // world_size
        return list(range(rank * size, (rank + 1) * size))
    if layout == "zigzag":
        chunk = seqlen // (2 * world_size)
        second = 2 * world_size - 1 - rank
        return list(range(rank * chunk, (rank + 1) * chunk)) + list(range(second * chunk, (second + 1) * chunk))
    return list(range(rank, seqlen, world_size))


def seqlens(layout, world_size):
    parts = 2 * world_size if layout == "zigzag" else world_size
    return [parts, 2 * parts, 3 * parts]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_positions_partition_the_sequence(layout, world_size):
    for seqlen in seqlens(layout, world_size):
        every = []
        for rank in range(world_size):
            pos = positions(seqlen, layout, rank, world_size)
            assert pos.dtype == torch.long
            assert pos.tolist() == expected_positions(seqlen, layout, rank, world_size)
            every += pos.tolist()
        assert sorted(every) == list(range(seqlen))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_shard_unshard_round_trip(layout, world_size):
    for seqlen in seqlens(layout, world_size):
        x = torch.randn(2, seqlen, 3, 4)
        parts = [shard(x, layout, rank, world_size) for rank in range(world_size)]
        for rank, part in enumerate(parts):
            assert part.shape == (2, seqlen // world_size, 3, 4)
            assert torch.equal(part, x[:, expected_positions(seqlen, layout, rank, world_size)])
        assert torch.equal(unshard(torch.cat(parts, dim=1), layout, world_size), x)
        assert torch.equal(unshard(parts, layout, world_size), x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_dims(layout):
    world_size, seqlen = 3, 12
    x = torch.randn(seqlen, 5)
    parts = [shard(x, layout, rank, world_size, dim=0) for rank in range(world_size)]
    assert torch.equal(unshard(torch.cat(parts), layout, world_size, dim=0), x)
    lse = torch.randn(2, 4, seqlen)  # (b, h, s): sequence last
    parts = [shard(lse, layout, rank, world_size, dim=-1) for rank in range(world_size)]
    assert torch.equal(parts[1], lse[..., expected_positions(seqlen, layout, 1, world_size)])
    assert torch.equal(unshard(torch.cat(parts, dim=-1), layout, world_size, dim=-1), lse)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_and_unshard_are_differentiable(layout):
    world_size, seqlen = 2, 8
    x = torch.randn(1, seqlen, 2, requires_grad=True)
    weight = torch.randn(1, seqlen // world_size, 2)
    (shard(x, layout, 1, world_size) * weight).sum().backward()
    expected = torch.zeros_like(x)
    expected[:, expected_positions(seqlen, layout, 1, world_size)] = weight
    assert torch.equal(x.grad, expected)
    parts = torch.randn(1, seqlen, 2, requires_grad=True)
    global_weight = torch.randn(1, seqlen, 2)
    (unshard(parts, layout, world_size) * global_weight).sum().backward()
    assert torch.equal(parts.grad, torch.cat([shard(global_weight, layout, r, world_size) for r in range(2)], dim=1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_local_runs_describe_positions(layout, world_size):
    seqlen_local = 4
    for rank in range(world_size):
        runs = local_runs(layout, rank, world_size, seqlen_local)
        listed = [run.global_start + i * run.stride for run in runs for i in range(run.length)]
        assert listed == expected_positions(seqlen_local * world_size, layout, rank, world_size)
        assert [run.local_start for run in runs] == [sum(r.length for r in runs[:i]) for i in range(len(runs))]
        for a, b in zip(runs, runs[1:]):  # maximal: consecutive runs do not continue each other
            assert a.global_start + a.length * a.stride != b.global_start
    assert len(local_runs("zigzag", 0, 1, 4)) == 1  # both chunks of a single rank touch
    assert len(local_runs("zigzag", 2, 3, 4)) == 1  # chunks 2 and 3 of the last rank touch too
    assert len(local_runs("zigzag", 1, 3, 4)) == 2


def test_errors_name_the_rule():
    with pytest.raises(ValueError, match="multiple of world_size = 3"):
        positions(10, "ring", 0, 3)
    with pytest.raises(ValueError, match="multiple of world_size = 4"):
        shard(torch.randn(1, 6, 1, 1), "stripe", 0, 4)
    with pytest.raises(ValueError, match=r"multiple of 2 \* world_size = 6"):
        positions(9, "zigzag", 0, 3)
    with pytest.raises(ValueError, match="layout must be one of"):
        positions(8, "diagonal", 0, 2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\)"):
        positions(8, "ring", 2, 2)
    with pytest.raises(ValueError, match="rank must be"):
        shard(torch.randn(1, 8), "zigzag", -1, 2)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        positions(8, "ring", 0, 0)
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        shard(torch.randn(4, 4), "ring", 0, 2, dim=3)
    with pytest.raises(ValueError, match="2 local parts for world_size=3"):
        unshard([torch.randn(1, 2), torch.randn(1, 2)], "ring", 3)
    with pytest.raises(ValueError, match=r"local parts of unequal lengths \[3, 5\] along dim 1"):
        unshard(list(torch.arange(8.0)[None].split([3, 5], dim=1)), "zigzag", 2)
    with pytest.raises(ValueError, match="seqlen_local must be even"):
        local_runs("zigzag", 0, 2, 3)
    assert tokens_per_rank(24, "zigzag", 3) == 8


def ulysses_splits(world_size):
    return [degree for degree in range(1, world_size + 1) if world_size % degree == 0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ulysses_degree_splits_each_ring_part_in_rank_order(layout, world_size):
    """Rank r holds the (r % U)-th of U equal contiguous pieces of ring rank r // U's part of the
    layout over world_size / U ranks (DESIGN: Ulysses groups of consecutive ranks)."""
    for degree in ulysses_splits(world_size):
        rings = world_size // degree
        parts = 2 * rings if layout == "zigzag" else rings
        seqlen = parts * degree * 2
        every = []
        for rank in range(world_size):
            ring_part = expected_positions(seqlen, layout, rank // degree, rings)
            size = len(ring_part) // degree
            expected = ring_part[(rank % degree) * size:(rank % degree + 1) * size]
            assert positions(seqlen, layout, rank, world_size, ulysses_degree=degree).tolist() == expected
            every += expected
        assert sorted(every) == list(range(seqlen))
        x = torch.randn(2, seqlen, 3)
        pieces = [shard(x, layout, rank, world_size, ulysses_degree=degree) for rank in range(world_size)]
        assert torch.equal(unshard(pieces, layout, world_size, ulysses_degree=degree), x)
        assert tokens_per_rank(seqlen, layout, world_size, ulysses_degree=degree) == seqlen // world_size


def test_ulysses_degree_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"ulysses_degree \(3\) must divide world_size \(4\)"):
        positions(12, "ring", 0, 4, ulysses_degree=3)
    with pytest.raises(ValueError, match="ulysses_degree must be a positive int"):
        shard(torch.randn(1, 8), "ring", 0, 2, ulysses_degree=0)
    # Zigzag over 2 rings needs seqlen % 4 == 0; each ring rank's part must also split into 2 pieces.
    with pytest.raises(ValueError, match=r"multiple of 2 \* \(world_size / ulysses_degree\) = 4"):
        positions(6, "zigzag", 0, 4, ulysses_degree=2)
    with pytest.raises(ValueError, match="must be a multiple of ulysses_degree"):
        positions(6, "ring", 0, 4, ulysses_degree=4)
    assert positions(4, "zigzag", 3, 4, ulysses_degree=2).tolist() == [2]  # one token per piece
