"""The C++ ring scheduler (csrc/ring/) on CUDA, against full attention on the unsharded tensors.

(a) Loopback: a whole ring of 1, 2, 3, 4 or 8 virtual ranks on one GPU, through the same step
    machines the NCCL ring runs (ring_attn_ext._ring_cuda.ring_*_loopback), for every layout,
    causal or not, MHA and GQA, windows and odd shapes, forward and backward. The forward alone
    also runs every ring size from 1 to 8, global bands that leave rows without any key, and
    random plans (pieces in any order and overlap, empty ranges, empty bands, steps without
    pieces) against one softmax over exactly the pairs they compute: the output rows the pieces
    emit and the rows finish() completes must make up every rank's whole output. The backward also
    runs random plans whose pieces' key ranges overlap, leave gaps or lie apart (which dK/dV rows a
    kernel writes, which it adds to, and which start from zero).
(b) NCCL: one process per GPU (two GPUs or more), through ring_attn_ext.forward/backward,
    every layout; each rank's forward must also equal the loopback ring's bit for bit. Also
    Ulysses x ring attention (usp_attn_func) with every rank in one Ulysses group, k/v heads split
    and replicated, forward and backward; and the packed-sequence functions across ranks
    (llama3_flash_attn_varlen_func, ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_func:
    K/V all-gathered over NCCL, dK/dV reduce-scattered).
(c) Ulysses x ring, and the packed-sequence functions, on one GPU: two processes over gloo (for
    Ulysses every rank in one Ulysses group; the packed functions gather through host copies).
Both rings are also captured in a CUDA graph and replayed on new inputs.

Accuracy: FlashAttention's rule against an fp32 reference (2x the same-dtype PyTorch error for
out, 3x for gradients), and, since every partial of the ring stays fp32, the ring's error may be at
most 1.5x the error of the single-GPU kernels on the unsharded tensors. GPU tests skip, with the
reason, without a CUDA GPU or the compiled extension.
"""
import contextlib
import os
import random
import tempfile
import time
import typing

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import (GRADIENT_EPS, assert_flash_rule, assert_lse_equal, cuda_kernel_built, max_error,
                      packed_attention_with_grads, poison_cuda_allocator, requires_cuda_extension, varlen_mask)
import ring_attn_ext
from ring_attn_ext import _ring_cuda
from ring_attn_ext.masks import band_for
from ring_attn_ext.reference import attention_reference, visible_mask
from ring_attn_ext.ring_plan import build_plan
from ring_attn_ext.sharding import LAYOUTS, local_runs, positions, shard, unshard

# NVLink multicast stays off in every process these tests start (it can take a shared host's GPUs
# out of service).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FLASH_ERROR_FACTOR = 1.5  # ring error / single-GPU kernel error, both against the fp32 reference
PREFERRED_KERNELS = [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16), (64, torch.float16),
                     (96, torch.bfloat16), (32, torch.bfloat16), (256, torch.bfloat16)]

Case = typing.NamedTuple("Case", [
    ("world_size", int), ("layout", str), ("causal", bool), ("window_size", typing.Tuple[int, int]),
    ("batch", int), ("seqlen_local", int), ("heads", int), ("heads_kv", int),
    ("softmax_scale", typing.Optional[float])])


def make_case(world_size, layout, causal, window_size=(-1, -1), batch=2, seqlen_local=None, heads=4, heads_kv=4,
              softmax_scale=None):
    if seqlen_local is None:
        seqlen_local = 38 if layout == "zigzag" else 37  # odd where the layout allows it
    return Case(world_size, layout, causal, window_size, batch, seqlen_local, heads, heads_kv, softmax_scale)


def kernel_config():
    """(head_dim, dtype) of a forward and backward kernel pair this build has; skips if none."""
    for head_dim, dtype in PREFERRED_KERNELS:
        if cuda_kernel_built(head_dim, dtype, backward=True):
            return head_dim, dtype
    pytest.skip("this build has forward and backward kernels for none of " + str(PREFERRED_KERNELS))


def global_tensors(case, head_dim, dtype, device, seed):
    """q, k, v, dout of the whole sequence; drawn on the CPU, so every process draws the same."""
    generator = torch.Generator().manual_seed(seed)
    seqlen = case.seqlen_local * case.world_size

    def draw(heads):
        return torch.randn(case.batch, seqlen, heads, head_dim, generator=generator).to(device, dtype)

    return draw(case.heads), draw(case.heads_kv), draw(case.heads_kv), draw(case.heads)


class FullAttention(typing.NamedTuple):
    """Full attention on the unsharded tensors: fp32 reference (out, lse, grads), same-dtype
    PyTorch (out_pt, grads_pt) and the single-GPU kernels (out_flash, lse_flash, grads_flash)."""
    out: torch.Tensor
    lse: torch.Tensor
    grads: tuple
    out_pt: torch.Tensor
    grads_pt: tuple
    out_flash: torch.Tensor
    lse_flash: torch.Tensor
    grads_flash: tuple


def attention_with_grads(q, k, v, dout, scale, band, upcast):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, scale, *band, upcast=upcast)
    out.backward(dout)
    return out.detach(), lse, tuple(t.grad for t in leaves)


def full_attention(q, k, v, dout, case, scale):
    from ring_attn_ext._extension import _C
    seqlen = q.shape[1]
    band = band_for(seqlen, seqlen, case.causal, case.window_size)
    out, lse, grads = attention_with_grads(*(t.float() for t in (q, k, v, dout)), scale, band, upcast=True)
    out_pt, _, grads_pt = attention_with_grads(q, k, v, dout, scale, band, upcast=False)
    out_flash, lse_flash = _C.fwd(q, k, v, scale, *band)
    grads_flash = _C.bwd(dout, q, k, v, out_flash, lse_flash, scale, *band)
    return FullAttention(out, lse, grads, out_pt, grads_pt, out_flash, lse_flash, tuple(grads_flash))


