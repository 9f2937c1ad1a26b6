"""The pure-PyTorch reference of the attention math: the test oracle and the backend for CPU
tensors. Any dtype and device; differentiable through autograd."""
import math

import torch


def default_softmax_scale(head_dim):
    return 1.0 / math.sqrt(head_dim)


def visible_mask(seqlen_q, seqlen_k, key_offset_min, key_offset_max, device):
    """Bool (s_q, s_k): key j visible to query i iff key_offset_min <= j - i <= key_offset_max."""
    offsets = (torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None])
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if key_offset_min is not None:
        visible &= offsets >= key_offset_min
    if key_offset_max is not None:
        visible &= offsets <= key_offset_max
    return visible


def attention_reference(q, k, v, softmax_scale=None, key_offset_min=None, key_offset_max=None, upcast=True):
    """Attention over (b, s, h, d) tensors; k and v may have fewer heads (GQA).

    Returns (out, lse): out in q's dtype, lse (b, h, s_q) float32 natural-log. Rows with no visible
    key give out = 0 and lse = -inf. With upcast=True 16-bit inputs are computed in float32 (float64
    stays float64); with upcast=False the arithmetic runs in the input dtype, which is the
    "same-dtype PyTorch" baseline of FlashAttention's test rule.
    """
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q.shape[-1])
    compute_dtype = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32
    group = q.shape[2] // k.shape[2]
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    if group > 1:
        kc = kc.repeat_interleave(group, dim=2)
        vc = vc.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * softmax_scale
    visible = visible_mask(q.shape[1], k.shape[1], key_offset_min, key_offset_max, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float() if compute_dtype != torch.float64 else scores, dim=-1)
    # Rows that see no key have lse = -inf; subtracting 0 there keeps exp(-inf) = 0 and avoids NaN.
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(compute_dtype)
    probs = torch.exp(scores - lse_safe[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vc)
    return out.to(q.dtype), lse.to(torch.float32)


def merge_partial(out, lse, block_out, block_lse):
    """Merges one block's (block_out, block_lse) into a running (out, lse), all float32, returning
    the new pair. out: (b, s, h, d); lse: (b, h, s). lse = -inf means "no contribution yet" and
    never produces NaN: L' = max + log1p(exp(min - max)); O' = exp(L - L') O + exp(l - L') o."""
    high = torch.maximum(lse, block_lse)
    low = torch.minimum(lse, block_lse)
    both_empty = torch.isinf(high) & (high < 0)
    high_safe = torch.where(both_empty, torch.zeros_like(high), high)
    new_lse = torch.where(both_empty, high, high_safe + torch.log1p(torch.exp(low - high_safe)))
    new_lse_safe = torch.where(both_empty, torch.zeros_like(new_lse), new_lse)
    weight_old = torch.exp(lse - new_lse_safe).transpose(1, 2).unsqueeze(-1)
    weight_block = torch.exp(block_lse - new_lse_safe).transpose(1, 2).unsqueeze(-1)
    return weight_old * out + weight_block * block_out, new_lse


def masked_attention_reference(q, k, v, visible, softmax_scale=None, upcast=True):
    """Attention over packed rows, q (total_q, h, d), k and v (total_k, h_kv, d), under an explicit
    bool mask `visible` (total_q, total_k): the reference of the packed-sequence functions (a
    block-diagonal mask keeps each sequence to itself). Returns (out in q's dtype, lse (h, total_q)
    float32, float64 for float64 inputs); rows with no visible key give out 0 and lse -inf.
    Differentiable; upcast as in attention_reference."""
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q.shape[-1])
    compute_dtype = torch.float32 if upcast and q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    if group > 1:
        kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    scores = (torch.einsum("qhd,khd->hqk", qc, kc) * softmax_scale).masked_fill(~visible, float("-inf"))
    has_key = visible.any(dim=1)[:, None]
    # A row without keys takes a softmax over zeros, then times 0: out 0 and no NaN in the gradients.
    probs = torch.softmax(torch.where(has_key, scores, torch.zeros_like(scores)), dim=-1) * has_key
    lse = torch.logsumexp(scores.float() if compute_dtype != torch.float64 else scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vc).to(q.dtype), lse
