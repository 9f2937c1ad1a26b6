"""Hugging Face transformers models on ring_attn_ext: attention implementations that run a model's
attention across a process group. register_hf_attention adds one under a name of its own (no
flash-attn install needed); substitute_hf_flash_attn and update_ring_flash_attn_params are
ring-flash-attn's adapter, with its names and arguments.

Two ways to split the tokens (register_hf_attention's layout):
- A packed stream (layout None; ring-flash-attn's adapter too): the batch is one stream of
  sequences, cu_seqlens over all of it, its length a multiple of the group's size. Rank r feeds
  tokens r * L : (r + 1) * L as a batch of one, with their position_ids (each token's position in
  its sequence, for RoPE). Before the forward every rank calls update_ring_flash_attn_params
  (cu_seqlens, group) with the same cu_seqlens, and every attention layer attends this rank's
  queries to the keys of their sequences through the llama3 engine (llama3_attention.py: K/V
  all-gathered, gradients sent back to the ranks that own them). The packing stays in force until
  the next update: a batch of another packing needs its own call (the ranks compare checksums of
  their packings at every layer, and a batch of another length is refused, but a batch of the same
  length cannot be told apart). The packing comes from the update alone: the cu_seq_lens_* and
  max_length_* keyword arguments transformers may pass the layers are not read.
- A ring layout ("ring", "zigzag", "stripe"): each batch row is one sequence; each rank feeds its
  shard of every row in that layout (sharding.py) with position_ids from positions(); the layers run
  the ring (ring.py; on CUDA the C++ NCCL ring with our kernels).

Padding has no place in either: a padding mask that masks some token is refused. Needs
transformers 4.53 or later (AttentionInterface and AttentionMaskInterface); tested with 4.53, 4.57
and 5.25.
"""
import typing
import zlib

import torch
import torch.distributed as dist

from . import checks, ring
from .gathered_kv import GatheredKVFunction
from .group_checks import validate_together
from .llama3_attention import check_call as llama3_check_call
from .llama3_attention import prepare_from_bounds
from .packing import SEPARATE
from .ring import resolve_group
from .ring_flash_attn import RingAttentionFunction
from .sharding import check_layout
from .varlen import PACKED_NAMES, check_cu_seqlens


class _Packing(typing.NamedTuple):
    """What update_ring_flash_attn_params sets: a checksum of cu_seqlens, which the ranks compare
    at every layer, the tokens each rank holds, and this rank's arguments of the llama3 function,
    by causal."""
    cu_seqlens_crc: int
    chunk: int
    prepared: dict


# The packing each process group is set to, by group (the default group for None).
_PACKINGS = {}


def _group_key(process_group):
    if process_group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return process_group