def assert_no_worse_than_flash(actual, flash, reference, name, eps=1e-6):
    """The ring keeps every partial in fp32, so it may not be markedly less accurate than the
    single-GPU kernels; a quarter of the dtype's rounding of the reference absorbs ties."""
    error = max_error(actual, reference)
    flash_error = max_error(flash, reference)
    rounding = max_error(reference.to(actual.dtype), reference)
    bound = FLASH_ERROR_FACTOR * flash_error + rounding / 4 + eps
    assert error <= bound, (f"{name}: ring error {error:.3g} > {FLASH_ERROR_FACTOR} x single-GPU kernel error "
                            f"{flash_error:.3g} (+ {rounding / 4 + eps:.2g})")


def assert_matches_full_attention(full, out, lse, grads, dtype, select=lambda t, dim=1: t, summed_dkv=False):
    """Checks a ring's out, lse, (dq, dk, dv) against `full`; `select` maps a full-sequence
    tensor to the part the ring result covers (a rank's shard, or everything). summed_dkv: dk and
    dv are sums of parts already rounded to the input dtype (k/v heads replicated across a Ulysses
    group), so they meet FlashAttention's rule but not the bound against the fp32-accumulating kernel."""
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_flash_rule(out, select(full.out), select(full.out_pt), 2, "out")
    assert_no_worse_than_flash(out, select(full.out_flash), select(full.out), "out")
    assert_lse_equal(lse, select(full.lse, 2), atol=2e-4)
    lse_error, flash_lse_error = max_error(lse, select(full.lse, 2)), max_error(select(full.lse_flash, 2),
                                                                                 select(full.lse, 2))
    assert lse_error <= 2 * flash_lse_error + 1e-5, f"lse: ring error {lse_error:.3g} vs kernel {flash_lse_error:.3g}"
    for name, grad, grad_ref, grad_pt, grad_flash in zip(("dq", "dk", "dv"), grads, full.grads, full.grads_pt,
                                                         full.grads_flash):
        assert grad.dtype == dtype, f"{name}: dtype {grad.dtype}"
        assert_flash_rule(grad, select(grad_ref), select(grad_pt), 3, name, eps=GRADIENT_EPS)
        if not (summed_dkv and name != "dq"):
            assert_no_worse_than_flash(grad, select(grad_flash), select(grad_ref), name, eps=GRADIENT_EPS)


def loopback_ring(q, k, v, dout, case, scale):
    """Shards the global tensors, runs the loopback ring forward and backward, returns the
    per-rank results as lists: outs, lses, dqs, dks, dvs."""
    n = case.world_size
    shards = [[shard(t, case.layout, rank, n) for rank in range(n)] for t in (q, k, v, dout)]
    plans = [build_plan(case.layout, rank, n, case.seqlen_local, case.causal, case.window_size) for rank in range(n)]
    poison_cuda_allocator()
    outs, lses = _ring_cuda.ring_forward_loopback(*shards[:3], plans, scale)
    dqs, dks, dvs = _ring_cuda.ring_backward_loopback(shards[3], *shards[:3], outs, lses, plans, scale)
    return outs, lses, dqs, dks, dvs


def check_loopback_case(case, seed=0):
    head_dim, dtype = kernel_config()
    scale = case.softmax_scale if case.softmax_scale is not None else head_dim ** -0.5
    q, k, v, dout = global_tensors(case, head_dim, dtype, "cuda", seed)
    full = full_attention(q, k, v, dout, case, scale)
    outs, lses, dqs, dks, dvs = loopback_ring(q, k, v, dout, case, scale)
    n, layout = case.world_size, case.layout
    out, lse = unshard(outs, layout, n), unshard(lses, layout, n, dim=2)
    grads = tuple(unshard(g, layout, n) for g in (dqs, dks, dvs))
    assert_matches_full_attention(full, out, lse, grads, dtype)


@requires_cuda_extension
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_loopback_ring_matches_full_attention(world_size, layout, causal, heads, heads_kv):
    check_loopback_case(make_case(world_size, layout, causal, heads=heads, heads_kv=heads_kv))


@requires_cuda_extension
@pytest.mark.parametrize("case", [
    make_case(4, "ring", True, batch=1, seqlen_local=1, heads=4, heads_kv=1),
    make_case(4, "stripe", True, batch=2, seqlen_local=1),
    make_case(4, "zigzag", True, batch=1, seqlen_local=2, heads=8, heads_kv=1),
    make_case(3, "ring", True, seqlen_local=127, heads=8, heads_kv=8),
    make_case(3, "zigzag", False, batch=1, seqlen_local=128, heads=8, heads_kv=1),
    make_case(8, "stripe", True, batch=1, seqlen_local=17, heads=8, heads_kv=1),
    make_case(2, "ring", True, batch=1, seqlen_local=1000, heads=4, heads_kv=1, softmax_scale=0.3),
    make_case(2, "zigzag", True, batch=1, seqlen_local=2048, heads=4, heads_kv=4),
    make_case(2, "stripe", True, batch=1, seqlen_local=4097, heads=2, heads_kv=1),
    # The backward computes its own block in two parts by kv heads, half of them first: odd counts
    # (2 + 3 under GQA; 1 + 2 where the second part lives in a partial buffer, from N = 4).
    make_case(2, "zigzag", True, batch=1, seqlen_local=100, heads=10, heads_kv=5),
    make_case(4, "ring", False, batch=2, seqlen_local=33, heads=3, heads_kv=3),
], ids=lambda case: f"n{case.world_size}-{case.layout}-causal{int(case.causal)}-b{case.batch}-s{case.seqlen_local}-"
                    f"h{case.heads}-{case.heads_kv}")
def test_loopback_ring_odd_shapes(case):
    check_loopback_case(case)


