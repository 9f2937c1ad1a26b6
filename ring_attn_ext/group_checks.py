"""Cross-rank agreement of a ring call: a clear error on every rank instead of a hang.

A ring only works when every rank of the group calls it with the same shapes, dtype, layout,
causal flag, window and softmax scale; when one rank disagrees, or rejects its own arguments, the
others would otherwise wait forever on a send or a receive. So every ring call first runs one
small all_gather of a fixed-size int64 record (CPU tensor on groups with a CPU backend such as
gloo, CUDA tensor on NCCL-only groups) and every rank compares all the records, so all of them
raise the same error, or none does.

Why there is no cache. A cache keyed by the local signature would let a rank whose signature was
seen before skip the all_gather while a rank with a new signature (say, a different sequence
length this iteration) runs it: the second rank then waits in the all_gather for a peer that has
gone on to the ring, which is exactly the hang this module exists to prevent. No rank can know
that the others hit their cache without communicating, so the check runs on every call. Its
cost is one tiny collective. On an NCCL-only group the record travels through the GPU and has to
come back to the host to be compared; the collective runs on a stream of its own, so that wait
covers the collective alone, not the GPU work queued before it: waiting for that (the previous
ring call's kernels) left the GPU idle while the host launched the next call, 0.3-0.7 ms per call
on two H200s (s_local 8k). Two cases skip it safely:
  - the backward of the autograd functions (ring_flash_attn.py): its inputs are the forward's,
    which every rank already agreed on, and every rank runs it, since the forward's check covers
    whether the inputs require gradients;
  - RING_ATTN_GROUP_CHECKS=0 in the environment, for runs known to be consistent (set it the same
    on every rank: a rank that checks waits for one that does not).
"""
import math
import os
import struct
import typing
import zlib

import torch
import torch.distributed as dist

from .collectives import all_gather_single
from .sharding import LAYOUTS

class Signature(typing.NamedTuple):
    operation: str                  # "forward", "backward", "decode" (tree_decode.py), "llama3" (llama3_attention.py),
                                    # "varlen" (varlen_ring_attention.py) or "transformers" (hf_attention.py)
    q_shape: typing.Tuple[int, ...]
    kv_shape: typing.Tuple[int, ...]
    dtype: torch.dtype
    device_type: str
    layout: typing.Optional[str]    # None where the call has no layout (decode)
    causal: bool
    window_size: typing.Tuple[int, int]
    softmax_scale: float
    q_start: int = -1               # decode: the global position of the first query; -1 elsewhere
    heads_k_stride: int = -1        # llama3, varlen: k/v heads gathered at a time; -1 elsewhere
    cu_seqlens_crc: int = -1        # varlen, transformers: a checksum of cu_seqlens, which every rank must share;
                                    # -1 elsewhere
    requires_grad: bool = False     # whether autograd will run a backward through the call on this rank: the
                                    # backward exchanges with every rank too, so all or none must run it
    ulysses_degree: int = -1        # Ulysses x ring (usp_attention.py): ranks per Ulysses group; -1 elsewhere


_OPERATIONS = ("forward", "backward", "decode", "llama3", "varlen", "transformers")
_DEVICE_TYPES = ("cpu", "cuda")
# Record fields: (name, number of int64 slots). A record starts with a flag: 1 = valid arguments.
_FIELDS = (("operation", 1), ("q shape", 4), ("k/v shape", 4), ("dtype", 1), ("device type", 1),
           ("layout", 1), ("causal", 1), ("window_size", 2), ("softmax_scale", 1), ("q_start", 1),
           ("heads_k_stride", 1), ("cu_seqlens", 1), ("requires_grad", 1), ("ulysses_degree", 1))
_RECORD_SIZE = 1 + sum(size for _, size in _FIELDS)


def checks_enabled():
    return os.environ.get("RING_ATTN_GROUP_CHECKS", "1") != "0"


def validate_together(group, world_size, validate):
    """Runs validate() -> (Signature, result) on this rank, then (world_size > 1) compares the
    signatures of all ranks of `group`. Returns result when every rank validated and all agree;
    otherwise raises on every rank: this rank's own validation error, or a ValueError naming the
    ranks that rejected their arguments or the fields on which the ranks disagree."""
    try:
        signature, result = validate()
        record = _encode(signature)
        error = None
    except Exception as exc:  # re-raised below, after the other ranks have learnt about it
        signature, result, record, error = None, None, _encode(None), exc
    if world_size > 1 and checks_enabled():
        records = _all_gather_records(group, world_size, record)
        if error is None:
            _raise_if_disagreeing(records, signature.operation)
    if error is not None:
        raise error
    return result


def backend_supports_cpu(group):
    backend = str(dist.get_backend(group)).lower()
    return "nccl" not in backend or "gloo" in backend


def check_cpu_backend(device, ring_group, what):
    """Tensors off CUDA travel over torch.distributed, which needs a CPU backend (gloo) there.
    ring_group: a ring.RingGroup; what: the operation, for the message."""
    if ring_group.world_size > 1 and device.type != "cuda" and not backend_supports_cpu(ring_group.group):
        raise ValueError(f"{what} on {device.type} tensors runs over torch.distributed and needs a process group "
                         f"with a CPU backend such as gloo; this group's backend is "
                         f"{dist.get_backend(ring_group.group)}")


def backend_supports_cuda(group):
    """Whether the group's backend moves CUDA tensors itself (NCCL; "cpu:gloo,cuda:nccl" too)."""
    return "nccl" in str(dist.get_backend(group)).lower()