def update_ring_flash_attn_params(cu_seqlens, process_group=None):
    """Sets the packing of the next forward passes on `process_group` (None: the default group).
    cu_seqlens: int32 (or int64) cumulative lengths of the sequences of the whole packed stream, the
    same values on every rank (the attention layers check that they are); its last entry must be a
    multiple of the group's size, each rank holding an equal contiguous chunk of the stream."""
    ring_group = resolve_group(process_group)
    bounds = check_cu_seqlens(cu_seqlens, "cu_seqlens", None)  # read from the device once
    prepared = {causal: prepare_from_bounds(bounds, cu_seqlens.dtype, cu_seqlens.device, causal, ring_group.rank,
                                            ring_group.world_size)
                for causal in (True, False)}
    _PACKINGS[_group_key(process_group)] = _Packing(zlib.crc32(str(bounds).encode()),
                                                    bounds[-1] // ring_group.world_size, prepared)


def _kernel_dtype(query, module):
    """The dtype to run float32 CUDA activations in, as transformers' FlashAttention integration
    picks it (float32 comes from layer norms kept in float32): autocast's, else the module's weights'."""
    if query.dtype != torch.float32 or not query.is_cuda:
        return query.dtype
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return next(layer.weight.dtype for layer in module.modules() if isinstance(layer, torch.nn.Linear))


def _layer_options(module, attention_mask, sliding_window, softcap, is_causal, s_aux):
    """What both kinds of call check and take from transformers' arguments: returns (causal, window)."""
    if attention_mask is not None:  # the mask functions pass on no mask of ones; a 4D mask comes as given
        raise _padding_mask_error(attention_mask)
    if softcap:
        raise NotImplementedError("softcap: logit soft-capping is not supported yet")
    if s_aux is not None:
        raise NotImplementedError("s_aux: attention sinks are not supported")
    causal = bool(module.is_causal if is_causal is None else is_causal)
    # transformers' sliding_window counts the token itself: it sees sliding_window - 1 back.
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    return causal, window


def _check_packed_call(ring_group, process_group, heads_k_stride, module, query, key, value, attention_mask,
                       dropout, scaling, sliding_window, softcap, is_causal, s_aux):
    """One attention layer's call on a packed stream, on this rank, checked: returns (Signature,
    (q, k, v, GatherCall)) with q, k, v as (L, heads, head_dim) in the dtype the kernels take."""
    packing = _PACKINGS.get(_group_key(process_group))
    if packing is None:
        raise RuntimeError("ring attention in a transformers model: call ring_attn_ext."
                           "update_ring_flash_attn_params(cu_seqlens, process_group) before the forward, so every "
                           "rank knows the packing")
    causal, window = _layer_options(module, attention_mask, sliding_window, softcap, is_causal, s_aux)
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"query: ring attention over a packed stream takes a batch of one, this rank's chunk; got "
                         f"query of shape {tuple(query.shape)}")
    if query.shape[2] != packing.chunk:
        raise ValueError(f"query holds {query.shape[2]} tokens, but the packing that update_ring_flash_attn_params "
                         f"set gives each rank {packing.chunk}: call it with this batch's cu_seqlens before the "
                         "forward")
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice = packing.prepared[causal]
    dtype = _kernel_dtype(query, module)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (L, heads, head_dim)
    signature, call = llama3_check_call(
        q, k, v, PACKED_NAMES[SEPARATE], ring_group, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        k.shape[1] if heads_k_stride is None else heads_k_stride, local_k_slice, dropout, scaling, causal, window,
        None, False, False)
    return signature._replace(operation="transformers", cu_seqlens_crc=packing.cu_seqlens_crc), (q, k, v, call)


def _check_sharded_call(ring_group, layout, module, query, key, value, attention_mask, dropout, scaling,
                        sliding_window, softcap, is_causal, s_aux):
    """One attention layer's call on sequences sharded in a ring layout, on this rank, checked:
    returns (Signature, (q, k, v, RingCall)) with q, k, v as (batch, L, heads, head_dim)."""
    causal, window = _layer_options(module, attention_mask, sliding_window, softcap, is_causal, s_aux)
    checks.check_dropout_p(dropout)
    dtype = _kernel_dtype(query, module)
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))
    signature, call = ring.check_call("forward", q, k, v, ring_group, causal, scaling, layout, window)
    return signature, (q, k, v, call)


