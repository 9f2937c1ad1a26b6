"""Attention over packed variable-length sequences (FlashAttention-2's cu_seqlens convention).

Sequences of different lengths lie back to back along one token dimension: q (total_q, h, d), k
and v (total_k, h_kv, d). Sequence i holds queries cu_seqlens_q[i] : cu_seqlens_q[i + 1] and keys
cu_seqlens_k[i] : cu_seqlens_k[i + 1], and its queries see its own keys only. out (total_q, h, d)
is in q's dtype and lse (h, total_q) in fp32 (float64 for float64 tensors off CUDA), the layout of
flash-attn's varlen functions. Query rows that belong to no sequence (padding after
cu_seqlens_q[-1]) get out 0, lse -inf and gradient 0.

CUDA tensors run all sequences in one launch of our kernels, which read a table of the sequences
on the device (packed_kernels.py); tensors elsewhere run the PyTorch reference on each sequence's
rows as a batch of one.
"""
import functools
import numbers
import typing

import torch
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from . import checks
from .flash_attn_interface import prepare_for_kernels
from .packed_kernels import packed_backward, packed_forward
from .packing import KV_PACKED, QKV_PACKED, SEPARATE, pack, unpack
from .ring_reference import accumulation_dtype, piece_backward, piece_forward, row_delta


# How each packing names q, k and v (views along dimension 1) in error messages.
PACKED_NAMES = {SEPARATE: ("q", "k", "v"), KV_PACKED: ("q", "kv[:, 0]", "kv[:, 1]"),
                QKV_PACKED: ("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]")}


class Sequence(typing.NamedTuple):
    """One packed sequence: its query rows, its key rows, and the band (masks.py) of key offsets
    j - i its queries see within it."""
    queries: slice
    keys: slice
    band: typing.Tuple[typing.Optional[int], typing.Optional[int]]


def check_cu_seqlens(cu_seqlens, name, total):
    """The boundaries of cu_seqlens as a tuple of ints (read on the host and checked, unless this
    package made the tensor: see _MADE_HERE): a 1-D int32 or int64 tensor that starts at 0, never
    decreases and ends at most at `total`, the rows of the packed tensor it describes (None: no
    such bound)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of cumulative sequence lengths, got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries (0, then the end of each sequence), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu_seqlens.dtype}")
    bounds = _host_bounds(cu_seqlens, name)
    if total is not None and bounds[-1] > total:
        raise ValueError(f"{name} ends at {bounds[-1]}, past the {total} rows of the packed tensor it describes")
    return bounds


# cu_seqlens tensors this package made (llama3_flash_attn_prepare_cu_seqlens's) -> (their version
# counter, their values as a tuple). A model passes them to every attention layer of a step, and
# reading a CUDA tensor on the host waits for all the GPU work queued before it: each layer would
# drain the GPU's queue and start it again empty. Their values are known where they are made, so
# they are not read back, unless changed in place since (which bumps the version counter). Tensors
# from elsewhere are read on every call: writes that leave the version counter alone (a
# torch.distributed broadcast into the tensor, .data, a NumPy view) would make a copy kept here
# stale and the results silently wrong. Weak keys drop a tensor's entry when the tensor dies.
_MADE_HERE = WeakIdKeyDictionary()


def remember_bounds(cu_seqlens, bounds):
    """Records the values of a cu_seqlens tensor this package just made from `bounds` (which start
    at 0 and never decrease)."""
    version = _version(cu_seqlens)
    if version is not None:
        _MADE_HERE[cu_seqlens] = (version, tuple(bounds))


def _version(tensor):
    try:
        return tensor._version
    except RuntimeError:  # tensors made under torch.inference_mode() keep no version counter
        return None


def _host_bounds(cu_seqlens, name):
    made = _MADE_HERE.get(cu_seqlens)
    if made is not None and made[0] == _version(cu_seqlens):
        return made[1]
    return _read_bounds(cu_seqlens, name)


def _read_bounds(cu_seqlens, name):
    """cu_seqlens on the host as a tuple, checked to start at 0 and never decrease."""
    bounds = tuple(cu_seqlens.tolist())
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    for index, (begin, end) in enumerate(zip(bounds, bounds[1:])):
        if end < begin:
            raise ValueError(f"{name} must never decrease: sequence {index} would have length {end - begin}")
    return bounds


@functools.lru_cache(maxsize=64)
def _longest(bounds):
    return max(end - begin for begin, end in zip(bounds, bounds[1:]))


def check_max_seqlen(max_seqlen, name, bounds, cu_name):
    """max_seqlen must be an int no smaller than the longest sequence of `bounds` (a tuple from
    check_cu_seqlens): flash-attn sizes its grid by it and would leave the rows beyond it unwritten
    without a word."""
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.dim() == 0 and not max_seqlen.is_floating_point():
        max_seqlen = max_seqlen.item()
    if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool):
        raise TypeError(f"{name} must be an int, got {max_seqlen!r}")
    longest = _longest(bounds)
    if max_seqlen < longest:
        raise ValueError(f"{name} ({max_seqlen}) is smaller than the longest sequence of {cu_name} ({longest})")


def check_packed_tensors(tensors, names):
    """q (total_q, h, d), k and v (total_k, h_kv, d): three dimensions each; the rest of the rules
    are checks.check_qkv's, which the caller applies to the unsqueezed tensors."""
    for t, name in zip(tensors, names):
        checks.check_tensor(t, name)
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions (total_tokens, heads, head_dim) for packed "
                             f"variable-length sequences, got shape {tuple(t.shape)}")


