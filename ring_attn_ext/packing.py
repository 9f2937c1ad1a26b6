"""The three input packings of FlashAttention's API: separate (q, k, v), kv-packed (q, kv) with kv
(b, s, 2, h_kv, d), and qkv-packed (qkv,) with qkv (b, s, 3, h, d). Gradients go back packed the
way the inputs came."""
import torch

SEPARATE, KV_PACKED, QKV_PACKED = "separate", "kvpacked", "qkvpacked"

# How each packing names q, k and v in error messages.
NAMES = {SEPARATE: ("q", "k", "v"), KV_PACKED: ("q", "kv[:, :, 0]", "kv[:, :, 1]"),
         QKV_PACKED: ("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]")}


def unpack(packing, tensors, dim=2):
    """(q, k, v) views of the tensors given in `packing`; dim is the packed dimension (2 for
    (b, s, n, h, d), 1 for the varlen (total, n, h, d))."""
    if packing == SEPARATE:
        return tuple(tensors)
    if packing == KV_PACKED:
        q, kv = tensors
        return (q, *kv.unbind(dim=dim))
    (qkv,) = tensors
    return qkv.unbind(dim=dim)


def pack(packing, dq, dk, dv, dim=2):
    """The gradients as a tuple matching the inputs of `packing`, packed along dim."""
    if packing == SEPARATE:
        return dq, dk, dv
    if packing == KV_PACKED:
        return dq, torch.stack((dk, dv), dim=dim)
    return (torch.stack((dq, dk, dv), dim=dim),)
