"""The backward kernel itself: ring_attn_ext._C.bwd, _C.bwd_accumulate and _C.bwd_delta against
autograd through the PyTorch reference.

The kernel's inputs out and lse come from the fp32 reference (out rounded to the input dtype, as a
forward would return it), so these tests do not depend on the forward kernel; one test does run
_C.fwd first. Every case draws fresh random inputs and checks
  - dq, dk, dv by FlashAttention's rule for gradients: error against autograd through the fp32
    reference at most 3x that of autograd through a same-dtype PyTorch computation, plus rounding;
    rows that see no key get exactly 0 in dq, keys that no query sees exactly 0 in dk and dv;
  - bwd_accumulate ADDS into caller-owned fp32 accumulators: pre-filled random values stay bit for
    bit where nothing is added, and dk/dv (one owner per tile without GQA) are exactly prefill + the
    same call's result from zero;
  - accumulators whose column pairs are not 8-byte aligned get the same sums (scalar paths);
  - with dkv_overwrite (no GQA) dk/dv accumulators full of NaN get exactly what adding into zeros
    gives, unseen key blocks included, and nothing outside them; GQA refuses it;
  - splitting the keys into two bwd_accumulate calls (bands shifted to chunk-local positions, the
    GLOBAL lse and delta) gives the same gradients as one call over all keys;
  - delta = rowsum(dout * out) in fp32, for the compiled head dims and for odd ones (scalar tails,
    several passes per row); given a dq_accum, the same pass zero-fills it;
  - _C.bwd without GQA gets dk and dv written by the kernel in the input dtype and its dq accumulator
    zero-filled by the delta kernel: the poisoned allocator makes any element they miss show as NaN;
    empty sequences give zero gradients.
Shapes cover seqlens 1, 17, 127, 1000, 2049, s_q < s_k and s_q > s_k, batch > 1, GQA ratios 1, 4
and 8, shapes that select each of the banded kernels' CTA orders, strided inputs (slices of packed
tensors), and bands: full, bottom-right causal, a narrow window, a wide one (masked and unmasked
blocks in one walk), causal without the diagonal, an offset band that skips query blocks on both
sides, and an empty band.
"""
import functools
import math

import pytest
import torch

from conftest import (CUDA_EXTENSION_SKIP_REASON, KERNEL_TEST_BANDS, kernel_test_band, max_error,
                      poison_cuda_allocator)
from ring_attn_ext._extension import _C
from ring_attn_ext.masks import band_for
from ring_attn_ext.reference import attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA_EXTENSION_SKIP_REASON is not None, reason=CUDA_EXTENSION_SKIP_REASON or ""),
    pytest.mark.usefixtures("exact_fp32_matmul"),
]

HEAD_DIMS = (32, 64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)

# (batch, seqlen_q, seqlen_k, heads, heads_kv)
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 17, 17, 4, 1),       # GQA 4
    (1, 127, 1000, 8, 1),    # GQA 8, s_q < s_k, key tail
    (2, 1000, 127, 4, 4),    # s_q > s_k: causal leaves leading rows without keys
    (1, 2049, 2049, 2, 2),   # long, one past a multiple of every tile
    (1, 4097, 4097, 2, 1),   # longer, MQA
]

@functools.lru_cache(maxsize=None)
def backward_built(head_dim, dtype):
    """Whether this build holds the backward kernels for (head_dim, dtype): RING_ATTN_HEAD_DIMS,
    RING_ATTN_DTYPES and RING_ATTN_DISABLE_BACKWARD select them."""
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    return any(entry[:3] == ("bwd", head_dim, name) for entry in _C.compiled_kernels())


def skip_unless_backward_built(head_dim, dtype):
    if not backward_built(head_dim, dtype):
        pytest.skip(f"this build has no backward kernel for head_dim {head_dim} and {dtype} (supported head "
                    f"dims {_C.supported_head_dims()}; see RING_ATTN_HEAD_DIMS / RING_ATTN_DTYPES / "
                    "RING_ATTN_DISABLE_BACKWARD)")