def _collective_device(group):
    if backend_supports_cpu(group):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


_CHECK_STREAMS = {}  # CUDA device index -> the stream the checks of NCCL groups run on


def _check_stream(device):
    stream = _CHECK_STREAMS.get(device.index)
    if stream is None:
        stream = _CHECK_STREAMS[device.index] = torch.cuda.Stream(device)
    return stream


def _all_gather_records(group, world_size, record):
    device = _collective_device(group)
    if device.type == "cpu":
        local = torch.tensor(record, dtype=torch.int64)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        return [tuple(t.tolist()) for t in gathered]
    # The copy to the GPU, the all_gather and the copy back wait for each other only (see the
    # module docstring), not for the caller's stream.
    with torch.cuda.stream(_check_stream(device)):
        local = torch.tensor(record, dtype=torch.int64, device=device)
        gathered = torch.empty(world_size, len(record), dtype=torch.int64, device=device)
        all_gather_single(gathered, local, group=group)
        return [tuple(row) for row in gathered.tolist()]


def _encode(signature):
    """The int64 record of a signature (None: this rank rejected its arguments). Raises ValueError
    for a value outside int64's range (a huge window_size), naming it."""
    if signature is None:
        return [0] * _RECORD_SIZE
    record = [1, _OPERATIONS.index(signature.operation), *signature.q_shape, *signature.kv_shape,
              _dtype_code(signature.dtype), _device_code(signature.device_type), _layout_code(signature.layout),
              int(signature.causal), *signature.window_size,
              struct.unpack("<q", struct.pack("<d", signature.softmax_scale))[0], signature.q_start,
              signature.heads_k_stride, signature.cu_seqlens_crc, int(signature.requires_grad),
              signature.ulysses_degree]
    offset = 1
    for name, size in _FIELDS:
        for value in record[offset:offset + size]:
            if not -2 ** 63 <= value < 2 ** 63:
                raise ValueError(f"{name}: {value} is out of range; the ranks compare their arguments as 64-bit "
                                 "integers")
        offset += size
    return record


def _raise_if_disagreeing(records, operation):
    what = _WHAT.get(operation, f"ring attention {operation}")
    rejected = [rank for rank, record in enumerate(records) if record[0] != 1]
    if rejected:
        raise ValueError(f"{what}: rank(s) {rejected} of the process group rejected their "
                         "arguments (the error is raised there); every rank stops here instead of waiting for them")
    differences, fields = [], []
    offset = 1
    for name, size in _FIELDS:
        values = [record[offset:offset + size] for record in records]
        if any(value != values[0] for value in values):
            shown = ", ".join(f"rank {rank}: {_decode(name, value)}" for rank, value in enumerate(values))
            differences.append(f"{name} ({shown})")
            fields.append(name)
        offset += size
    if differences:
        rule = _RULES.get(operation, "local shards of the same shape and dtype and the same layout, causal, "
                                     "window_size and softmax_scale")
        if "requires_grad" in fields:
            rule += _GRADIENT_RULE
        raise ValueError(f"{what}: the ranks of the process group disagree on "
                         + "; ".join(differences) + f". Every rank must pass {rule}.")


_GRADIENT_RULE = (", with inputs that require gradients on every rank or on none (the backward, too, runs on "
                  "every rank together)")
_WHAT = {"decode": "tree attention decoding", "llama3": "llama3 varlen attention",
         "varlen": "varlen ring attention", "transformers": "ring attention in a transformers model"}
_RULES = {"decode": "the same queries and q_start, k/v shards of one cache (any length; the same batch, heads and "
                    "head_dim), and the same dtype, causal and softmax_scale",
          "llama3": "local chunks of the same shape and dtype and the same causal, window_size, softmax_scale and "
                    "heads_k_stride",
          "varlen": "local shards of the same shape and dtype and the same cu_seqlens, layout, causal, window_size, "
                    "softmax_scale and heads_k_stride",
          "transformers": "local chunks of the same shape and dtype under the same packing (the same cu_seqlens "
                          "given to update_ring_flash_attn_params) and the same attention options"}


def _device_code(device_type):
    return _DEVICE_TYPES.index(device_type) if device_type in _DEVICE_TYPES else len(_DEVICE_TYPES)


def _layout_code(layout):
    return len(LAYOUTS) if layout is None else LAYOUTS.index(layout)


def _dtype_code(dtype):
    return zlib.crc32(str(dtype).encode())  # stable across processes, unlike hash()


_DTYPE_NAMES = {_dtype_code(d): str(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _decode(name, value):
    if name == "operation":
        return _OPERATIONS[value[0]]
    if name in ("q shape", "k/v shape"):
        return tuple(value)
    if name == "dtype":
        return _DTYPE_NAMES.get(value[0], f"dtype code {value[0]}")
    if name == "device type":
        return _DEVICE_TYPES[value[0]] if value[0] < len(_DEVICE_TYPES) else "other"
    if name == "layout":
        return repr(LAYOUTS[value[0]]) if value[0] < len(LAYOUTS) else "none"
    if name in ("causal", "requires_grad"):
        return bool(value[0])
    if name in ("window_size", "q_start", "heads_k_stride", "ulysses_degree"):
        return tuple(value) if len(value) > 1 else value[0]
    if name == "cu_seqlens":
        return f"checksum {value[0]:#x}"
    scale = struct.unpack("<d", struct.pack("<q", value[0]))[0]
    return repr(scale) if math.isfinite(scale) else str(scale)
