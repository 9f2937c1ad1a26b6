"""ring_attn_ext: context-parallel (ring) attention with FlashAttention-2-style CUDA kernels.

Single-device attention: flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
(FlashAttention-2's names and semantics). Ring attention across a process group: forward/backward
(low level) and ring-flash-attn's drop-in functions. CPU tensors run the same math through the
PyTorch reference, so every function also works without a GPU.
"""
from ._extension import has_extension
from .flash_attn_interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from .masks import band_for
from .reference import attention_reference

__all__ = [
    "attention_reference",
    "band_for",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "has_extension",
]