def random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype):
    q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, device="cuda", dtype=dtype)
    dout = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=dtype)
    return q, k, v, dout


def autograd_gradients(q, k, v, dout, scale, kmin, kmax, upcast):
    """(out, lse, dq, dk, dv) of the reference through autograd, on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attention_reference(*leaves, scale, kmin, kmax, upcast=upcast)
    out.backward(dout.to(out.dtype))
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


# Absolute floor of the gradient rule. Where a query row sees a single key, dS = P (dP - delta)
# subtracts two fp32 sums that are equal in exact arithmetic, so the kernel's dq/dk there are fp32
# summation noise (~1e-6) while a same-dtype PyTorch computation can land on exactly 0.
GRAD_EPS = 1e-5


def assert_gradient_rule(actual, reference, same_dtype, name):
    """FlashAttention's rule for gradients: the error of `actual` against the fp32 `reference` is at
    most 3x that of a same-dtype PyTorch computation, plus twice the error of merely rounding the
    reference to actual's dtype, plus GRAD_EPS."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = max_error(actual, reference)
    baseline = max_error(same_dtype, reference)
    rounding = max_error(reference.to(actual.dtype), reference)
    bound = 3 * baseline + 2 * rounding + GRAD_EPS
    assert error <= bound, f"{name}: max error {error:.3g} > 3 x same-dtype error {baseline:.3g} + eps"


class Reference:
    """The fp32 reference (forward results and gradients) and the same-dtype gradients."""

    def __init__(self, q, k, v, dout, scale, kmin, kmax):
        fp32 = [t.float() for t in (q, k, v, dout)]
        out, self.lse, *self.grads = autograd_gradients(*fp32, scale, kmin, kmax, upcast=True)
        self.out = out.to(q.dtype)  # what a forward in q's dtype returns
        _, _, *self.same_dtype_grads = autograd_gradients(q, k, v, dout, scale, kmin, kmax, upcast=False)

    def check(self, grads, what):
        """Flash rule (factor 3) for (dq, dk, dv), plus exact zeros where nothing is visible."""
        for name, actual, want, same in zip(("dq", "dk", "dv"), grads, self.grads, self.same_dtype_grads):
            assert_gradient_rule(actual, want, same, f"{what}: {name}")
        empty_rows = torch.isneginf(self.lse).transpose(1, 2)  # (b, s_q, h)
        assert (grads[0][empty_rows] == 0).all(), f"{what}: dq rows that see no key must be exactly 0"
        unseen_keys = (self.grads[1] == 0).all(dim=-1) & (self.grads[2] == 0).all(dim=-1)  # (b, s_k, h_kv)
        assert (grads[1][unseen_keys] == 0).all() and (grads[2][unseen_keys] == 0).all(), \
            f"{what}: keys that no query sees must get exactly 0 in dk and dv"