@requires_cuda_extension
@pytest.mark.parametrize("causal,window_size", [(True, (50, 0)), (False, (20, 30)), (False, (0, 0))])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loopback_ring_sliding_windows(layout, causal, window_size):
    check_loopback_case(make_case(4, layout, causal, window_size, seqlen_local=64, heads=8, heads_kv=2))


@requires_cuda_extension
def test_loopback_ring_forward_is_deterministic():
    """A race between the streams (a block read before it arrived, or overwritten while read)
    shows up as results that change from run to run."""
    case = make_case(8, "zigzag", True, seqlen_local=256, heads=8, heads_kv=2)
    head_dim, dtype = kernel_config()
    q, k, v, dout = global_tensors(case, head_dim, dtype, "cuda", seed=1)
    runs = [loopback_ring(q, k, v, dout, case, head_dim ** -0.5)[:2] for _ in range(3)]
    for outs, lses in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs, runs[0][0])), "out differs between runs"
        assert all(torch.equal(a, b) for a, b in zip(lses, runs[0][1])), "lse differs between runs"


# Forward only: which rows a rank's pieces finish. Each piece that is the last to touch all of its
# query rows writes their final output itself (emit mode); finish() completes the other rows from
# the uninitialised fp32 running output. Memory is poisoned with NaN first, so a row that neither
# wrote shows up; rows that see no key at all must come out exactly 0 with lse -inf.

def masked_attention(q, k, v, scale, mask, upcast):
    """One softmax per query row over the keys `mask` (s_q, s_k) allows: (out, lse fp32 (b, h, s_q));
    rows with no allowed key give 0 and -inf. upcast=True computes (and returns out) in fp32,
    upcast=False in q's dtype (the same-dtype baseline of FlashAttention's rule)."""
    dtype = torch.float32 if upcast else q.dtype
    group = q.shape[2] // k.shape[2]
    qc, kc, vc = q.to(dtype), k.to(dtype).repeat_interleave(group, 2), v.to(dtype).repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).to(dtype)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", probs, vc), lse


def check_forward_rows(out, lse, ref_out, ref_lse, same_out, what):
    assert_flash_rule(out, ref_out, same_out, 2, f"{what}: out")  # also: every element finite
    assert_lse_equal(lse, ref_lse, 2e-4, f"{what}: lse")
    empty = torch.isneginf(ref_lse).transpose(1, 2)
    assert (out[empty] == 0).all(), f"{what}: rows that see no key must be exactly 0"


def check_loopback_forward(q, k, v, layout, world_size, plans, scale, band, what):
    """The loopback ring's forward with `plans` against attention over the unsharded tensors with
    the global band `band`."""
    shards = [[shard(t, layout, rank, world_size) for rank in range(world_size)] for t in (q, k, v)]
    poison_cuda_allocator()
    outs, lses = _ring_cuda.ring_forward_loopback(*shards, plans, scale)
    out, lse = unshard(outs, layout, world_size), unshard(lses, layout, world_size, dim=2)
    ref_out, ref_lse = attention_reference(q.float(), k.float(), v.float(), scale, *band)
    same_out, _ = attention_reference(q, k, v, scale, *band, upcast=False)
    check_forward_rows(out, lse, ref_out, ref_lse, same_out, what)


@requires_cuda_extension
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", range(1, 9))
def test_loopback_ring_forward_every_world_size(world_size, layout, causal):
    """build_plan's plans: stripe ranks finish their first row, zigzag middle ranks their first
    chunk, causal ring ranks emit at the step after which they compute nothing."""
    case = make_case(world_size, layout, causal, heads=8, heads_kv=2)
    head_dim, dtype = kernel_config()
    q, k, v, _ = global_tensors(case, head_dim, dtype, "cuda", seed=world_size)
    seqlen = q.shape[1]
    plans = [build_plan(layout, rank, world_size, case.seqlen_local, causal) for rank in range(world_size)]
    check_loopback_forward(q, k, v, layout, world_size, plans, head_dim ** -0.5,
                           band_for(seqlen, seqlen, causal), f"{layout} n{world_size} causal={causal}")


