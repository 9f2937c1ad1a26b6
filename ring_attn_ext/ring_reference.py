"""The ring algorithm in plain PyTorch: the backend for CPU tensors (gloo process groups) and the
executable statement of what the CUDA ring computes.

Both functions take the same arguments as the CUDA ring (ring_attn_ext._ring_cuda): the local
shards, the rank's plan (ring_plan.build_plan), the process group (None only for a world of one)
and the softmax scale. K/V blocks travel from rank r to rank r+1 of the group; step i works on the
block that started on rank (r - i) % N, one attention call per plan piece.

Precision: every partial result and accumulator is float32, or float64 for float64 inputs, so
the reference is exact to the precision of its inputs (the lse it returns has that dtype too).
The per-block outputs are never rounded to the input dtype before the merge; only the final
out/dq/dk/dv are cast back.
"""
import torch
import torch.distributed as dist

from .reference import merge_partial, visible_mask


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()  # explicit forward/backward: no autograd graph through the reference
def ring_forward_reference(q, k, v, plan, group, softmax_scale):
    """(out, lse): out (b, s, h, d) in q's dtype, lse (b, h, s) float32 (float64 for float64)."""
    world_size = len(plan)
    neighbours = _Neighbours(group, world_size)
    accum = accumulation_dtype(q.dtype)
    batch, seqlen, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=accum, device=q.device)
    lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=accum, device=q.device)
    block_k, block_v = k, v
    for step, pieces in enumerate(plan):
        # The next block travels while this one is used; the last step has nothing left to pass.
        incoming = neighbours.start_exchange([block_k, block_v]) if step + 1 < world_size else None
        for piece in pieces:
            rows, keys = _rows(piece), _keys(piece)
            piece_out, piece_lse = piece_forward(q[:, rows], block_k[:, keys], block_v[:, keys],
                                                 softmax_scale, piece.key_offset_min, piece.key_offset_max, accum)
            out[:, rows], lse[:, :, rows] = merge_partial(out[:, rows], lse[:, :, rows], piece_out, piece_lse)
        if incoming is not None:
            block_k, block_v = incoming.wait()
    return out.to(q.dtype), lse


@torch.no_grad()
def ring_backward_reference(dout, q, k, v, out, lse, plan, group, softmax_scale):
    """(dq, dk, dv) in the dtypes of q, k, v, given the GLOBAL out and lse of the forward.

    dq accumulates locally. The dk/dv of a block accumulate in buffers that travel with it, as the
    CUDA ring's do: started on the rank after its owner (step 1 there), passed on after each step,
    they reach the owner after N - 1 hops, where its own share (step 0) is added."""
    world_size = len(plan)
    neighbours = _Neighbours(group, world_size)
    accum = accumulation_dtype(q.dtype)
    delta = row_delta(dout, out, accum)  # the same for every piece: computed once
    lse = lse.to(accum)
    dq = torch.zeros(q.shape, dtype=accum, device=q.device)
    own_dk = torch.zeros(k.shape, dtype=accum, device=k.device)
    own_dv = torch.zeros(v.shape, dtype=accum, device=v.device)
    block_k, block_v = k, v
    block_dk, block_dv = own_dk, own_dv
    for step, pieces in enumerate(plan):
        incoming_kv = neighbours.start_exchange([block_k, block_v]) if step + 1 < world_size else None
        if step == 1:
            block_dk, block_dv = torch.zeros_like(own_dk), torch.zeros_like(own_dv)
        for piece in pieces:
            rows, keys = _rows(piece), _keys(piece)
            piece_dq, piece_dk, piece_dv = piece_backward(
                dout[:, rows], q[:, rows], block_k[:, keys], block_v[:, keys], lse[:, :, rows],
                delta[:, :, rows], softmax_scale, piece.key_offset_min, piece.key_offset_max, accum)
            dq[:, rows] += piece_dq
            block_dk[:, keys] += piece_dk
            block_dv[:, keys] += piece_dv
        if step >= 1:
            # The next block's dk/dv come from behind; after the last step, this rank's own.
            block_dk, block_dv = neighbours.start_exchange([block_dk, block_dv], first_tag=2).wait()
        if incoming_kv is not None:
            block_k, block_v = incoming_kv.wait()
    if world_size > 1:
        own_dk, own_dv = own_dk + block_dk, own_dv + block_dv
    return dq.to(q.dtype), own_dk.to(k.dtype), own_dv.to(v.dtype)