# --------------------------------------------------------------------------------------------- bwd

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}_hkv{}".format(*s))
@pytest.mark.parametrize("band_kind", KERNEL_TEST_BANDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_matches_autograd(dtype, head_dim, band_kind, shape):
    check_bwd_against_autograd(dtype, head_dim, band_kind, shape)


def check_bwd_against_autograd(dtype, head_dim, band_kind, shape):
    """_C.bwd on fresh random inputs of `shape` against the reference, output memory poisoned."""
    skip_unless_backward_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = shape
    q, k, v, dout = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    kmin, kmax = kernel_test_band(band_kind, seqlen_q, seqlen_k)
    scale = head_dim ** -0.5
    ref = Reference(q, k, v, dout, scale, kmin, kmax)
    poison_cuda_allocator()
    grads = _C.bwd(dout, q, k, v, ref.out, ref.lse, scale, kmin, kmax)
    torch.cuda.synchronize()
    for grad, like in zip(grads, (q, k, v)):
        assert grad.dtype == like.dtype and grad.shape == like.shape
    ref.check(grads, f"{band_kind} {shape}")


# Banded kernels start their CTAs in one of three orders (csrc/flash/bwd_cta_order.h), chosen from
# the shape; on a GPU with 128 to 135 SMs (H100, H200) these shapes select, in turn: one head across
# the batch, one batch entry across the heads, the plain order (one pair; and batch and heads both
# above the SMs / 8 group limit).
CTA_ORDER_SHAPES = [
    (3, 300, 300, 2, 2),
    (1, 300, 300, 5, 5),
    (1, 600, 600, 1, 1),
    (17, 200, 200, 17, 17),
]


@pytest.mark.parametrize("shape", CTA_ORDER_SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}_hkv{}".format(*s))
@pytest.mark.parametrize("band_kind", ("causal", "window"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_cta_orders(dtype, head_dim, band_kind, shape):
    check_bwd_against_autograd(dtype, head_dim, band_kind, shape)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_strided_inputs(dtype, head_dim, causal):
    """Slices of packed tensors: every stride differs from the contiguous one."""
    skip_unless_backward_built(head_dim, dtype)
    batch, seqlen, heads = 2, 333, 4
    # q, k, v from a packed (b, s, 3, h, d) tensor; dout and out transposed from (b, h, s, d).
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(dim=2)
    dout = torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    kmin, kmax = band_for(seqlen, seqlen, causal=causal)
    scale = 0.7 / math.sqrt(head_dim)
    ref = Reference(q, k, v, dout, scale, kmin, kmax)
    out = ref.out.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (q.is_contiguous() or dout.is_contiguous() or out.is_contiguous())
    ref.check(_C.bwd(dout, q, k, v, out, ref.lse, scale, kmin, kmax), "qkv-packed")

    # GQA k, v from a kv-packed cache with spare capacity (batch stride > seqlen_k * row stride),
    # starting at an offset.
    heads_kv, seqlen_k, capacity = 2, 517, 600
    cache = torch.randn(batch, capacity, 2, heads_kv, head_dim, device="cuda", dtype=dtype)
    k, v = cache[:, 7:7 + seqlen_k].unbind(dim=2)
    kmin, kmax = band_for(seqlen, seqlen_k, causal=causal)
    ref = Reference(q, k, v, dout, scale, kmin, kmax)
    ref.check(_C.bwd(dout, q, k, v, ref.out, ref.lse, scale, kmin, kmax), "kv cache slice")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_after_kernel_forward(dtype, head_dim):
    """The whole kernel path: _C.fwd's out and lse feed _C.bwd."""
    skip_unless_backward_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = 2, 700, 555, 8, 2
    q, k, v, dout = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    kmin, kmax = band_for(seqlen_q, seqlen_k, causal=True)
    scale = head_dim ** -0.5
    try:
        out, lse = _C.fwd(q, k, v, scale, kmin, kmax)
    except ValueError as error:
        if "not supported by this build" in str(error):
            pytest.skip(f"this build has no forward kernel for head_dim {head_dim} and {dtype}")
        raise
    ref = Reference(q, k, v, dout, scale, kmin, kmax)
    ref.check(_C.bwd(dout, q, k, v, out, lse, scale, kmin, kmax), "after _C.fwd")


@pytest.mark.parametrize("empty", ("seqlen_q", "seqlen_k"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_empty_sequence_gives_zero_gradients(dtype, empty):
    head_dim = _C.supported_head_dims()[0]
    skip_unless_backward_built(head_dim, dtype)
    seqlen_q, seqlen_k = (0, 5) if empty == "seqlen_q" else (5, 0)
    q, k, v, dout = random_inputs(2, seqlen_q, seqlen_k, 4, 2, head_dim, dtype)
    out = torch.zeros_like(q)
    lse = torch.full((2, 4, seqlen_q), float("-inf"), device="cuda")
    poison_cuda_allocator()
    for grad, like in zip(_C.bwd(dout, q, k, v, out, lse, head_dim ** -0.5, None, None), (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype
        assert (grad == 0).all()


# ---------------------------------------------------------------------------------- bwd_accumulate

@pytest.mark.parametrize("heads_kv", (4, 1), ids=("mha", "gqa4"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_accumulate_adds_into_prefilled_accumulators(dtype, head_dim, heads_kv):
    skip_unless_backward_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads = 2, 700, 500, 4
    q, k, v, dout = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    # Keys 100..450 positions ahead of each query: queries from 400 on and keys below 100 get
    # nothing added.
    kmin, kmax = 100, 450
    scale = head_dim ** -0.5
    ref = Reference(q, k, v, dout, scale, kmin, kmax)
    delta = _C.bwd_delta(dout, ref.out)

    def accumulate(dq, dk, dv):
        _C.bwd_accumulate(dout, q, k, v, ref.lse, delta, dq, dk, dv, scale, kmin, kmax)
        torch.cuda.synchronize()
        return dq, dk, dv

    fresh = accumulate(*(torch.zeros(t.shape, device="cuda") for t in (q, k, v)))
    prefill = [torch.randn(t.shape, device="cuda") * 3 for t in (q, k, v)]
    added = accumulate(*(t.clone() for t in prefill))

    # The fp32 accumulators themselves follow the flash rule against the fp32 reference.
    ref.check(fresh, "accumulators from zero")
    for name, got, base, increment in zip(("dq", "dk", "dv"), added, prefill, fresh):
        untouched = (increment == 0).all(dim=-1)
        assert untouched.any() and not untouched.all(), f"{name}: the band must leave some rows untouched"
        assert torch.equal(got[untouched], base[untouched]), f"{name}: untouched rows must keep their values"
        if name != "dq" and heads_kv == heads:
            # One CTA owns each dk/dv tile: a single fp32 add onto the prefill.
            assert torch.equal(got, base + increment), f"{name}: must be exactly prefill + increment"
        else:
            # Atomic adds from several CTAs: fp32 rounding depends on their order.
            tolerance = 1e-6 * (base.abs().max().item() + increment.abs().max().item())
            assert max_error(got, base + increment) <= tolerance, f"{name}: not prefill + increment"


@pytest.mark.parametrize("heads_kv", (4, 1), ids=("mha", "gqa4"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_accumulate_into_unaligned_accumulators(dtype, head_dim, heads_kv):
    """Accumulators whose column pairs are not 8-byte aligned (views one float into a wider buffer)
    take the kernel's scalar paths; they must add the same values as aligned ones."""
    skip_unless_backward_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads = 2, 300, 260, 4
    q, k, v, dout = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    kmin, kmax = band_for(seqlen_q, seqlen_k, causal=True)
    scale = head_dim ** -0.5
    out, lse = attention_reference(q, k, v, scale, kmin, kmax)
    delta = _C.bwd_delta(dout, out)
    aligned = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
    _C.bwd_accumulate(dout, q, k, v, lse, delta, *aligned, scale, kmin, kmax)
    prefill = [torch.randn(t.shape, device="cuda") for t in (q, k, v)]
    unaligned = []
    for t in prefill:
        wide = torch.empty(*t.shape[:-1], head_dim + 2, device="cuda")
        view = wide[..., 1:1 + head_dim]
        view.copy_(t)
        unaligned.append(view)
    _C.bwd_accumulate(dout, q, k, v, lse, delta, *unaligned, scale, kmin, kmax)
    torch.cuda.synchronize()
    for name, got, base, want in zip(("dq", "dk", "dv"), unaligned, prefill, aligned):
        tolerance = 1e-6 * (base.abs().max().item() + want.abs().max().item())
        assert max_error(got, base + want) <= tolerance, f"{name}: unaligned accumulator differs"


@pytest.mark.parametrize("layout", ("aligned", "unaligned"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_accumulate_overwrite_writes_dk_dv(dtype, head_dim, layout):
    """dkv_overwrite (no GQA): dk/dv accumulators holding NaN get exactly what adding into zeros gives,
    keys that no query sees included (whole key blocks of them: the kernel's early exit), and not one
    element outside the views; dq is still added to."""
    skip_unless_backward_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads = 2, 300, 1000, 4
    q, k, v, dout = random_inputs(batch, seqlen_q, seqlen_k, heads, heads, head_dim, dtype)
    kmin, kmax = 400, None  # keys 0..399 are seen by no query: several whole key blocks
    scale = head_dim ** -0.5
    out, lse = attention_reference(q, k, v, scale, kmin, kmax)
    delta = _C.bwd_delta(dout, out)
    fresh = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
    _C.bwd_accumulate(dout, q, k, v, lse, delta, *fresh, scale, kmin, kmax)

    pad = 0 if layout == "aligned" else 2  # unaligned: views one float into rows of head_dim + 2
    wide = [torch.full((*t.shape[:-1], head_dim + pad), float("nan"), device="cuda") for t in (k, v)]
    dk, dv = (w[..., pad // 2:pad // 2 + head_dim] for w in wide)
    dq_prefill = torch.randn(q.shape, device="cuda")
    dq = dq_prefill.clone()
    _C.bwd_accumulate(dout, q, k, v, lse, delta, dq, dk, dv, scale, kmin, kmax, dkv_overwrite=True)
    torch.cuda.synchronize()
    assert (fresh[1][:, :kmin] == 0).all() and (fresh[1][:, kmin:] != 0).any()
    for name, got, want in (("dk", dk, fresh[1]), ("dv", dv, fresh[2])):
        assert torch.equal(got, want), f"{name}: overwritten accumulator differs from adding into zeros"
    if pad:
        for name, w in zip(("dk", "dv"), wide):
            assert w[..., 0].isnan().all() and w[..., -1].isnan().all(), f"{name}: wrote outside the view"
    tolerance = 1e-6 * (dq_prefill.abs().max().item() + fresh[0].abs().max().item())
    assert max_error(dq, dq_prefill + fresh[0]) <= tolerance, "dq must still be added to"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_accumulate_overwrite_rules(dtype):
    """dkv_overwrite is refused under GQA (several query heads add into one kv head), and with no
    query rows it leaves zeros."""
    head_dim = _C.supported_head_dims()[0]
    skip_unless_backward_built(head_dim, dtype)
    q, k, v, dout = random_inputs(1, 64, 64, 4, 2, head_dim, dtype)
    lse = torch.zeros(1, 4, 64, device="cuda")
    accums = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"dkv_overwrite needs heads == heads_kv.*heads 4 and heads_kv 2"):
        _C.bwd_accumulate(dout, q, k, v, lse, lse.clone(), *accums, 1.0, None, None, dkv_overwrite=True)

    q, k, v, dout = random_inputs(1, 0, 64, 2, 2, head_dim, dtype)
    empty = torch.zeros(1, 2, 0, device="cuda")
    dq = torch.zeros(q.shape, device="cuda")
    dk, dv = (torch.full(t.shape, float("nan"), device="cuda") for t in (k, v))
    _C.bwd_accumulate(dout, q, k, v, empty, empty.clone(), dq, dk, dv, 1.0, None, None, dkv_overwrite=True)
    assert (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("band_kind", ("full", "causal", "window", "causal_strict"))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_accumulate_over_key_halves_matches_one_call(dtype, head_dim, band_kind):
    """What a ring step does: each call sees a chunk of the keys, with the band shifted to the
    chunk's positions and the GLOBAL lse and delta; dq accumulates across calls."""
    skip_unless_backward_built(head_dim, dtype)
    batch, seqlen_q, seqlen_k, heads, heads_kv = 2, 1000, 1000, 8, 2
    q, k, v, dout = random_inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype)
    kmin, kmax = kernel_test_band(band_kind, seqlen_q, seqlen_k)
    scale = head_dim ** -0.5
    out, lse = attention_reference(q, k, v, scale, kmin, kmax)
    delta = _C.bwd_delta(dout, out)

    def zeros():
        return [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]

    whole = zeros()
    _C.bwd_accumulate(dout, q, k, v, lse, delta, *whole, scale, kmin, kmax)
    split = zeros()
    middle = 437  # not a multiple of any tile
    for start, stop in ((middle, seqlen_k), (0, middle)):
        lo = None if kmin is None else kmin - start
        hi = None if kmax is None else kmax - start
        _C.bwd_accumulate(dout, q, k[:, start:stop], v[:, start:stop], lse, delta, split[0],
                          split[1][:, start:stop], split[2][:, start:stop], scale, lo, hi)
    torch.cuda.synchronize()
    # The one call itself against the reference (else a call that adds nothing would pass below).
    Reference(q, k, v, dout, scale, kmin, kmax).check(whole, f"{band_kind}, one call")
    for name, got, want in zip(("dq", "dk", "dv"), split, whole):
        assert torch.isfinite(got).all(), name
        tolerance = 1e-5 * want.abs().max().item()
        assert max_error(got, want) <= tolerance, f"{name}: split keys differ from one call"


# --------------------------------------------------------------------------------------- bwd_delta

@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_delta_is_rowsum_of_dout_times_out(dtype, head_dim):
    batch, seqlen, heads = 3, 1001, 4
    out = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
    dout = torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    poison_cuda_allocator()
    delta = _C.bwd_delta(dout, out)
    torch.cuda.synchronize()
    want = (dout.double() * out.double()).sum(dim=-1).transpose(1, 2)
    assert delta.dtype == torch.float32 and delta.shape == (batch, heads, seqlen)
    assert torch.isfinite(delta).all()
    assert max_error(delta, want) <= 1e-5 * math.sqrt(head_dim)


@pytest.mark.parametrize("layout", ("aligned", "unaligned"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_delta_zero_fills_dq_accum(dtype, layout):
    """With dq_accum the delta pass also zero-fills it (16-byte stores where rows are aligned,
    scalar ones where not), and touches nothing outside the view; delta is unchanged."""
    batch, seqlen, heads, head_dim = 2, 333, 4, 128
    out = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
    dout = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
    pad = 0 if layout == "aligned" else 2
    wide = torch.full((batch, seqlen, heads, head_dim + pad), float("nan"), device="cuda")
    dq_accum = wide[..., pad // 2:pad // 2 + head_dim]
    delta = _C.bwd_delta(dout, out, dq_accum)
    torch.cuda.synchronize()
    assert (dq_accum == 0).all(), "dq_accum must be zero-filled"
    if pad:
        assert wide[..., 0].isnan().all() and wide[..., -1].isnan().all(), "wrote outside the view"
    assert torch.equal(delta, _C.bwd_delta(dout, out))
    with pytest.raises(ValueError, match="dq_accum must have shape"):
        _C.bwd_delta(dout, out, dq_accum[:, 1:])


@pytest.mark.parametrize("head_dim", (8, 20, 40, 520))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_delta_odd_head_dims(dtype, head_dim):
    """Head dims the attention kernels do not compile: one 16-byte chunk per row, a tail that is not
    a whole chunk (20, read from a padded slice so rows stay 16-byte aligned), idle lanes (40) and
    rows longer than one pass of the lanes (520)."""
    batch, seqlen, heads = 2, 77, 3
    padded = (head_dim + 7) // 8 * 8
    out = torch.randn(batch, seqlen, heads, padded, device="cuda", dtype=dtype)[..., :head_dim]
    dout = torch.randn(batch, seqlen, heads, padded, device="cuda", dtype=dtype)[..., :head_dim]
    delta = _C.bwd_delta(dout, out)
    torch.cuda.synchronize()
    want = (dout.double() * out.double()).sum(dim=-1).transpose(1, 2)
    assert delta.shape == (batch, heads, seqlen) and torch.isfinite(delta).all()
    assert max_error(delta, want) <= 1e-5 * math.sqrt(head_dim)
