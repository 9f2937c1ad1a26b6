"""The all-to-all of a Ulysses group: its U ranks trade a split of the sequence for a split of the
heads, and back.

    sequence_to_heads(tensors, group, degree)  # each (b, s, h, d) -> (b, degree * s, h / degree, d)
    heads_to_sequence(tensors, group, degree)  # each (b, degree * s, h / degree, d) -> (b, s, h, d)
    lse_heads_to_sequence(lse, group, degree)  # (b, h / degree, degree * s) -> (b, h, s)

Rank j of the group sends the i-th of `degree` equal slices of its heads to rank i and receives
rank i's tokens of its own slice of heads, placed i-th along the sequence: the group's pieces of
the sequence join in rank order. Several tensors of one dtype (q, k and v, whose head counts may
differ) travel in one all_to_all_single. The first two are differentiable: the gradient of one
exchange is the reverse exchange. Every rank of the group must call together, with tensors of
the same shapes.
"""
import torch
import torch.distributed as dist


def sequence_to_heads(tensors, group, degree):
    return tuple(tensors) if degree == 1 else _AllToAll.apply(group, degree, 2, 1, *tensors)


def heads_to_sequence(tensors, group, degree):
    return tuple(tensors) if degree == 1 else _AllToAll.apply(group, degree, 1, 2, *tensors)


def lse_heads_to_sequence(lse, group, degree):
    (result,) = all_to_all((lse,), group, degree, split_dim=2, cat_dim=1)
    return result


def all_to_all(tensors, group, degree, split_dim, cat_dim):
    """Splits each tensor into `degree` equal slices along split_dim, sends slice i to rank i of
    `group`, and returns, per tensor, the slices received joined along cat_dim in rank order."""
    if degree == 1:
        return tuple(tensors)
    slices = []  # per tensor: (shape of one slice, its number of elements)
    for t in tensors:
        if t.shape[split_dim] % degree != 0:
            raise ValueError(f"all_to_all: dimension {split_dim} of a tensor of shape {tuple(t.shape)} does not split "
                             f"into {degree} equal slices")
        shape = list(t.shape)
        shape[split_dim] //= degree
        slices.append((shape, t.numel() // degree))
    row = sum(numel for _, numel in slices)
    # One copy in: row i of `send` holds slice i of every tensor, back to back.
    send = torch.empty(degree, row, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t, (shape, numel) in zip(tensors, slices):
        for i, piece in enumerate(t.chunk(degree, dim=split_dim)):
            send[i, offset:offset + numel].view(shape).copy_(piece)
        offset += numel
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # One copy out: rank i's slice goes i-th along cat_dim.
    results, offset = [], 0
    for shape, numel in slices:
        joined = list(shape)
        joined[cat_dim] *= degree
        result = torch.empty(joined, dtype=send.dtype, device=send.device)
        for i, piece in enumerate(result.chunk(degree, dim=cat_dim)):
            piece.copy_(received[i, offset:offset + numel].view(shape))
        results.append(result)
        offset += numel
    return tuple(results)


class _AllToAll(torch.autograd.Function):
    """apply(group, degree, split_dim, cat_dim, *tensors) -> tuple: all_to_all, differentiable."""

    @staticmethod
    def forward(ctx, group, degree, split_dim, cat_dim, *tensors):
        ctx.exchange = (group, degree, split_dim, cat_dim)
        return all_to_all(tensors, group, degree, split_dim, cat_dim)

    @staticmethod
    def backward(ctx, *grads):
        # Every rank runs this exchange, whichever outputs its loss used (unused ones get zeros).
        group, degree, split_dim, cat_dim = ctx.exchange
        return (None, None, None, None, *all_to_all(grads, group, degree, cat_dim, split_dim))
