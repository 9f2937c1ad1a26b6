"""Decoding over a key/value cache split across ranks ("tree attention", Shyam et al. 2024):

    tree_attn_decode(q, k, v, *, group=None, softmax_scale=None, causal=False, q_start=None,
                     k_start=None, return_lse=False) -> out, or (out, lse) with return_lse=True

q (b, s_q, h, d): the newest tokens' queries, the same on every rank. k and v (b, s_k, h_kv, d):
this rank's part of the cache, of any length (0 included) and in any split: the ranks' parts
together are the whole cache. out (b, s_q, h, d) in q's dtype and lse (b, h, s_q) fp32 (float64
for float64 CPU tensors) are attention over the whole cache, on every rank.

Each rank attends to its own part (CUDA: our kernel into an fp32 (out, lse); other devices: the
PyTorch reference), then the ranks combine the parts by log-sum-exp with two all-reduces: the
maximum lse, then the sums of the weighted outputs and of the weights, both in fp32 (float64 for
float64 CPU tensors). Reductions
take log(P) steps, where passing the cache around a ring would take P - 1 transfers of it; decoding
moves only q-sized data, so no K/V leaves its rank.

causal=False: every query sees every cached key (one new token whose key is in the cache already).
causal=True: the queries sit at global positions q_start, q_start + 1, ... and this rank's keys at
k_start, k_start + 1, ...; a query sees the keys at or before its own position (several new tokens,
e.g. speculative decoding). Forward only: tree_attn_decode refuses tensors that require grad
outside torch.no_grad().
"""
import numbers

import torch
import torch.distributed as dist

from . import checks
from .group_checks import Signature, check_cpu_backend, validate_together
from .masks import clamp_key_offset
from .ring import resolve_group
from .ring_reference import accumulation_dtype, piece_forward


def tree_attn_decode(q, k, v, *, group=None, softmax_scale=None, causal=False, q_start=None, k_start=None,
                     return_lse=False):
    """Attention of q over the cache whose part on this rank is (k, v); see the module docstring."""
    ring_group = resolve_group(group)

    def validate():
        shape = checks.check_qkv(q, k, v)
        scale = checks.check_softmax_scale(softmax_scale, shape.head_dim)
        checks.check_flag(causal, "causal")
        checks.check_flag(return_lse, "return_lse")
        key_offset_max = _key_offset_max(causal, q_start, k_start, shape)
        if checks.needs_autograd((q, k, v)):
            raise NotImplementedError("tree_attn_decode is forward only (inference): call it under torch.no_grad() "
                                      "or on tensors that do not require grad")
        checks.check_device_support(shape, q.device, "tree attention decoding on CUDA tensors", q.dtype,
                                    backward=False)
        check_cpu_backend(q.device, ring_group, "tree attention decoding")
        # The cache parts may differ in length: only batch, heads and head_dim must agree.
        kv_shape = (shape.batch, 0, shape.heads_kv, shape.head_dim)
        signature = Signature("decode", tuple(q.shape), kv_shape, q.dtype, q.device.type, None, causal, (-1, -1),
                              scale, q_start if causal else -1)
        return signature, (scale, key_offset_max)

    scale, key_offset_max = validate_together(ring_group.group, ring_group.world_size, validate)
    out, lse = _local_attention(q, k, v, scale, key_offset_max)
    if ring_group.world_size > 1:
        out, lse = _combine(out, lse, ring_group.group)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _key_offset_max(causal, q_start, k_start, shape):
    """The kernel band's upper edge j - i <= q_start - k_start for causal decoding, else None;
    clamped (masks.clamp_key_offset), so that a far-off k_start (which the ranks need not agree on)
    cannot overflow on one rank alone."""
    if not causal:
        if q_start is not None or k_start is not None:
            raise ValueError("q_start and k_start place queries and keys for causal=True; pass them only with "
                             "causal=True")
        return None
    for value, name in ((q_start, "q_start"), (k_start, "k_start")):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"causal decoding needs {name}, the global position of the first "
                             f"{'query' if name == 'q_start' else 'key of this rank'}, as a non-negative int; "
                             f"got {value!r}")
    return clamp_key_offset(int(q_start) - int(k_start), shape.seqlen_q, shape.seqlen_k)


def _local_attention(q, k, v, scale, key_offset_max):
    """(out, lse) of q over this rank's keys, unrounded: fp32 (float64 for float64 inputs). Rows
    that see no key here have lse -inf (and out 0)."""
    if q.is_cuda:
        from ._extension import _C  # checked by check_device_support
        batch, seqlen_q, heads, head_dim = q.shape
        out = torch.zeros(batch, seqlen_q, heads, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.full((batch, heads, seqlen_q), float("-inf"), device=q.device, dtype=torch.float32)
        q, k, v = (checks.kernel_compatible(t) for t in (q, k, v))
        _C.fwd_merge(q, k, v, out, lse, scale, None, key_offset_max)
        return out, lse
    return piece_forward(q, k, v, scale, None, key_offset_max, accumulation_dtype(q.dtype))


def _combine(out, lse, group):
    """The whole cache's (out, lse) from every rank's: weights exp(lse_r - max_r lse_r), summed."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # rows no rank has keys for
    weight = torch.exp(lse - top)  # (b, h, s_q); 0 where this rank has no key for the row
    weighted = out * weight.transpose(1, 2).unsqueeze(-1)
    sums = torch.cat((weighted.flatten(), weight.flatten()))  # one reduction for both
    dist.all_reduce(sums, group=group)
    weighted = sums[:out.numel()].view_as(out)
    total = sums[out.numel():].view_as(weight)
    denominator = total.transpose(1, 2).unsqueeze(-1)
    out = torch.where(denominator > 0, weighted / denominator.clamp_min(torch.finfo(total.dtype).tiny),
                      torch.zeros_like(weighted))
    return out, top + torch.log(total)  # log(0) = -inf: rows without any key
