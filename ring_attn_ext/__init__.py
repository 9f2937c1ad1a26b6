"""ring_attn_ext: context-parallel (ring) attention with FlashAttention-2-style CUDA kernels.

Single-device attention: flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
(FlashAttention-2's names and semantics). Ring attention across a process group: forward/backward
(low level) and ring-flash-attn's drop-in functions. CPU tensors run the same math through the
PyTorch reference, so every function also works without a GPU. Ulysses x ring (USP):
usp_groups and usp_attn_func. Decoding over a key/value cache split across ranks: tree_attn_decode.
Packed variable-length sequences: flash_attn_varlen_func (and its packed forms) on one device, and
ring-flash-attn's llama3_flash_attn_varlen_func, ring_flash_attn_varlen_func and
zigzag_ring_flash_attn_varlen_func (all-gathered K/V) across a process group. Hugging Face
transformers models: register_hf_attention, and ring-flash-attn's substitute_hf_flash_attn with
update_ring_flash_attn_params.
"""
from ._extension import has_extension
from .flash_attn_interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from .flash_attn_varlen_interface import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                          flash_attn_varlen_qkvpacked_func)
from .hf_attention import register_hf_attention, substitute_hf_flash_attn, update_ring_flash_attn_params
from .llama3_attention import (llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func,
                               llama3_flash_attn_varlen_kvpacked_func, llama3_flash_attn_varlen_qkvpacked_func)
from .masks import band_for
from .reference import attention_reference
from .ring import backward, forward
from .ring_flash_attn import (ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func,
                              stripe_flash_attn_func, stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func,
                              zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_kvpacked_func,
                              zigzag_ring_flash_attn_qkvpacked_func)
from .ring_plan import Piece, build_plan
from .sharding import LAYOUTS, positions, shard, unshard
from .tree_decode import tree_attn_decode
from .usp_attention import usp_attn_func
from .varlen_ring_attention import (ring_flash_attn_varlen_func, ring_flash_attn_varlen_kvpacked_func,
                                    ring_flash_attn_varlen_qkvpacked_func, zigzag_ring_flash_attn_varlen_func,
                                    zigzag_ring_flash_attn_varlen_kvpacked_func,
                                    zigzag_ring_flash_attn_varlen_qkvpacked_func)
from .usp_process_groups import UspGroups, usp_groups

__all__ = [
    "LAYOUTS",
    "Piece",
    "UspGroups",
    "attention_reference",
    "backward",
    "band_for",
    "build_plan",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "forward",
    "has_extension",
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "positions",
    "register_hf_attention",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "shard",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "substitute_hf_flash_attn",
    "tree_attn_decode",
    "unshard",
    "update_ring_flash_attn_params",
    "usp_attn_func",
    "usp_groups",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
]