def band_plan(layout, rank, world_size, seqlen_local, key_offset_min, key_offset_max):
    """A plan for any global band key_offset_min <= j - i <= key_offset_max. build_plan only makes
    bands that contain the diagonal (every row sees a key) and trims its pieces; this one gives
    each (query run, key run) pair of every step one untrimmed piece, so pieces hold rows, or only
    rows, that see no key. The run-local band follows ring_plan.py's formula."""
    steps = []
    for step in range(world_size):
        pieces = []
        for q_run in local_runs(layout, rank, world_size, seqlen_local):
            for k_run in local_runs(layout, (rank - step) % world_size, world_size, seqlen_local):
                distance, stride = k_run.global_start - q_run.global_start, q_run.stride
                low = None if key_offset_min is None else -((distance - key_offset_min) // stride)
                high = None if key_offset_max is None else (key_offset_max - distance) // stride
                pieces.append((q_run.local_start, q_run.length, k_run.local_start, k_run.length, low, high))
        steps.append(pieces)
    return steps


@requires_cuda_extension
@pytest.mark.parametrize("band_kind", ["last_rows_empty", "first_rows_empty", "first_third_empty",
                                       "last_third_empty", "nothing_visible"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_loopback_ring_forward_rows_without_keys(world_size, layout, band_kind):
    case = make_case(world_size, layout, False, seqlen_local=130 if layout == "zigzag" else 129, heads=8,
                     heads_kv=2)
    head_dim, dtype = kernel_config()
    q, k, v, _ = global_tensors(case, head_dim, dtype, "cuda", seed=7)
    third = q.shape[1] // 3
    band = {"last_rows_empty": (3, 9), "first_rows_empty": (-9, -3), "first_third_empty": (None, -third),
            "last_third_empty": (third, None), "nothing_visible": (2, 1)}[band_kind]
    plans = [band_plan(layout, rank, world_size, case.seqlen_local, *band) for rank in range(world_size)]
    check_loopback_forward(q, k, v, layout, world_size, plans, head_dim ** -0.5, band,
                           f"{layout} n{world_size} band {band}")


def random_steps(rng, world_size, seqlen_local, draw_piece):
    """A random plan and the (s, world_size * s) mask of the (query, key) pairs it computes, the
    keys of step i in columns [i * s, (i + 1) * s). Per step (some have no piece): the rows
    [0, seqlen_local) cut into disjoint segments (some empty), each made into one piece by
    draw_piece(rng, start, stop) -> (q_start, q_stop, k_start, k_stop, band), in random order.
    A generator whose pieces keep the segment on one side (keys or queries) never puts a
    (query, key) pair in two pieces."""
    steps, mask = [], torch.zeros(seqlen_local, world_size * seqlen_local, dtype=torch.bool)
    for step in range(world_size):
        pieces = []
        if rng.random() < 0.8:
            cuts = sorted(rng.randint(0, seqlen_local) for _ in range(rng.randint(1, 3)))
            edges = [0] + cuts + [seqlen_local]
            for start, stop in zip(edges[:-1], edges[1:]):
                q_start, q_stop, k_start, k_stop, band = draw_piece(rng, start, stop)
                pieces.append((q_start, q_stop - q_start, k_start, k_stop - k_start, *band))
                columns = slice(step * seqlen_local + k_start, step * seqlen_local + k_stop)
                mask[q_start:q_stop, columns] = visible_mask(q_stop - q_start, k_stop - k_start, *band, "cpu")
        rng.shuffle(pieces)
        steps.append(pieces)
    return steps, mask


def random_plan(rng, world_size, seqlen_local):
    """random_steps with the block cut into disjoint key ranges, each with a random query range
    (some empty; overlapping the other pieces' of the step) and band (some empty)."""
    def draw_piece(rng, k_start, k_stop):
        q_start = rng.randint(0, seqlen_local)
        q_stop = rng.randint(q_start, seqlen_local)
        low = rng.randint(-60, 60)
        band = rng.choice([(None, None), (None, low), (low, None), (low, low + rng.randint(0, 40)), (low, low - 1)])
        return q_start, q_stop, k_start, k_stop, band

    return random_steps(rng, world_size, seqlen_local, draw_piece)


@requires_cuda_extension
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("world_size", range(1, 9))
def test_loopback_ring_forward_random_plans(world_size, seed):
    """Any plan: each rank's result must be one softmax over exactly the pairs its pieces compute,
    against the keys of the blocks it held, whatever the pieces' order and overlap."""
    head_dim, dtype = kernel_config()
    rng = random.Random(1000 * world_size + seed)
    batch, seqlen_local, heads, heads_kv, scale = 2, 150, 8, 2, head_dim ** -0.5
    generator = torch.Generator().manual_seed(seed)

    def draw(heads):
        return [torch.randn(batch, seqlen_local, heads, head_dim, generator=generator).to("cuda", dtype)
                for _ in range(world_size)]

    qs, ks, vs = draw(heads), draw(heads_kv), draw(heads_kv)
    plans, masks = zip(*(random_plan(rng, world_size, seqlen_local) for _ in range(world_size)))
    poison_cuda_allocator()
    outs, lses = _ring_cuda.ring_forward_loopback(qs, ks, vs, list(plans), scale)
    for rank in range(world_size):
        held = [(rank - step) % world_size for step in range(world_size)]
        keys, values = torch.cat([ks[src] for src in held], dim=1), torch.cat([vs[src] for src in held], dim=1)
        ref_out, ref_lse = masked_attention(qs[rank], keys, values, scale, masks[rank], upcast=True)
        same_out, _ = masked_attention(qs[rank], keys, values, scale, masks[rank], upcast=False)
        check_forward_rows(outs[rank], lses[rank], ref_out, ref_lse, same_out, f"rank {rank}")


def random_backward_plan(rng, world_size, seqlen_local):
    """random_steps with the shard's query rows cut into disjoint ranges, each with any non-empty
    key range, so a step's key ranges overlap (wholly or in part), leave gaps, or lie apart: what
    the backward's choice between writing and adding dK/dV must get right."""
    def draw_piece(rng, q_start, q_stop):
        k_start = rng.randint(0, seqlen_local - 1)
        k_stop = rng.randint(k_start + 1, seqlen_local)
        band = rng.choice([(None, None), (None, rng.randint(-20, 60)), (rng.randint(-60, 20), None)])
        return q_start, q_stop, k_start, k_stop, band

    return random_steps(rng, world_size, seqlen_local, draw_piece)


def masked_attention_for_autograd(q, k, v, scale, mask, upcast):
    """masked_attention's output, written so that autograd gives finite (zero) gradients for rows
    with no allowed key: those rows' scores are replaced by zeros before the softmax and their
    probabilities by zeros after it."""
    dtype = torch.float32 if upcast else q.dtype
    group = q.shape[2] // k.shape[2]
    qc, kc, vc = q.to(dtype), k.to(dtype).repeat_interleave(group, 2), v.to(dtype).repeat_interleave(group, 2)
    mask = mask.to(q.device)
    seen = mask.any(dim=-1, keepdim=True)  # (s_q, 1)
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~seen, 0.0)
    probs = torch.where(seen, torch.softmax(scores, dim=-1), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vc)


@requires_cuda_extension
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_loopback_ring_backward_random_plans(world_size, seed, heads, heads_kv):
    """Any plan, backward: dq of every rank and dk/dv of every block (summed over the ranks that held
    it) against autograd through one softmax per rank over exactly the pairs its pieces compute."""
    head_dim, dtype = kernel_config()
    rng = random.Random(100 * world_size + seed)
    batch, seqlen_local, scale = 2, 150, head_dim ** -0.5
    generator = torch.Generator().manual_seed(seed)

    def draw(heads):
        return [torch.randn(batch, seqlen_local, heads, head_dim, generator=generator).to("cuda", dtype)
                for _ in range(world_size)]

    qs, ks, vs, douts = draw(heads), draw(heads_kv), draw(heads_kv), draw(heads)
    plans, masks = zip(*(random_backward_plan(rng, world_size, seqlen_local) for _ in range(world_size)))

    def reference(upcast):
        dtype_ = torch.float32 if upcast else dtype
        leaves = [[t.detach().to(dtype_).requires_grad_() for t in ts] for ts in (qs, ks, vs)]
        loss = 0
        for rank in range(world_size):
            held = [(rank - step) % world_size for step in range(world_size)]
            keys = torch.cat([leaves[1][src] for src in held], dim=1)
            values = torch.cat([leaves[2][src] for src in held], dim=1)
            out = masked_attention_for_autograd(leaves[0][rank], keys, values, scale, masks[rank], upcast)
            loss = loss + (out * douts[rank].to(out.dtype)).sum()
        loss.backward()
        return [[t.grad for t in ts] for ts in leaves]

    want, same = reference(upcast=True), reference(upcast=False)
    poison_cuda_allocator()
    outs, lses = _ring_cuda.ring_forward_loopback(qs, ks, vs, list(plans), scale)
    grads = _ring_cuda.ring_backward_loopback(douts, qs, ks, vs, outs, lses, list(plans), scale)
    for name, got, ref, baseline in zip(("dq", "dk", "dv"), grads, want, same):
        for rank in range(world_size):
            assert_flash_rule(got[rank], ref[rank], baseline[rank], 3, f"{name} of rank {rank}", eps=GRADIENT_EPS)


@requires_cuda_extension
def test_loopback_ring_forward_without_any_piece():
    """Plans with no piece at all: every rank's output is 0 and its lse -inf."""
    head_dim, dtype = kernel_config()
    world_size, shape = 3, (2, 70, 4, head_dim)
    qs = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(world_size)]
    poison_cuda_allocator()
    outs, lses = _ring_cuda.ring_forward_loopback(qs, qs, qs, [[[]] * world_size] * world_size, 1.0)
    for out, lse in zip(outs, lses):
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()


@requires_cuda_extension
def test_loopback_ring_reads_strided_kv():
    """k and v as views into a packed (b, s, 2, h_kv, d) tensor: the ring sends contiguous copies
    and must give the forward of contiguous inputs exactly, and the same gradients up to order."""
    case = make_case(3, "zigzag", True, heads=8, heads_kv=2)
    head_dim, dtype = kernel_config()
    q, k, v, dout = global_tensors(case, head_dim, dtype, "cuda", seed=2)
    n, scale = case.world_size, head_dim ** -0.5
    plans = [build_plan(case.layout, rank, n, case.seqlen_local, True) for rank in range(n)]
    qs, ks, vs, douts = ([shard(t, case.layout, rank, n) for rank in range(n)] for t in (q, k, v, dout))
    packed = [torch.stack((k_r, v_r), dim=2) for k_r, v_r in zip(ks, vs)]
    ks_view, vs_view = [kv[:, :, 0] for kv in packed], [kv[:, :, 1] for kv in packed]
    assert not ks_view[0].is_contiguous()
    outs, lses = _ring_cuda.ring_forward_loopback(qs, ks, vs, plans, scale)
    outs_view, lses_view = _ring_cuda.ring_forward_loopback(qs, ks_view, vs_view, plans, scale)
    assert all(torch.equal(a, b) for a, b in zip(outs_view, outs))
    assert all(torch.equal(a, b) for a, b in zip(lses_view, lses))
    grads = _ring_cuda.ring_backward_loopback(douts, qs, ks, vs, outs, lses, plans, scale)
    grads_view = _ring_cuda.ring_backward_loopback(douts, qs, ks_view, vs_view, outs, lses, plans, scale)
    for name, per_rank, per_rank_view in zip(("dq", "dk", "dv"), grads, grads_view):
        for rank, (grad, grad_view) in enumerate(zip(per_rank, per_rank_view)):
            torch.testing.assert_close(grad_view, grad, msg=f"{name} of rank {rank}")


def capture_and_replay(run, static_inputs, fresh_inputs):
    """Captures run(*static_inputs) in a CUDA graph (after one eager warm-up on a side stream, as
    torch.cuda.graph wants), copies fresh_inputs into the static inputs, replays, and returns the
    replayed outputs (flattened list of tensors)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = run(*static_inputs)
    for static, fresh in zip(static_inputs, fresh_inputs):
        for s, f in zip(static, fresh):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    return [t.clone() for t in static_outputs]


@requires_cuda_extension
def test_loopback_ring_replays_in_a_cuda_graph():
    """The scheduler only enqueues work (streams, events, copies, kernels; no host waits), so a
    whole ring, forward and backward, can be captured once and replayed on new inputs: the replay
    must give what an eager run on those inputs gives (the forward bit for bit; the gradients up
    to the order of their fp32 atomic additions)."""
    case = make_case(3, "zigzag", True, seqlen_local=130, heads=8, heads_kv=2)
    head_dim, dtype = kernel_config()
    n, scale = case.world_size, head_dim ** -0.5
    plans = [build_plan(case.layout, rank, n, case.seqlen_local, True) for rank in range(n)]

    def sharded(seed):
        return [[shard(t, case.layout, rank, n).contiguous() for rank in range(n)]
                for t in global_tensors(case, head_dim, dtype, "cuda", seed)]

    def ring(qs, ks, vs, douts):
        outs, lses = _ring_cuda.ring_forward_loopback(qs, ks, vs, plans, scale)
        grads = _ring_cuda.ring_backward_loopback(douts, qs, ks, vs, outs, lses, plans, scale)
        return [*outs, *lses, *(g for per_rank in grads for g in per_rank)]

    static, fresh = sharded(seed=4), sharded(seed=5)
    replayed = capture_and_replay(ring, static, fresh)
    eager = ring(*fresh)
    assert len(replayed) == len(eager) == 5 * n
    for index, (got, expected) in enumerate(zip(replayed, eager)):
        if index < 2 * n:  # outs, lses
            assert torch.equal(got, expected), f"replayed forward output {index} differs from the eager run"
        else:
            torch.testing.assert_close(got, expected, msg=f"replayed gradient {index - 2 * n}")
    assert not torch.equal(replayed[0], ring(*sharded(seed=4))[0]), "the replay did not compute on the new inputs"


@requires_cuda_extension
@pytest.mark.parametrize("layout", LAYOUTS)
def test_world_of_one_through_the_nccl_driver(layout):
    """ring_forward_cuda/ring_backward_cuda with a one-step plan: no communicator, no group."""
    case = make_case(1, layout, True, heads=8, heads_kv=2, seqlen_local=300)
    head_dim, dtype = kernel_config()
    scale = head_dim ** -0.5
    q, k, v, dout = global_tensors(case, head_dim, dtype, "cuda", seed=3)
    full = full_attention(q, k, v, dout, case, scale)
    plan = build_plan(layout, 0, 1, case.seqlen_local, True)
    poison_cuda_allocator()
    out, lse = _ring_cuda.ring_forward_cuda(q, k, v, plan, None, scale)
    grads = _ring_cuda.ring_backward_cuda(dout, q, k, v, out, lse, plan, None, scale)
    assert_matches_full_attention(full, out, lse, grads, dtype)


@requires_cuda_extension
def test_bad_arguments_raise_before_anything_runs():
    from ring_attn_ext._extension import _C
    head_dim, dtype = kernel_config()
    n, seqlen_local = 2, 8
    plans = [build_plan("ring", rank, n, seqlen_local, True) for rank in range(n)]
    lists = [_ring_cuda._plan_lists(plan) for plan in plans]

    def shards(heads=4, seqlen=seqlen_local, dtype=dtype):
        return [torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=dtype) for _ in range(n)]

    q = shards()
    kv = [q[0], shards(seqlen=9)[1]]  # the blocks of a ring must all have one size
    with pytest.raises(ValueError, match=r"k_shards\[1\] must have shape"):
        _C.ring_fwd_loopback(q, kv, kv, lists, 1.0)
    with pytest.raises(ValueError, match=r"plans\[0\] must have one step per rank \(2\), got 1"):
        _C.ring_fwd_loopback(q, q, q, [lists[0][:1], lists[1]], 1.0)
    with pytest.raises(ValueError, match=r"plans\[1\]\[0\]\[0\]: query rows \[0, 9\) must lie inside"):
        _C.ring_fwd_loopback(q, q, q, [lists[0], [[(0, 9, 0, 8, None, 0)], []]], 1.0)
    with pytest.raises(TypeError, match=r"q_shards\[0\] must be float16 or bfloat16"):
        _C.ring_fwd_loopback(shards(dtype=torch.float32), q, q, lists, 1.0)
    with pytest.raises(ValueError, match=r"k_shards\[0\] and v_shards\[0\] \(3\) must divide"):
        _C.ring_fwd_loopback(q, shards(heads=3), shards(heads=3), lists, 1.0)
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
        _C.ring_fwd_loopback(q, q, q, lists, float("nan"))
    with pytest.raises(ValueError, match=r"lse_shards\[0\] must have shape"):
        _C.ring_bwd_loopback(q, q, q, q, q, [torch.zeros(1, 4, 9, device="cuda")] * n, lists, 1.0)
    with pytest.raises(ValueError, match="a plan of 2 steps is a ring of as many ranks and needs comm"):
        _C.ring_fwd(q[0], q[0], q[0], lists[0], None, 1.0)
    misaligned = torch.randn(1 * seqlen_local * 4 * head_dim + 1, device="cuda", dtype=dtype)[1:]
    with pytest.raises(ValueError, match="q must start at a 16-byte aligned address"):
        _C.ring_fwd(misaligned.view(1, seqlen_local, 4, head_dim), q[0], q[0], [[]], None, 1.0)


@contextlib.contextmanager
def _process_group(backend, rank, world_size, init_file):
    """This spawned process as `rank` of a process group; yields its GPU. NCCL: one GPU per rank;
    gloo: every rank on GPU 0."""
    device = torch.device("cuda", rank if backend == "nccl" else 0)
    if backend == "nccl":
        os.environ.update(MULTICAST_OFF)
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="file://" + init_file, rank=rank, world_size=world_size)
    try:
        yield device
    finally:
        _ring_cuda.destroy_communicators()  # spawned processes end without running atexit handlers
        dist.destroy_process_group()


# (b) NCCL: one process per GPU.

def _nccl_ring_worker(rank, world_size, init_file, head_dim, dtype):
    with _process_group("nccl", rank, world_size, init_file):
        seed = 10
        for layout in LAYOUTS:
            for causal in (False, True):
                seed += 1
                _check_nccl_case(rank, make_case(world_size, layout, causal, seqlen_local=130, heads=8, heads_kv=2),
                                 head_dim, dtype, seed)
            # A sliding window across the ranks' blocks (global positions), causal and not.
            for window_size in ((50, 0), (40, 70)):
                seed += 1
                _check_nccl_case(rank, make_case(world_size, layout, window_size == (50, 0), window_size,
                                                 seqlen_local=130, heads=8, heads_kv=2), head_dim, dtype, seed)
        _check_nccl_graph_replay(rank, world_size, head_dim, dtype)


def _nccl_usp_worker(rank, world_size, init_file, head_dim, dtype):
    """usp_attn_func with every rank in one Ulysses group: the exchanges over NCCL."""
    with _process_group("nccl", rank, world_size, init_file) as device:
        groups = ring_attn_ext.usp_groups(world_size)
        seed = 40
        for layout in LAYOUTS:
            for heads_kv in (2, 1):  # split over the group; replicated (world_size / heads_kv copies)
                seed += 1
                _check_usp_case(rank, device, make_case(
                    world_size, layout, True, seqlen_local=129, heads=8, heads_kv=heads_kv), head_dim, dtype, seed,
                    groups)


def _check_nccl_case(rank, case, head_dim, dtype, seed):
    device = torch.device("cuda", rank)
    scale = head_dim ** -0.5
    q, k, v, dout = global_tensors(case, head_dim, dtype, device, seed)
    full = full_attention(q, k, v, dout, case, scale)
    n = case.world_size
    q_s, k_s, v_s, dout_s = (shard(t, case.layout, rank, n) for t in (q, k, v, dout))
    options = dict(causal=case.causal, softmax_scale=scale, layout=case.layout, window_size=case.window_size)
    poison_cuda_allocator()
    out, lse = ring_attn_ext.forward(q_s, k_s, v_s, **options)
    grads = ring_attn_ext.backward(dout_s, q_s, k_s, v_s, out, lse, **options)

    def select(t, dim=1):
        return shard(t, case.layout, rank, n, dim=dim)

    what = f"rank {rank}, {case.layout}, causal={case.causal}, window_size={case.window_size}"
    try:
        assert_matches_full_attention(full, out, lse, grads, dtype, select)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from error
    outs, lses, *_ = loopback_ring(q, k, v, dout, case, scale)
    assert torch.equal(out, outs[rank]) and torch.equal(lse, lses[rank]), \
        f"{what}: the NCCL ring's forward differs from the loopback ring's"


def _check_usp_case(rank, device, case, head_dim, dtype, seed, groups):
    """usp_attn_func forward and backward on `device` against full attention on the unsharded tensors."""
    scale = head_dim ** -0.5
    q, k, v, dout = global_tensors(case, head_dim, dtype, device, seed)
    full = full_attention(q, k, v, dout, case, scale)
    degree = groups.ulysses_degree

    def select(t, dim=1):
        return shard(t, case.layout, rank, case.world_size, dim=dim, ulysses_degree=degree)

    leaves = [select(t).requires_grad_() for t in (q, k, v)]
    poison_cuda_allocator()
    out, lse, _ = ring_attn_ext.usp_attn_func(*leaves, softmax_scale=scale, causal=case.causal, return_attn_probs=True,
                                              groups=groups, layout=case.layout)
    out.backward(select(dout))
    try:
        assert_matches_full_attention(full, out.detach(), lse, tuple(t.grad for t in leaves), dtype, select,
                                      summed_dkv=case.heads_kv % degree != 0)
    except AssertionError as error:
        raise AssertionError(f"rank {rank}, usp {degree} x {case.world_size // degree}, {case.layout}, "
                             f"heads_kv {case.heads_kv}: {error}") from error


def _nccl_varlen_worker(rank, world_size, init_file, head_dim, dtype):
    with _process_group("nccl", rank, world_size, init_file) as device:
        _check_varlen_cases(rank, world_size, device, head_dim, dtype)


# Packed streams. llama3 (2 x 300 tokens): a one-token sequence, a sequence across the two chunks,
# and an equal split. ring / zigzag (lengths multiples of 4, each sequence split on its own): short
# and long sequences.
LLAMA3_STREAMS = ([0, 1, 100, 350, 351, 600], [0, 300, 600])
VARLEN_RING_STREAMS = ([0, 4, 260, 600, 604],)
VARLEN_OPTIONS = ((True, (-1, -1), 2, 1), (False, (-1, -1), 8, 8), (True, (64, 0), 1, 1), (False, (40, 40), 2, 2))


def _check_varlen_cases(rank, world_size, device, head_dim, dtype):
    """llama3_flash_attn_varlen_func, ring_flash_attn_varlen_func and zigzag_ring_flash_attn_varlen_func
    (causal, non-causal, windows, GQA, one and all k/v heads per gather)."""
    seed = 60
    for layout, streams in (("llama3", LLAMA3_STREAMS), ("ring", VARLEN_RING_STREAMS),
                            ("zigzag", VARLEN_RING_STREAMS)):
        for bounds in streams:
            for causal, window, heads_kv, stride in VARLEN_OPTIONS:
                seed += 1
                _check_varlen_case(rank, world_size, device, head_dim, dtype, seed, layout, bounds, causal, window,
                                   heads_kv, stride)


def _check_varlen_case(rank, world_size, device, head_dim, dtype, seed, layout, bounds, causal, window, heads_kv,
                       stride):
    """One packed function forward and backward on this rank's part of the stream (layout "llama3":
    its chunk; "ring" / "zigzag": its shards of every sequence) against dense attention over the
    whole packed stream, by FlashAttention's rule."""
    generator = torch.Generator(device=device).manual_seed(seed)
    total, heads = bounds[-1], 8

    def randn(count):
        return torch.randn(total, count, head_dim, device=device, dtype=dtype, generator=generator)

    q, k, v, dout = randn(heads), randn(heads_kv), randn(heads_kv), randn(heads)
    mask = varlen_mask(bounds, bounds, causal, window, device=device)

    ref_out, ref_lse, ref_grads = packed_attention_with_grads(q, k, v, dout, mask, torch.float64)
    same_out, _, same_grads = packed_attention_with_grads(q, k, v, dout, mask, dtype)
    options = dict(causal=causal, window_size=window, return_attn_probs=True)
    if layout == "llama3":
        chunk = total // world_size
        rows = slice(rank * chunk, (rank + 1) * chunk)
        leaves = [t[rows].clone().requires_grad_() for t in (q, k, v)]
        prepared = ring_attn_ext.llama3_flash_attn_prepare_cu_seqlens(
            torch.tensor(bounds, dtype=torch.int32, device=device), causal, rank, world_size)
        poison_cuda_allocator()
        out, lse, _ = ring_attn_ext.llama3_flash_attn_varlen_func(*leaves, *prepared[:4], stride, prepared[4],
                                                                  **options)
    else:
        rows = torch.cat([begin + positions(end - begin, layout, rank, world_size, device=device)
                          for begin, end in zip(bounds, bounds[1:])])
        leaves = [t[rows].clone().requires_grad_() for t in (q, k, v)]
        cu_local = torch.tensor(bounds, dtype=torch.int32, device=device) // world_size
        longest = max(end - begin for begin, end in zip(bounds, bounds[1:])) // world_size
        function = getattr(ring_attn_ext, f"{'zigzag_' if layout == 'zigzag' else ''}ring_flash_attn_varlen_func")
        poison_cuda_allocator()
        out, lse, _ = function(*leaves, cu_local, longest, heads_k_stride=stride, **options)
    out.backward(dout[rows])
    what = f"rank {rank}, {layout}, cu_seqlens {bounds}, causal={causal}, window {window}, heads_kv {heads_kv}"
    try:
        assert_flash_rule(out, ref_out[rows], same_out[rows], 2, "out")
        assert_lse_equal(lse, ref_lse[:, rows], atol=1e-3)
        for name, leaf, ref, same in zip(("dq", "dk", "dv"), leaves, ref_grads, same_grads):
            assert_flash_rule(leaf.grad, ref[rows], same[rows], 3, name, eps=GRADIENT_EPS)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from error