def _attention_function(process_group, heads_k_stride, layout):
    """A transformers attention function (module, query, key, value, attention_mask, ...) ->
    (out, None), with query (batch, heads, L, head_dim), key and value (batch, heads_kv, L, head_dim)
    and out (batch, L, heads, head_dim). layout None: the batch is this rank's chunk of a packed
    stream (a batch of one), through the llama3 engine; a ring layout: each batch row is this rank's
    shard of one sequence, through the ring. Every rank checks its call and the ranks compare them
    (group_checks.py) before any K/V moves, so an error on one rank is raised on all of them
    instead of a hang."""

    def ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                       softcap=None, is_causal=None, s_aux=None, **kwargs):
        ring_group = resolve_group(process_group)
        if layout is None:
            q, k, v, call = validate_together(ring_group.group, ring_group.world_size, lambda: _check_packed_call(
                ring_group, process_group, heads_k_stride, module, query, key, value, attention_mask, dropout,
                scaling, sliding_window, softcap, is_causal, s_aux))
            out = GatheredKVFunction.apply(SEPARATE, call, q, k, v)[0].unsqueeze(0)
        else:
            q, k, v, call = validate_together(ring_group.group, ring_group.world_size, lambda: _check_sharded_call(
                ring_group, layout, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                softcap, is_causal, s_aux))
            out = RingAttentionFunction.apply(call, SEPARATE, q, k, v)[0]
        return out.to(query.dtype), None

    return ring_attention


def _no_padding_mask(attention_mask=None, **kwargs):
    """The mask function of register_hf_attention's name, which transformers calls once per forward
    with the caller's 2D padding mask (bool, or None): ring attention needs no mask, and refuses to
    drop one that masks some token (transformers would drop it without a word for an implementation
    that has no mask function)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise _padding_mask_error(attention_mask)
    return None


def _padding_mask_error(attention_mask):
    return ValueError(f"attention_mask: ring attention in a transformers model takes no padding mask, only a mask "
                      f"of ones or None (got one of shape {tuple(attention_mask.shape)} that masks tokens or is "
                      f"not 2D); pack the sequences without padding and pass attention_mask=None")


def _interfaces():
    """transformers' registries of attention functions and of their mask functions."""
    try:
        import transformers
    except ModuleNotFoundError as error:
        raise ImportError("the transformers adapter needs transformers 4.53 or later: pip install "
                          "'transformers>=4.53'") from error
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError(f"the transformers adapter needs transformers 4.53 or later (AttentionInterface and "
                          f"AttentionMaskInterface); importing them from transformers {transformers.__version__} "
                          f"failed: {error}") from error
    return AttentionInterface, AttentionMaskInterface


def register_hf_attention(process_group=None, heads_k_stride=None, name="ring_attn_ext", layout=None):
    """Registers ring attention with transformers as attn_implementation `name` and returns the name:
    load models with from_pretrained(..., attn_implementation=name). process_group: the ranks that
    share the sequences (None: the default group).

    layout None: the batch is a packed stream of sequences (update_ring_flash_attn_params), each
    rank feeding its contiguous chunk as a batch of one; K/V are all-gathered, heads_k_stride k/v
    heads at a time (None: all; fewer bound the memory the gathered copies take).
    layout "ring", "zigzag" or "stripe": each batch row is one sequence, of which each rank feeds
    its shard in that layout (shard(input_ids, layout, rank, world_size) with position_ids from
    positions(seqlen, layout, rank, world_size)); K/V travel the ring (on CUDA the C++ NCCL ring).
    No packing to set; heads_k_stride does not apply."""
    if layout is not None:
        check_layout(layout)
        if heads_k_stride is not None:
            raise ValueError(f"heads_k_stride: applies to the packed stream (layout=None), whose K/V are "
                             f"all-gathered; the ring layout {layout!r} passes all k/v heads around the ring, so "
                             f"pass heads_k_stride=None")
    attention, masks = _interfaces()
    attention.register(name, _attention_function(process_group, heads_k_stride, layout))
    masks.register(name, _no_padding_mask)
    return name


def substitute_hf_flash_attn(process_group, heads_k_stride):
    """ring-flash-attn's adapter: models loaded with attn_implementation="flash_attention_2" run ring
    attention over `process_group` (transformers still checks at load time that flash-attn is
    installed; register_hf_attention needs no such install)."""
    # transformers' FlashAttention mask function stays: it passes on a padding mask, which the
    # attention function refuses, and None where no token is masked.
    _interfaces()[0].register("flash_attention_2", _attention_function(process_group, heads_k_stride, None))
