"""Ulysses x ring attention on local shards (what yunchang calls unified sequence parallelism, USP):

    usp_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                  alibi_slopes=None, deterministic=False, return_attn_probs=False, *, groups,
                  layout="zigzag") -> out, or (out, lse, None) with return_attn_probs=True

groups: usp_groups(ulysses_degree, group) (usp_process_groups.py). q (b, s_local, h, d), k and v
(b, s_local, h_kv, d): this rank's shard, as shard(x, layout, rank, world_size,
ulysses_degree=U) cuts it; out and lse (b, h, s_local) are this rank's shards of the global results.

How it runs, on each rank:
  1. its Ulysses group's all-to-all (ulysses.py) trades the split of the sequence for a split of
     the heads: the rank then holds its ring rank's whole part of the sequence (U * s_local
     tokens, in the layout's local order) for h / U query heads and their k/v heads;
  2. the ring attention of ring.py runs on that over the rank's ring (P / U ranks), forward and
     backward, CUDA tensors in the C++/NCCL ring, CPU tensors in the reference over gloo;
  3. a second all-to-all brings out (and lse) back to the rank's own tokens and all heads.
Gradients take the same way back. Why mix the two: the all-to-all moves every q, k, v and out
element once (its volume shrinks per rank as U grows) but needs heads to split, and is fastest
inside a host; the ring keeps attention and transfers overlapped across hosts but moves K/V
P / U - 1 times. U = P is pure Ulysses, U = 1 a plain ring.

Heads: h must be a multiple of U. k/v heads: a multiple of U (each rank takes h_kv / U), or a
divisor of U: each k/v head is then replicated U / h_kv times before the exchange (as yunchang does)
and its gradients summed, so each rank's h / U query heads keep their own k/v head. Options
follow ring_flash_attn.py (dropout and ALiBi raise NotImplementedError; causal and window_size
apply to global positions). Every rank of groups.group must call together; a rank that disagrees
or rejects its arguments makes every rank raise (group_checks.py).
"""
from . import checks, ring
from .group_checks import Signature, backend_supports_cpu, validate_together
from .packing import SEPARATE
from .ring_flash_attn import RingAttentionFunction
from .ulysses import heads_to_sequence, lse_heads_to_sequence, sequence_to_heads
from .usp_process_groups import UspGroups


def usp_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                  deterministic=False, return_attn_probs=False, *, groups, layout="zigzag"):
    """Ulysses x ring attention of this rank's shards q (b, s, h, d), k and v (b, s, h_kv, d) over
    `groups` (usp_groups). Returns out, or (out, lse, None) with return_attn_probs=True."""
    if not isinstance(groups, UspGroups):
        raise TypeError(f"groups must be the UspGroups that usp_groups(ulysses_degree, group) returns, got "
                        f"{type(groups).__name__}")
    degree = groups.ulysses_degree

    def validate():
        checks.check_dropout_p(dropout_p)
        checks.check_alibi_slopes(alibi_slopes)
        checks.check_flag(return_attn_probs, "return_attn_probs")
        shape = checks.check_qkv(q, k, v)
        checks.check_deterministic(deterministic, q.device)
        if shape.seqlen_q != shape.seqlen_k:
            raise ValueError(f"usp attention needs q, k and v shards of the same sequence: q holds {shape.seqlen_q} "
                             f"tokens and k/v hold {shape.seqlen_k}")
        kv_repeat = heads_kv_repeat(shape.heads, shape.heads_kv, degree)
        if degree > 1 and q.device.type != "cuda" and not backend_supports_cpu(groups.ulysses_group):
            raise ValueError(f"usp attention on {q.device.type} tensors exchanges them over torch.distributed and "
                             "needs process groups with a CPU backend such as gloo")
        # What the ring will see after the exchange: a ring rank's whole part, h / U heads.
        ring_shape = shape._replace(seqlen_q=shape.seqlen_q * degree, seqlen_k=shape.seqlen_k * degree,
                                    heads=shape.heads // degree, heads_kv=shape.heads_kv * kv_repeat // degree)
        needs_backward = checks.needs_autograd((q, k, v))
        ring_group = ring.RingGroup(groups.ring_group, groups.ring_rank, groups.ring_degree)
        window, call = ring.plan_call(ring_shape, q.dtype, q.device, needs_backward, ring_group, causal,
                                      softmax_scale, layout, window_size)
        signature = Signature("forward", tuple(q.shape), tuple(k.shape), q.dtype, q.device.type, layout, causal,
                              tuple(window), call.softmax_scale, requires_grad=needs_backward,
                              ulysses_degree=degree)
        return signature, (call, kv_repeat)

    # One agreement over all P ranks covers the exchanges and the rings.
    call, kv_repeat = validate_together(groups.group, groups.world_size, validate)
    if kv_repeat > 1:
        k, v = (t.repeat_interleave(kv_repeat, dim=2) for t in (k, v))
    q, k, v = sequence_to_heads((q, k, v), groups.ulysses_group, degree)
    out, lse = RingAttentionFunction.apply(call, SEPARATE, q, k, v)
    (out,) = heads_to_sequence((out,), groups.ulysses_group, degree)
    # lse travels back on every call, not only for return_attn_probs=True: a flag that differed
    # between ranks would otherwise leave one waiting in an exchange the others skip (it is
    # 2 / head_dim of out's bytes in half precision).
    lse = lse_heads_to_sequence(lse, groups.ulysses_group, degree)
    return (out, lse, None) if return_attn_probs else out


def heads_kv_repeat(heads, heads_kv, degree):
    """How many times each k/v head is replicated before the exchange (see the module docstring);
    raises ValueError naming the rule when the head counts do not suit ulysses_degree `degree`."""
    if heads % degree != 0:
        raise ValueError(f"q has {heads} heads, which must be a multiple of ulysses_degree={degree}: each rank of a "
                         "Ulysses group attends with heads / ulysses_degree of them")
    if heads_kv % degree == 0:
        return 1
    if degree % heads_kv == 0:
        return degree // heads_kv
    raise ValueError(f"k and v have {heads_kv} heads; with ulysses_degree={degree} that must be a multiple of "
                     "ulysses_degree (each rank takes heads_kv / ulysses_degree) or divide it (each head is "
                     "replicated ulysses_degree / heads_kv times)")