def _check_nccl_graph_replay(rank, world_size, head_dim, dtype):
    """The NCCL ring captured in a CUDA graph (NCCL send/recv are capturable) and replayed on new
    inputs gives what an eager run gives. The Python entry points' cross-rank check is left out:
    on an NCCL-only group it reads a record back to the host, which a capture cannot contain."""
    case = make_case(world_size, "zigzag", True, seqlen_local=130, heads=8, heads_kv=2)
    scale, device = head_dim ** -0.5, torch.device("cuda", rank)
    plan = build_plan(case.layout, rank, world_size, case.seqlen_local, True)

    def sharded(seed):
        return [[shard(t, case.layout, rank, world_size).contiguous()]
                for t in global_tensors(case, head_dim, dtype, device, seed)]

    def ring(q, k, v, dout):
        out, lse = _ring_cuda.ring_forward_cuda(q[0], k[0], v[0], plan, None, scale)
        return [out, lse, *_ring_cuda.ring_backward_cuda(dout[0], q[0], k[0], v[0], out, lse, plan, None, scale)]

    replayed = capture_and_replay(ring, sharded(seed=30), sharded(seed=31))
    eager = ring(*sharded(seed=31))
    assert torch.equal(replayed[0], eager[0]) and torch.equal(replayed[1], eager[1]), \
        f"rank {rank}: the replayed NCCL ring forward differs from the eager run"
    for name, got, expected in zip(("dq", "dk", "dv"), replayed[2:], eager[2:]):
        torch.testing.assert_close(got, expected, msg=f"rank {rank}: replayed {name}")


