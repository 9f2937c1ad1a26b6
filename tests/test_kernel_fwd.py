"""The forward kernel itself: ring_attn_ext._C.fwd and _C.fwd_merge against the PyTorch reference.

Every case draws fresh random inputs and checks
  - out by FlashAttention's rule (error against an fp32 reference at most 2x that of a same-dtype
    PyTorch computation, plus rounding), rows that see no key exactly 0;
  - lse directly against the fp32 reference's lse (tight tolerance; -inf rows exactly -inf, never
    NaN or +inf);
  - the merge epilogue: keys split into chunks, each merged into an fp32 running (out, lse) with the
    band shifted to chunk-local positions, in a shuffled order, equals attention over all keys; an
    accumulator without 8-byte aligned rows is refused.
Shapes cover seqlens 1, 17, 127, 1000, 4097, s_q < s_k and s_q > s_k, batch > 1, GQA ratios 1, 4
and 8, strided inputs (slices of packed tensors), and bands: full, bottom-right causal, a narrow
window, a wide one (masked and unmasked blocks in one walk), causal without the diagonal, an offset
band that skips key blocks on both sides, and an empty band.
"""
import math
import random

import pytest
import torch

from conftest import (CUDA_EXTENSION_SKIP_REASON, KERNEL_TEST_BANDS, assert_flash_rule, assert_lse_equal,
                      cuda_kernel_built, kernel_test_band, max_error, poison_cuda_allocator, skip_unless_built)
from ring_attn_ext._extension import _C
from ring_attn_ext.masks import band_for
from ring_attn_ext.reference import attention_reference, merge_partial

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA_EXTENSION_SKIP_REASON is not None, reason=CUDA_EXTENSION_SKIP_REASON or ""),
    pytest.mark.usefixtures("exact_fp32_matmul"),
]

HEAD_DIMS = (32, 64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
# The kernel and the fp32 reference see the same 16-bit inputs, so their scores differ only by fp32
# summation order; lse values are around log(seqlen_k) + O(1) <= ~12.
LSE_ATOL = 1e-4

# (batch, seqlen_q, seqlen_k, heads, heads_kv)
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 17, 17, 4, 1),       # GQA 4
    (1, 127, 1000, 8, 1),    # GQA 8, s_q < s_k, key tail
    (2, 1000, 127, 4, 4),    # s_q > s_k: causal leaves leading rows without keys
    (1, 4097, 4097, 2, 2),   # long, one past a multiple of every tile
]

def random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype):
    q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, device="cuda", dtype=dtype)
    return q, k, v


def references(q, k, v, scale, kmin, kmax):
    """(fp32 out, fp32 lse) from fp32 copies of the inputs, and the same-dtype out."""
    ref_out, ref_lse = attention_reference(q.float(), k.float(), v.float(), scale, kmin, kmax)
    same_out, _ = attention_reference(q, k, v, scale, kmin, kmax, upcast=False)
    return ref_out, ref_lse, same_out


def check_forward(q, k, v, scale, kmin, kmax, what):
    poison_cuda_allocator()
    out, lse = _C.fwd(q, k, v, scale, kmin, kmax)
    torch.cuda.synchronize()
    ref_out, ref_lse, same_out = references(q, k, v, scale, kmin, kmax)
    assert out.dtype == q.dtype and out.shape == q.shape, what
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]), what
    assert_flash_rule(out, ref_out, same_out, 2, f"{what}: out")
    assert_lse_equal(lse, ref_lse, LSE_ATOL, f"{what}: lse")
    empty_rows = torch.isneginf(ref_lse).transpose(1, 2)  # (b, s_q, h)
    assert (out[empty_rows] == 0).all(), f"{what}: rows without a visible key must be exactly 0"