def _rows(piece):
    return slice(piece.q_start, piece.q_start + piece.q_len)


def _keys(piece):
    return slice(piece.k_start, piece.k_start + piece.k_len)


def _scores(q, k, softmax_scale, key_offset_min, key_offset_max, accum):
    """Scaled, band-masked scores (b, h, s_q, s_k) in `accum`, and k expanded to q's heads."""
    k = _expand_heads(k, q.shape[2]).to(accum)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(accum), k) * softmax_scale
    visible = visible_mask(q.shape[1], k.shape[1], key_offset_min, key_offset_max, q.device)
    return scores.masked_fill(~visible, float("-inf")), k


def _expand_heads(t, heads):
    """GQA: kv head j serves query heads [j*g, (j+1)*g), g = heads // kv heads."""
    groups = heads // t.shape[2]
    return t.repeat_interleave(groups, dim=2) if groups > 1 else t


def _reduce_heads(t, kv_heads):
    """Sums the gradients of the query heads that share a kv head."""
    batch, seqlen, heads, dim = t.shape
    return t.view(batch, seqlen, kv_heads, heads // kv_heads, dim).sum(3) if heads != kv_heads else t


def _finite_or_zero(lse):
    # A row that sees no key has lse = -inf; subtracting 0 instead keeps its exp(-inf) = 0, never NaN.
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def piece_forward(q, k, v, softmax_scale, key_offset_min, key_offset_max, accum):
    """(out, lse) of q over k, v within the band, unrounded in `accum` (tree_decode.py uses it too)."""
    scores, _ = _scores(q, k, softmax_scale, key_offset_min, key_offset_max, accum)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite_or_zero(lse)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, _expand_heads(v, q.shape[2]).to(accum))
    return out, lse


def row_delta(dout, out, accum):
    """delta = rowsum(dout * out), (b, h, s) in `accum`, of (b, s, h, d) tensors: the term of the
    backward that needs the whole row's output."""
    return (dout.to(accum) * out.to(accum)).sum(-1).transpose(1, 2)


def piece_backward(dout, q, k, v, lse, delta, softmax_scale, key_offset_min, key_offset_max, accum):
    """Exact gradients of one piece given the global lse and delta (FlashAttention-2's backward),
    unrounded in `accum` (varlen.py uses it too):
    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - delta), dQ = dS K scale,
    dK = dS^T Q scale."""
    scores, k_expanded = _scores(q, k, softmax_scale, key_offset_min, key_offset_max, accum)
    probs = torch.exp(scores - _finite_or_zero(lse)[..., None])
    dout = dout.to(accum)
    v_expanded = _expand_heads(v, q.shape[2]).to(accum)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, v_expanded)
    dscores = probs * (dprobs - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_expanded) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.to(accum)) * softmax_scale
    return dq, _reduce_heads(dk, k.shape[2]), _reduce_heads(dv, v.shape[2])


class _Neighbours:
    """Point-to-point exchange with the ring neighbours in the group: send to group rank r+1,
    receive from group rank r-1 (torch.distributed addresses peers by global rank)."""

    def __init__(self, group, world_size):
        self.group = group
        if world_size > 1:
            rank = dist.get_rank(group)
            self.next = dist.get_global_rank(group, (rank + 1) % world_size)
            self.prev = dist.get_global_rank(group, (rank - 1) % world_size)

    def start_exchange(self, tensors, first_tag=0):
        """Sends `tensors` on and receives the same shapes from behind; returns an _Exchange
        whose wait() gives the received tensors. Each message has its own tag (first_tag,
        first_tag + 1, ...), so exchanges in flight at the same time cannot be confused."""
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, first_tag + i) for i, t in enumerate(sent)]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, first_tag + i) for i, r in enumerate(received)]
        return _Exchange(dist.batch_isend_irecv(ops), sent, received)


class _Exchange:
    def __init__(self, works, sent, received):
        self.works, self.sent, self.received = works, sent, received  # sent: alive until the sends complete

    def wait(self):
        for work in self.works:
            work.wait()
        return self.received