def _one(t, rows):
    """Rows of a packed (total, h, d) tensor as a (1, rows, h, d) view."""
    return t[rows].unsqueeze(0)


def varlen_forward(ext, q, k, v, sequences, softmax_scale, out, lse):
    """Writes each sequence's attention into out (total_q, h, d) and lse (h, total_q), views the
    caller owns; rows of no sequence keep what they hold (the caller fills them with 0 and -inf)."""
    if ext is not None:
        return packed_forward(ext, q, k, v, sequences, softmax_scale, out, lse)
    accum = accumulation_dtype(q.dtype)
    for sequence in sequences:
        rows, keys = sequence.queries, sequence.keys
        if rows.stop == rows.start or keys.stop == keys.start:
            continue  # no queries, or no keys to see: the caller's 0 and -inf stand
        seq_out, seq_lse = piece_forward(_one(q, rows), _one(k, keys), _one(v, keys), softmax_scale,
                                         *sequence.band, accum)
        out[rows] = seq_out[0]
        lse[:, rows] = seq_lse[0]


def varlen_backward(ext, dout, q, k, v, out, lse, sequences, softmax_scale, dq, dk, dv):
    """Adds each sequence's gradients into dq (total_q, h, d), dk and dv (total_k, h_kv, d), views
    the caller owns, filled with zeros (rows of no sequence keep them). Several entries of
    `sequences` may share keys (the runs of one sequence's queries in the zigzag layout): their dK/dV
    add up."""
    if ext is not None:
        return packed_backward(ext, dout, q, k, v, out, lse, sequences, softmax_scale, dq, dk, dv)
    accum = accumulation_dtype(q.dtype)
    for sequence in sequences:
        rows, keys = sequence.queries, sequence.keys
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        seq_dout = _one(dout, rows)
        # Unrounded: the caller's fp32 dK/dV (gathered_kv.py) add sequences and ranks before any rounding.
        grads = piece_backward(seq_dout, _one(q, rows), _one(k, keys), _one(v, keys),
                               lse[:, rows].unsqueeze(0).to(accum), row_delta(seq_dout, _one(out, rows), accum),
                               softmax_scale, *sequence.band, accum)
        for destination, grad, span in zip((dq, dk, dv), grads, (rows, keys, keys)):
            destination[span] += grad[0]


def empty_result(q, heads):
    """out zeros (total_q, heads, d) like q, lse -inf (heads, total_q) in the accumulation dtype."""
    total, _, head_dim = q.shape
    out = torch.zeros(total, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((heads, total), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


class VarlenAttentionFunction(torch.autograd.Function):
    """apply(packing, ext, softmax_scale, sequences, *tensors) -> (out, lse); lse is not
    differentiable. tensors are (q, k, v), (q, kv) or (qkv,) packed along dimension 1 as `packing`
    says; the gradients come back the same way."""

    @staticmethod
    def forward(ctx, packing, ext, softmax_scale, sequences, *tensors):
        q, k, v = prepare_for_kernels(ext, unpack(packing, tensors, dim=1))
        out, lse = empty_result(q, q.shape[1])
        varlen_forward(ext, q, k, v, sequences, softmax_scale, out, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.packing, ctx.ext, ctx.softmax_scale, ctx.sequences = packing, ext, softmax_scale, sequences
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        varlen_backward(ctx.ext, dout, q, k, v, out, lse, ctx.sequences, ctx.softmax_scale, dq, dk, dv)
        return (None, None, None, None, *pack(ctx.packing, dq, dk, dv, dim=1))
