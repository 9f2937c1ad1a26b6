"""How a global sequence is split across the ranks of a ring, and back.

Three layouts, for rank r of N ranks and a global sequence of S tokens:
  "ring"   (contiguous) rank r holds tokens [r*S/N, (r+1)*S/N)            needs S % N == 0
  "zigzag" rank r holds chunks r and 2N-1-r of 2N equal chunks, in order    needs S % 2N == 0
  "stripe" rank r holds the tokens t with t % N == r, in order              needs S % N == 0
A rank's local tokens always form a few runs that are arithmetic in global position (ring: one
run, zigzag: two, stripe: one run of stride N); `local_runs` describes them and is the single
source for `positions`, `shard`, `unshard` and the ring's mask plans (ring_plan.py).

Ulysses x ring (usp_attention.py), ulysses_degree U > 1: the world_size ranks form world_size / U
rings of the layout, and rank r takes the part of ring rank r // U (of world_size / U) and, of
that, the (r % U)-th of U equal contiguous pieces. The all-to-all of a Ulysses group (ranks
U*j .. U*j + U - 1) joins the pieces back into ring rank j's part, in order, for a share of the heads.
"""
import typing

import torch

LAYOUTS = ("ring", "zigzag", "stripe")

# local_start: first local row of the run; length: its number of tokens; global_start: global
# position of its first token; stride: global distance between consecutive tokens of the run.
Run = typing.NamedTuple("Run", [("local_start", int), ("length", int), ("global_start", int), ("stride", int)])


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_world_size(world_size):
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def _check_rank(rank, world_size):
    _check_world_size(world_size)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def ring_size(world_size, ulysses_degree):
    """The number of ranks of each ring when world_size ranks run Ulysses x ring with ulysses_degree
    ranks per Ulysses group (1: a plain ring of world_size ranks)."""
    _check_world_size(world_size)
    if not isinstance(ulysses_degree, int) or isinstance(ulysses_degree, bool) or ulysses_degree < 1:
        raise ValueError(f"ulysses_degree must be a positive int, got {ulysses_degree!r}")
    if world_size % ulysses_degree != 0:
        raise ValueError(f"ulysses_degree ({ulysses_degree}) must divide world_size ({world_size}): the ranks form "
                         f"world_size / ulysses_degree rings of Ulysses groups of ulysses_degree ranks")
    return world_size // ulysses_degree


def tokens_per_rank(seqlen, layout, world_size, ulysses_degree=1):
    """The local sequence length of every rank, after checking that `seqlen` splits evenly."""
    check_layout(layout)
    rings = ring_size(world_size, ulysses_degree)
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 0:
        raise ValueError(f"seqlen must be a non-negative int, got {seqlen!r}")
    parts = 2 * rings if layout == "zigzag" else rings
    if seqlen % parts != 0:
        rule = "2 * world_size" if layout == "zigzag" else "world_size"
        if ulysses_degree > 1:
            rule = rule.replace("world_size", "(world_size / ulysses_degree)")
        raise ValueError(f"layout {layout!r} needs the global sequence length to be a multiple of {rule} = "
                         f"{parts}; got seqlen={seqlen} with world_size={world_size}"
                         + (f" and ulysses_degree={ulysses_degree}" if ulysses_degree > 1 else ""))
    per_ring_rank = seqlen // rings
    if per_ring_rank % ulysses_degree != 0:
        raise ValueError(f"with ulysses_degree={ulysses_degree} each ring rank's {per_ring_rank} tokens "
                         f"(seqlen={seqlen} over {rings} ring rank(s)) split into {ulysses_degree} equal pieces, "
                         f"so seqlen / (world_size / ulysses_degree) must be a multiple of ulysses_degree")
    return per_ring_rank // ulysses_degree


def local_runs(layout, rank, world_size, seqlen_local):
    """The runs of `rank`'s local tokens (see Run), in local order, maximal: runs that continue
    each other in global position are joined (zigzag on one rank is a single run)."""
    check_layout(layout)
    _check_rank(rank, world_size)
    if not isinstance(seqlen_local, int) or isinstance(seqlen_local, bool) or seqlen_local < 0:
        raise ValueError(f"seqlen_local must be a non-negative int, got {seqlen_local!r}")
    if layout == "ring":
        return (Run(0, seqlen_local, rank * seqlen_local, 1),)
    if layout == "stripe":
        return (Run(0, seqlen_local, rank, world_size),)
    if seqlen_local % 2 != 0:
        raise ValueError(f"layout 'zigzag' holds two equal chunks per rank, so seqlen_local must be even; "
                         f"got seqlen_local={seqlen_local}")
    chunk = seqlen_local // 2
    first = Run(0, chunk, rank * chunk, 1)
    second = Run(chunk, chunk, (2 * world_size - 1 - rank) * chunk, 1)
    if first.global_start + chunk == second.global_start:  # world_size 1: the two chunks touch
        return (Run(0, seqlen_local, first.global_start, 1),)
    return (first, second)


def positions(seqlen, layout, rank, world_size, device=None, ulysses_degree=1):
    """LongTensor (seqlen // world_size,): the global position of each of `rank`'s local tokens,
    e.g. the position ids for rotary embeddings of the local shard. ulysses_degree: see the module
    docstring."""
    seqlen_local = tokens_per_rank(seqlen, layout, world_size, ulysses_degree)
    _check_rank(rank, world_size)
    rings = world_size // ulysses_degree
    ring_rank, ulysses_rank = divmod(rank, ulysses_degree)
    runs = local_runs(layout, ring_rank, rings, seqlen_local * ulysses_degree)
    parts = [torch.arange(run.length, device=device, dtype=torch.long) * run.stride + run.global_start
             for run in runs]
    ring_part = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)
    return ring_part.narrow(0, ulysses_rank * seqlen_local, seqlen_local)


def _normalise_dim(x, dim):
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    return dim % x.dim()


def shard(x, layout, rank, world_size, dim=1, ulysses_degree=1):
    """`rank`'s local part of the global tensor `x` (sequence along `dim`), as a new tensor.
    Differentiable. ulysses_degree: see the module docstring."""
    dim = _normalise_dim(x, dim)
    index = positions(x.shape[dim], layout, rank, world_size, device=x.device, ulysses_degree=ulysses_degree)
    return x.index_select(dim, index)


def unshard(x, layout, world_size, dim=1, ulysses_degree=1):
    """The global tensor from the local parts of ranks 0..world_size-1 concatenated along `dim` in
    rank order (a tensor, or a sequence of the per-rank tensors). Inverse of `shard` with the same
    ulysses_degree; differentiable."""
    if isinstance(x, (list, tuple)):
        if len(x) != world_size:
            raise ValueError(f"unshard got {len(x)} local parts for world_size={world_size}")
        lengths = [part.shape[_normalise_dim(part, dim)] for part in x]
        if any(length != lengths[0] for length in lengths):
            raise ValueError(f"unshard got local parts of unequal lengths {lengths} along dim {dim}: every rank "
                             "holds seqlen / world_size tokens")
        x = torch.cat(list(x), dim=dim)
    dim = _normalise_dim(x, dim)
    seqlen = x.shape[dim]
    # order[i] = global position of row i of the concatenation; its inverse gathers global order.
    order = torch.cat([positions(seqlen, layout, r, world_size, device=x.device, ulysses_degree=ulysses_degree)
                       for r in range(world_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seqlen, device=x.device)
    return x.index_select(dim, inverse)
