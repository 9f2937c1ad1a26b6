"""The ring's per-step plans (ring_attn_ext/ring_plan.py): exact coverage of the global mask,
the documented shapes of the balanced layouts, trimming, caching and errors."""
import pytest
import torch

from conftest import global_mask
from ring_attn_ext.ring_plan import Piece, build_plan
from ring_attn_ext.sharding import LAYOUTS, positions

WINDOWS = [(-1, -1), (0, 0), (1, 2), (3, -1), (-1, 2), (2, 0), (0, -1), (-1, 0), (5, 5), (20, 1)]


def piece_mask(piece):
    offset = torch.arange(piece.k_len)[None, :] - torch.arange(piece.q_len)[:, None]
    mask = torch.ones(piece.q_len, piece.k_len, dtype=torch.bool)
    if piece.key_offset_min is not None:
        mask &= offset >= piece.key_offset_min
    if piece.key_offset_max is not None:
        mask &= offset <= piece.key_offset_max
    return mask


def coverage(layout, world_size, seqlen_local, causal, window_size):
    """How many times each global (query, key) pair is computed by the plans of all ranks,
    after checking each piece's own invariants."""
    seqlen = seqlen_local * world_size
    counts = torch.zeros(seqlen, seqlen, dtype=torch.long)
    for rank in range(world_size):
        plan = build_plan(layout, rank, world_size, seqlen_local, causal, window_size)
        assert isinstance(plan, tuple) and len(plan) == world_size
        query_positions = positions(seqlen, layout, rank, world_size)
        for step, pieces in enumerate(plan):
            key_positions = positions(seqlen, layout, (rank - step) % world_size, world_size)
            for piece in pieces:
                assert isinstance(piece, Piece)
                assert 0 <= piece.q_start and piece.q_len >= 1 and piece.q_start + piece.q_len <= seqlen_local
                assert 0 <= piece.k_start and piece.k_len >= 1 and piece.k_start + piece.k_len <= seqlen_local
                mask = piece_mask(piece)
                # Trimmed: every row and every column of a piece holds a visible pair.
                assert mask.any(dim=1).all() and mask.any(dim=0).all(), piece
                # A bound is None exactly when it cuts nothing inside the piece.
                assert piece.key_offset_min is None or piece.key_offset_min > -(piece.q_len - 1), piece
                assert piece.key_offset_max is None or piece.key_offset_max < piece.k_len - 1, piece
                rows = query_positions[piece.q_start:piece.q_start + piece.q_len]
                cols = key_positions[piece.k_start:piece.k_start + piece.k_len]
                counts[rows[:, None], cols[None, :]] += mask.long()
    return counts


def seqlens_local(layout):
    return [2, 4, 6] if layout == "zigzag" else [1, 2, 3, 5]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", range(1, 9))
def test_plans_cover_the_global_mask_exactly_once(layout, world_size):
    for seqlen_local in seqlens_local(layout):
        for causal in (False, True):
            for window in WINDOWS:
                counts = coverage(layout, world_size, seqlen_local, causal, window)
                expected = global_mask(seqlen_local * world_size, causal, window).long()
                assert torch.equal(counts, expected), (layout, world_size, seqlen_local, causal, window)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", range(1, 9))
def test_non_causal_is_one_full_piece_per_step(layout, world_size):
    seqlen_local = 6
    for rank in range(world_size):
        plan = build_plan(layout, rank, world_size, seqlen_local, False, (-1, -1))
        assert plan == ((Piece(0, seqlen_local, 0, seqlen_local, None, None),),) * world_size


@pytest.mark.parametrize("world_size", range(2, 9))
@pytest.mark.parametrize("seqlen_local", [3, 8])
def test_ring_causal_shape(world_size, seqlen_local):
    length = seqlen_local
    for rank in range(world_size):
        plan = build_plan("ring", rank, world_size, length, True)
        assert plan[0] == (Piece(0, length, 0, length, None, 0),)
        for step in range(1, world_size):
            source = (rank - step) % world_size
            assert plan[step] == ((Piece(0, length, 0, length, None, None),) if source < rank else ())


@pytest.mark.parametrize("world_size", range(2, 9))
@pytest.mark.parametrize("chunk", [2, 5])
def test_zigzag_causal_shape(world_size, chunk):
    """Step 0 causal over the local pair; src < rank: all queries vs the block's first chunk;
    src > rank: the second query chunk vs the whole block. Every rank does the same work."""
    c = chunk
    for rank in range(world_size):
        plan = build_plan("zigzag", rank, world_size, 2 * c, True)
        if rank < world_size - 1:
            assert plan[0] == (Piece(0, c, 0, c, None, 0), Piece(c, c, 0, c, None, None), Piece(c, c, c, c, None, 0))
        else:  # the last rank's two chunks are neighbours in the sequence: one causal piece
            assert plan[0] == (Piece(0, 2 * c, 0, 2 * c, None, 0),)
        for step in range(1, world_size):
            source = (rank - step) % world_size
            expected = Piece(0, 2 * c, 0, c, None, None) if source < rank else Piece(c, c, 0, 2 * c, None, None)
            assert plan[step] == (expected,)


@pytest.mark.parametrize("world_size", range(2, 9))
@pytest.mark.parametrize("seqlen_local", [3, 7])
def test_stripe_causal_shape(world_size, seqlen_local):
    """src <= rank: causal including the diagonal; src > rank: keys strictly before the query,
    i.e. band max -1 over the block, trimmed to rows 1.. and keys ..L-2 (band max 0 there)."""
    length = seqlen_local
    for rank in range(world_size):
        plan = build_plan("stripe", rank, world_size, length, True)
        for step in range(world_size):
            source = (rank - step) % world_size
            expected = Piece(0, length, 0, length, None, 0) if source <= rank else Piece(1, length - 1, 0, length - 1,
                                                                                         None, 0)
            assert plan[step] == (expected,)


def test_window_trims_pieces():
    # ring, 4 ranks of 8 tokens, causal, window left 3: rank 1 sees only the last 3 keys of rank 0,
    # from its first 3 queries.
    plan = build_plan("ring", 1, 4, 8, True, (3, -1))
    assert plan[0] == (Piece(0, 8, 0, 8, -3, 0),)
    assert plan[1] == (Piece(0, 3, 5, 3, 0, None),)
    assert plan[2] == () and plan[3] == ()


def test_plans_are_cached():
    first = build_plan("zigzag", 1, 4, 8, True, (-1, -1))
    assert build_plan("zigzag", 1, 4, 8, True, [-1, -1]) is first


def test_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        build_plan("diagonal", 0, 2, 4, True)
    with pytest.raises(ValueError, match="seqlen_local must be even"):
        build_plan("zigzag", 0, 2, 5, True)
    with pytest.raises(ValueError, match="rank must be"):
        build_plan("ring", 2, 2, 4, True)
    with pytest.raises(ValueError, match="window_size"):
        build_plan("ring", 0, 2, 4, True, (-3, 0))
    with pytest.raises(ValueError, match="causal must be a bool"):
        build_plan("ring", 0, 2, 4, 1)
