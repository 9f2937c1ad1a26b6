"""Per-step mask plans of the ring: which kernel calls each step makes, with which band.

This is the contract between the Python layer and every ring executor (ring_reference.py on CPU,
the C++/NCCL ring on CUDA):

    build_plan(layout, rank, world_size, seqlen_local, causal, window_size)
        -> tuple of world_size tuples of Piece

Entry i lists the kernel calls of step i, when the rank holds the K/V block that started on rank
src = (rank - i) % world_size. A Piece covers query rows [q_start, q_start + q_len) of the local
query shard and key rows [k_start, k_start + k_len) of the block held; within the piece, key j is
visible to query i iff key_offset_min <= j - i <= key_offset_max (None = unbounded), the band of
csrc/flash/flash_params.h. An empty step means no compute: the block only passes on.

Guarantees (tested in tests/test_ring_plan.py):
  - the pieces of all steps together cover each visible (query, key) pair of the global mask
    exactly once, and no invisible pair;
  - every query row and every key row of a piece has at least one visible pair in it: pieces are
    trimmed to the bounding rectangle of their visible pairs, so a kernel never computes a row
    that sees no key (the -inf rows of FlashAttention only arise from the global mask itself);
  - a piece that sees all its pairs is (None, None), and neighbouring full pieces are joined.

The causal/window mask applies to GLOBAL positions; the global query and key sequences have the
same length, so there is no bottom-right shift. Each layout's local tokens are runs arithmetic in
global position (sharding.local_runs); for a query run and a key run of common stride s, query i
and key j have global offset (kg - qg) + s*(j - i), so a global band [gmin, gmax] becomes the
run-local band [ceil((gmin - d)/s), floor((gmax - d)/s)] with d = kg - qg.

Resulting causal plans (C = seqlen_local / 2 for zigzag, L = seqlen_local):
  ring:   step 0 (0, L, 0, L, None, 0); src < rank one full piece; src > rank empty.
  zigzag: step 0 three pieces, the two local chunks causal and the second chunk over the first
          full (on the last rank the two chunks are adjacent globally: one causal piece);
          src < rank (0, 2C, 0, C, None, None): all queries, the block's first chunk;
          src > rank (C, C, 0, 2C, None, None): the second query chunk, the whole block.
  stripe: src <= rank (0, L, 0, L, None, 0); src > rank (1, L-1, 0, L-1, None, 0), which is the
          band "key offset <= -1" over the whole block with the query row that sees nothing and
          the key column that nobody sees trimmed off.
Non-causal without a window: one full piece per step in every layout.
"""
import functools
import typing

from .masks import band_for, check_window_size
from .sharding import check_layout, local_runs

Piece = typing.NamedTuple("Piece", [
    ("q_start", int), ("q_len", int), ("k_start", int), ("k_len", int),
    ("key_offset_min", typing.Optional[int]), ("key_offset_max", typing.Optional[int])])


def build_plan(layout, rank, world_size, seqlen_local, causal, window_size=(-1, -1)):
    """The ring's per-step pieces for `rank` (see the module docstring). Cached: the same
    arguments return the same tuple object."""
    check_layout(layout)
    left, right = check_window_size(window_size)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    return _build_plan(layout, rank, world_size, seqlen_local, causal, left, right)


@functools.lru_cache(maxsize=4096)
def _build_plan(layout, rank, world_size, seqlen_local, causal, left, right):
    query_runs = local_runs(layout, rank, world_size, seqlen_local)  # validates rank and sizes
    global_min, global_max = band_for(seqlen_local * world_size, seqlen_local * world_size, causal, (left, right))
    steps = []
    for step in range(world_size):
        key_runs = local_runs(layout, (rank - step) % world_size, world_size, seqlen_local)
        pieces = []
        for query_run in query_runs:
            for key_run in key_runs:
                piece = _run_pair_piece(query_run, key_run, global_min, global_max)
                if piece is not None:
                    pieces.append(piece)
        steps.append(tuple(_join_full_pieces(pieces)))
    return tuple(steps)


def _run_pair_piece(query_run, key_run, global_min, global_max):
    """The piece for one (query run, key run) pair, or None when no pair of it is visible."""
    stride = query_run.stride
    assert key_run.stride == stride, "query and key runs of one layout share their stride"
    distance = key_run.global_start - query_run.global_start
    band_min = None if global_min is None else -((distance - global_min) // stride)  # ceil division
    band_max = None if global_max is None else (global_max - distance) // stride    # floor division
    return _trimmed_piece(query_run.local_start, query_run.length, key_run.local_start, key_run.length,
                          band_min, band_max)


def _trimmed_piece(q_start, q_len, k_start, k_len, band_min, band_max):
    """The band [band_min, band_max] over a q_len x k_len rectangle, trimmed to the rows and
    columns that hold a visible pair and re-expressed relative to the trimmed rectangle; None if
    nothing is visible. Bounds that cut nothing become None."""
    if q_len == 0 or k_len == 0:
        return None
    low = -(q_len - 1) if band_min is None else max(band_min, -(q_len - 1))
    high = k_len - 1 if band_max is None else min(band_max, k_len - 1)
    if low > high:
        return None
    # Row i sees keys [i + low, i + high] clipped to [0, k_len); column j is seen by rows [j - high, j - low].
    first_row, last_row = max(0, -high), min(q_len - 1, k_len - 1 - low)
    first_col, last_col = max(0, low), min(k_len - 1, q_len - 1 + high)
    rows, cols = last_row - first_row + 1, last_col - first_col + 1
    shift = first_col - first_row  # j - i in the old rectangle = j' - i' in the new one + shift
    low, high = low - shift, high - shift
    return Piece(q_start + first_row, rows, k_start + first_col, cols,
                 None if low <= -(rows - 1) else low, None if high >= cols - 1 else high)


def _is_full(piece):
    return piece.key_offset_min is None and piece.key_offset_max is None


def _join_full_pieces(pieces):
    """Joins full pieces that share their key range and touch in query rows, or share their query
    range and touch in key rows, until none can be joined; returns them sorted."""
    pieces = list(pieces)
    joined = True
    while joined:
        joined = False
        for a in pieces:
            for b in pieces:
                if a is b or not (_is_full(a) and _is_full(b)):
                    continue
                if (a.k_start, a.k_len) == (b.k_start, b.k_len) and a.q_start + a.q_len == b.q_start:
                    merged = Piece(a.q_start, a.q_len + b.q_len, a.k_start, a.k_len, None, None)
                elif (a.q_start, a.q_len) == (b.q_start, b.q_len) and a.k_start + a.k_len == b.k_start:
                    merged = Piece(a.q_start, a.q_len, a.k_start, a.k_len + b.k_len, None, None)
                else:
                    continue
                pieces = [p for p in pieces if p is not a and p is not b] + [merged]
                joined = True
                break
            if joined:
                break
    return sorted(pieces, key=lambda piece: (piece.q_start, piece.k_start))