def _spawn_ranks(worker, world_size, head_dim, dtype, what, deadline_s=600):
    """Runs worker(rank, world_size, rendezvous file, head_dim, dtype) in world_size processes and
    fails with the first failing rank's exception, or when they are not done by the deadline."""
    with tempfile.TemporaryDirectory() as directory:
        context = mp.spawn(worker, args=(world_size, os.path.join(directory, "rendezvous"), head_dim, dtype),
                           nprocs=world_size, join=False)
        deadline = time.monotonic() + deadline_s
        try:
            while not context.join(timeout=5):  # raises the first failing rank's exception
                assert time.monotonic() < deadline, f"{what} did not finish within {deadline_s} s (hang?)"
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()


@requires_cuda_extension
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs (one process per GPU)")
@pytest.mark.parametrize("worker, what", [(_nccl_ring_worker, "the NCCL ring"),
                                          (_nccl_usp_worker, "Ulysses attention over NCCL"),
                                          (_nccl_varlen_worker, "packed-sequence attention over NCCL")],
                         ids=("ring", "usp", "varlen"))
def test_nccl_on_two_gpus_matches_full_attention(monkeypatch, worker, what):
    head_dim, dtype = kernel_config()
    for name, value in MULTICAST_OFF.items():
        monkeypatch.setenv(name, value)  # inherited by the spawned processes
    _spawn_ranks(worker, 2, head_dim, dtype, what)