# ------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}_hkv{}".format(*s))
@pytest.mark.parametrize("band_kind", KERNEL_TEST_BANDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_matches_reference(dtype, head_dim, band_kind, shape):
    skip_unless_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = shape
    q, k, v = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    kmin, kmax = kernel_test_band(band_kind, seqlen_q, seqlen_k)
    check_forward(q, k, v, head_dim ** -0.5, kmin, kmax, f"{band_kind} {shape}")


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_strided_inputs(dtype, head_dim, causal):
    """Slices of packed tensors: every stride differs from the contiguous one."""
    skip_unless_built(head_dim, dtype)
    batch, seqlen, heads = 2, 333, 4
    # q, k, v from a packed (b, s, 3, h, d) tensor.
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(dim=2)
    kmin, kmax = band_for(seqlen, seqlen, causal=causal)
    check_forward(q, k, v, 0.7 / math.sqrt(head_dim), kmin, kmax, "qkv-packed")

    # q from a (b, h, s, d) tensor (head stride > row stride); GQA k, v from a kv-packed cache with
    # spare capacity (batch stride > seqlen_k * row stride), starting at an offset.
    heads_kv, seqlen_k, capacity = 2, 517, 600
    q = torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    cache = torch.randn(batch, capacity, 2, heads_kv, head_dim, device="cuda", dtype=dtype)
    k, v = cache[:, 7:7 + seqlen_k].unbind(dim=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    kmin, kmax = band_for(seqlen, seqlen_k, causal=causal)
    check_forward(q, k, v, head_dim ** -0.5, kmin, kmax, "transposed q, kv cache slice")


# ------------------------------------------------------------------------------------------- merge

def shifted(offset, kmin, kmax):
    """The band over global key positions seen from a chunk of keys that starts at `offset`."""
    return (None if kmin is None else kmin - offset), (None if kmax is None else kmax - offset)


def chunk_bounds(seqlen_k, pieces):
    """Uneven split points of [0, seqlen_k) into `pieces` chunks (none of them tile-aligned)."""
    cuts = sorted({max(1, min(seqlen_k - 1, round(seqlen_k * f) + 3)) for f in (0.31, 0.64)[:pieces - 1]})
    edges = [0] + cuts + [seqlen_k]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("shape,pieces", [((2, 300, 700, 4, 2), 3), ((1, 1000, 1000, 8, 1), 2)],
                         ids=("b2_sq300_sk700_3chunks", "b1_s1000_gqa8_2chunks"))
@pytest.mark.parametrize("band_kind", ("full", "causal", "window", "causal_strict"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_merge_over_key_chunks_matches_full_attention(dtype, head_dim, band_kind, shape, pieces):
    skip_unless_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = shape
    q, k, v = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    scale = head_dim ** -0.5
    kmin, kmax = kernel_test_band(band_kind, seqlen_q, seqlen_k)
    out_accum = torch.zeros(batch, seqlen_q, heads, head_dim, device="cuda", dtype=torch.float32)
    lse_accum = torch.full((batch, heads, seqlen_q), float("-inf"), device="cuda")
    chunks = chunk_bounds(seqlen_k, pieces)
    random.Random(head_dim * 7 + pieces).shuffle(chunks)  # the merge must not depend on the order
    for start, stop in chunks:
        lo, hi = shifted(start, kmin, kmax)
        _C.fwd_merge(q, k[:, start:stop], v[:, start:stop], out_accum, lse_accum, scale, lo, hi)
    torch.cuda.synchronize()

    ref_out, ref_lse, same_out = references(q, k, v, scale, kmin, kmax)
    assert_flash_rule(out_accum, ref_out, same_out, 2, f"merged out ({chunks})")
    assert_lse_equal(lse_accum, ref_lse, LSE_ATOL, f"merged lse ({chunks})")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_merge_state_rules(dtype, head_dim):
    """A running lse of -inf takes the block's values without reading the running out (poisoned
    with NaN here); a row with no visible key in this call leaves its state bitwise untouched."""
    skip_unless_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = 2, 300, 130, 4, 2
    q, k, v = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    scale = head_dim ** -0.5
    kmin, kmax = band_for(seqlen_q, seqlen_k, causal=True)  # the first 170 rows see no key
    ref_out, ref_lse, same_out = references(q, k, v, scale, kmin, kmax)
    empty = torch.isneginf(ref_lse)  # (b, h, s_q)
    assert empty.any() and not empty.all()
    empty_bshd = empty.transpose(1, 2)  # (b, s_q, h)

    # Fresh state: out NaN (must not be read), lse -inf.
    out_accum = torch.full((batch, seqlen_q, heads, head_dim), float("nan"), device="cuda")
    lse_accum = torch.full((batch, heads, seqlen_q), float("-inf"), device="cuda")
    _C.fwd_merge(q, k, v, out_accum, lse_accum, scale, kmin, kmax)
    torch.cuda.synchronize()
    assert torch.isnan(out_accum[empty_bshd]).all(), "rows without keys must stay untouched"
    assert torch.isneginf(lse_accum[empty]).all()
    assert_flash_rule(out_accum[~empty_bshd], ref_out[~empty_bshd], same_out[~empty_bshd], 2, "fresh state: out")
    assert_lse_equal(lse_accum[~empty], ref_lse[~empty], LSE_ATOL, "fresh state: lse")

    # A finite running state: empty rows keep it bit for bit, others follow merge_partial.
    state_out = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda")
    state_lse = torch.randn(batch, heads, seqlen_q, device="cuda") * 2 + math.log(seqlen_k)
    out_accum, lse_accum = state_out.clone(), state_lse.clone()
    _C.fwd_merge(q, k, v, out_accum, lse_accum, scale, kmin, kmax)
    torch.cuda.synchronize()
    assert torch.equal(out_accum[empty_bshd], state_out[empty_bshd])
    assert torch.equal(lse_accum[empty], state_lse[empty])
    want_out, want_lse = merge_partial(state_out, state_lse, ref_out, ref_lse)
    same_merged, _ = merge_partial(state_out, state_lse, same_out.float(), ref_lse)
    assert_flash_rule(out_accum, want_out, same_merged, 2, "finite state: out")
    assert max_error(lse_accum, want_lse) <= LSE_ATOL, "finite state: lse"


@pytest.mark.parametrize("layout", ("misaligned_start", "odd_row_stride"))
def test_fwd_merge_rejects_unaligned_accumulator(layout):
    """The merge epilogue moves the fp32 running output two floats at a time: an accumulator whose
    rows do not start on 8-byte boundaries is refused with an error naming it."""
    head_dim = _C.supported_head_dims()[0]
    dtype = torch.bfloat16 if cuda_kernel_built(head_dim, torch.bfloat16, False) else torch.float16
    batch, seqlen, heads = 1, 40, 2
    q, k, v = random_inputs(batch, seqlen, seqlen, heads, heads, head_dim, dtype)
    lse_accum = torch.full((batch, heads, seqlen), float("-inf"), device="cuda")
    numel = batch * seqlen * heads * head_dim
    if layout == "misaligned_start":
        out_accum = torch.zeros(numel + 1, device="cuda")[1:].view(batch, seqlen, heads, head_dim)
    else:
        row = heads * head_dim + 1
        out_accum = torch.zeros(batch, seqlen, row, device="cuda")[..., :heads * head_dim]
        out_accum = out_accum.view(batch, seqlen, heads, head_dim)
    with pytest.raises(ValueError, match="out_accum"):
        _C.fwd_merge(q, k, v, out_accum, lse_accum, head_dim ** -0.5, None, None)


# --------------------------------------------------------------------------------------- emit mode
# _C.fwd_merge(..., out_final=...) merges like the plain merge but writes the merged output in the
# input dtype to out_final instead of back to out_accum (which it only reads, and only where the
# running lse is finite), and the merged lse to lse_accum. Every row gets out_final: a row that sees
# no key in this call gets its running output, or 0 where the running lse is -inf.

# (batch, seqlen_q, seqlen_k, heads, heads_kv): seqlen 1, odd sizes, GQA 4 and 8, s_q > s_k (causal
# then leaves the leading query blocks without any key, so whole tiles take the no-key path).
EMIT_SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 17, 17, 4, 1),
    (1, 127, 1000, 8, 1),
    (2, 1000, 127, 4, 4),
]
# fp16 and bf16 have 11 and 8 significant bits: one unit in the last place relative to the value.
DTYPE_ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def running_state(batch, seqlen_q, heads, head_dim, kind, seed):
    """(out_accum, lse_accum) of a running state. "fresh": every lse -inf and the output NaN, which
    the kernel must not read; "mixed": about a third of the rows fresh (lse -inf, output NaN), the
    others a finite state."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    out = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", generator=generator)
    lse = torch.randn(batch, heads, seqlen_q, device="cuda", generator=generator) * 2 + 3
    if kind == "fresh":
        fresh = torch.ones_like(lse, dtype=torch.bool)
    else:
        fresh = torch.rand(lse.shape, device="cuda", generator=generator) < 0.35
    lse[fresh] = float("-inf")
    out[fresh.transpose(1, 2)] = float("nan")
    return out, lse


def bits(t):
    """A float32 tensor's bit pattern, for bitwise comparisons that treat NaN like any value."""
    return t.contiguous().view(torch.int32)


def check_emit(q, k, v, scale, kmin, kmax, emit_accum, emit_lse, out_final, what):
    """Runs fwd_merge in emit mode on the running state (emit_accum, emit_lse) into out_final
    (poisoned by the caller), and in plain mode on a copy of the state, and checks out_final and the
    merged lse against the plain merge and the reference."""
    dtype = q.dtype
    state_out, state_lse = emit_accum.clone(), emit_lse.clone()
    merged_out, merged_lse = state_out.clone(), state_lse.clone()
    _C.fwd_merge(q, k, v, merged_out, merged_lse, scale, kmin, kmax)
    _C.fwd_merge(q, k, v, emit_accum, emit_lse, scale, kmin, kmax, out_final=out_final)
    torch.cuda.synchronize()

    assert torch.equal(bits(emit_accum), bits(state_out)), f"{what}: emit mode wrote the running output"
    assert_lse_equal(emit_lse, merged_lse, 1e-5, f"{what}: lse against the plain merge")
    assert not torch.isnan(out_final).any(), f"{what}: out_final has unwritten (NaN) elements"
    empty = torch.isneginf(merged_lse).transpose(1, 2)  # (b, s_q, h): no contribution at all
    assert (out_final[empty] == 0).all(), f"{what}: rows with no contribution must be exactly 0"
    # The same fp32 merge, rounded once: equal up to a rounding-boundary tie of one unit.
    torch.testing.assert_close(out_final[~empty].float(), merged_out[~empty].to(dtype).float(), atol=1e-6,
                               rtol=DTYPE_ULP[dtype], msg=lambda m: f"{what}: against the plain merge: {m}")

    # Rows this call gives no key keep their running output, rounded exactly as torch rounds it.
    ref_out, ref_lse, same_out = references(q, k, v, scale, kmin, kmax)
    untouched = torch.isneginf(ref_lse).transpose(1, 2) & ~empty
    assert torch.equal(out_final[untouched], state_out[untouched].to(dtype)), \
        f"{what}: rows without a key in this call must emit their running output"
    assert torch.equal(bits(emit_lse[untouched.transpose(1, 2)]), bits(state_lse[untouched.transpose(1, 2)]))

    # Against the reference: merge_partial of the state (fresh rows as "no contribution") and the
    # fp32 reference, with the same-dtype attention merged the same way as the baseline.
    state_zeroed = torch.where(torch.isneginf(state_lse).transpose(1, 2)[..., None], 0.0, state_out)
    want_out, want_lse = merge_partial(state_zeroed, state_lse, ref_out, ref_lse)
    same_merged, _ = merge_partial(state_zeroed, state_lse, same_out.float(), ref_lse)
    assert_flash_rule(out_final, want_out, same_merged, 2, f"{what}: out_final")
    assert_lse_equal(emit_lse, want_lse, LSE_ATOL, f"{what}: lse")


@pytest.mark.parametrize("state", ("fresh", "mixed"))
@pytest.mark.parametrize("shape", EMIT_SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}_hkv{}".format(*s))
@pytest.mark.parametrize("band_kind", KERNEL_TEST_BANDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_merge_emit(dtype, head_dim, band_kind, shape, state):
    skip_unless_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = shape
    q, k, v = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    kmin, kmax = kernel_test_band(band_kind, seqlen_q, seqlen_k)
    state_out, state_lse = running_state(batch, seqlen_q, heads, head_dim, state, seed=head_dim + seqlen_q)
    poison_cuda_allocator()
    out_final = torch.empty_like(q)
    check_emit(q, k, v, head_dim ** -0.5, kmin, kmax, state_out, state_lse, out_final, f"{band_kind} {shape} {state}")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_merge_emit_strided(dtype, head_dim):
    """out_final a (b, h, s, d) tensor seen as (b, s, h, d), out_accum a slice of a wider buffer:
    every element of the views is written, nothing around them."""
    skip_unless_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = 2, 333, 517, 4, 2
    q, k, v = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    kmin, kmax = band_for(seqlen_q, seqlen_k, window_size=(200, 0))
    state_out, state_lse = running_state(batch, seqlen_q, heads, head_dim, "mixed", seed=head_dim)
    wide = torch.full((batch, seqlen_q, heads + 1, head_dim), 7.0, device="cuda")
    accum_view = wide[:, :, 1:]
    accum_view.copy_(state_out)
    poison_cuda_allocator()
    storage = torch.empty(batch, heads, seqlen_q + 3, head_dim, device="cuda", dtype=dtype)
    storage[:, :, seqlen_q:] = 5.0
    out_final = storage[:, :, :seqlen_q].transpose(1, 2)
    assert not out_final.is_contiguous() and not accum_view.is_contiguous()
    check_emit(q, k, v, head_dim ** -0.5, kmin, kmax, accum_view, state_lse, out_final, "strided")
    assert (storage[:, :, seqlen_q:] == 5.0).all(), "wrote past out_final's rows"
    assert (wide[:, :, 0] == 7.0).all(), "wrote outside out_accum's view"


@pytest.mark.parametrize("seqlen_q", (1, 17, 1000))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_merge_emit_without_keys_finishes_the_state(dtype, head_dim, seqlen_q):
    """seqlen_k = 0: the call only turns the running state into the output: out_final =
    (lse == -inf ? 0 : out_accum rounded), running state untouched."""
    skip_unless_built(head_dim, dtype)
    batch, heads, heads_kv = 2, 8, 2
    q, k, v = random_inputs(batch, seqlen_q, 0, heads, heads_kv, head_dim, dtype)
    state_out, state_lse = running_state(batch, seqlen_q, heads, head_dim, "mixed", seed=seqlen_q)
    out_accum, lse_accum = state_out.clone(), state_lse.clone()
    poison_cuda_allocator()
    out_final = torch.empty_like(q)
    _C.fwd_merge(q, k, v, out_accum, lse_accum, head_dim ** -0.5, None, None, out_final=out_final)
    torch.cuda.synchronize()
    fresh = torch.isneginf(state_lse).transpose(1, 2)
    want = torch.where(fresh[..., None], 0.0, state_out).to(dtype)
    assert torch.equal(out_final, want)
    assert torch.equal(bits(out_accum), bits(state_out)) and torch.equal(bits(lse_accum), bits(state_lse))


def test_fwd_merge_emit_rejects_bad_out_final():
    head_dim = _C.supported_head_dims()[0]
    dtype = torch.bfloat16 if cuda_kernel_built(head_dim, torch.bfloat16, False) else torch.float16
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    batch, seqlen, heads = 1, 40, 2
    q, k, v = random_inputs(batch, seqlen, seqlen, heads, heads, head_dim, dtype)
    out_accum = torch.zeros(batch, seqlen, heads, head_dim, device="cuda")
    lse_accum = torch.full((batch, heads, seqlen), float("-inf"), device="cuda")
    misaligned = torch.empty(q.numel() + 1, device="cuda", dtype=dtype)[1:].view(q.shape)
    for bad, error, message in [(torch.empty_like(q, dtype=other), TypeError, "out_final must have the dtype of q"),
                                (q[:, 1:].clone(), ValueError, "out_final must have shape"),
                                (misaligned, ValueError, "out_final must start at a 16-byte aligned address")]:
        with pytest.raises(error, match=message):
            _C.fwd_merge(q, k, v, out_accum, lse_accum, head_dim ** -0.5, None, None, out_final=bad)