# (c) Ulysses x ring on one GPU: two processes share it over gloo. With every rank in one Ulysses
# group the rings have one rank each and need no NCCL communicator (NCCL takes one rank per GPU),
# so usp_attn_func's CUDA path (the exchange of CUDA tensors, our kernels on the gathered heads,
# autograd back through both) runs where only one GPU is lent.

def _gloo_usp_worker(rank, world_size, init_file, head_dim, dtype):
    with _process_group("gloo", rank, world_size, init_file) as device:
        groups = ring_attn_ext.usp_groups(world_size)
        seed = 50
        for layout in LAYOUTS:
            for causal, heads_kv in ((True, 2), (False, 1), (True, 1)):
                seed += 1
                _check_usp_case(rank, device, make_case(
                    world_size, layout, causal, seqlen_local=129, heads=8, heads_kv=heads_kv), head_dim, dtype,
                    seed, groups)


@requires_cuda_extension
def test_usp_on_one_gpu_over_gloo_matches_full_attention():
    head_dim, dtype = kernel_config()
    _spawn_ranks(_gloo_usp_worker, 2, head_dim, dtype, "Ulysses attention over gloo")


def _gloo_varlen_worker(rank, world_size, init_file, head_dim, dtype):
    with _process_group("gloo", rank, world_size, init_file) as device:
        _check_varlen_cases(rank, world_size, device, head_dim, dtype)


@requires_cuda_extension
def test_varlen_on_one_gpu_over_gloo_matches_full_attention():
    head_dim, dtype = kernel_config()
    _spawn_ranks(_gloo_varlen_worker, 2, head_dim, dtype, "packed-sequence attention over gloo")
