"""flash_attn_func, flash_attn_kvpacked_func and flash_attn_qkvpacked_func.

CPU section: the reference-backed path against the naive float64 oracle and gradcheck, packed
layouts against unpacked ones, the return_attn_probs form. CUDA section (skipped without a GPU and
the compiled extension): the kernel-backed path against the reference by FlashAttention's rule,
and against torch SDPA and flash_attn when available.
"""
import pytest
import torch

from conftest import (GRADIENT_EPS, assert_flash_rule, assert_lse_equal, cuda_kernel_built, max_error, naive_attention,
                      poison_cuda_allocator, requires_cuda_extension, skip_unless_built)
from ring_attn_ext import checks, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from ring_attn_ext.masks import band_for
from ring_attn_ext.reference import attention_reference


def random_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype=torch.float64, device="cpu"):
    shapes = [(batch, seqlen_q, heads, head_dim)] + [(batch, seqlen_k, heads_kv, head_dim)] * 2
    return [torch.randn(shape, dtype=dtype, device=device) for shape in shapes]


def leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads_of(fn, inputs, dout):
    """out and the gradients of `inputs` (fresh leaves) for the vector-Jacobian product with dout."""
    inputs = leaves(inputs)
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [t.grad for t in inputs]


# ----------------------------------------------------------------------------------------------- CPU

# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, window_size)
CPU_CASES = [
    (2, 6, 6, 4, 4, 8, False, (-1, -1)),
    (1, 1, 1, 2, 1, 4, True, (-1, -1)),
    (2, 9, 5, 8, 2, 8, True, (-1, -1)),  # s_q > s_k: rows that see no key
    (1, 4, 11, 8, 1, 16, True, (-1, -1)),  # s_q < s_k, GQA ratio 8
    (1, 10, 10, 4, 1, 8, False, (3, 2)),  # window, GQA ratio 4
    (2, 7, 12, 2, 2, 8, True, (4, -1)),
]


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,heads,heads_kv,head_dim,causal,window_size", CPU_CASES)
def test_cpu_forward_matches_naive(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, window_size):
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)
    out, lse, probs = flash_attn_func(q, k, v, causal=causal, window_size=window_size, return_attn_probs=True)
    out_naive, lse_naive = naive_attention(q, k, v, None, causal, window_size)
    assert probs is None
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, out_naive, rtol=0, atol=1e-12)
    assert_lse_equal(lse, lse_naive.float(), atol=1e-5)


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,heads,heads_kv,head_dim,causal,window_size", [
    (2, 3, 3, 2, 2, 4, False, (-1, -1)),
    (1, 5, 3, 2, 1, 4, True, (-1, -1)),  # rows that see no key
    (1, 3, 6, 4, 1, 4, True, (-1, -1)),  # GQA ratio 4
    (1, 5, 5, 2, 2, 4, False, (1, 1)),
])
def test_cpu_backward_matches_gradcheck(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal,
                                        window_size):
    """The Function's own backward (recomputation through the reference) against finite differences."""
    q, k, v = leaves(random_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim))
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.6, causal=causal, window_size=window_size),
        (q, k, v))


def test_cpu_gradients_equal_autograd_of_reference():
    q, k, v = random_qkv(2, 33, 21, 8, 2, 16, dtype=torch.float32)
    dout = torch.randn_like(q)
    band = band_for(33, 21, causal=True, window_size=(7, -1))
    out, grads = grads_of(lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(7, -1)), (q, k, v),
                          dout)
    out_ref, grads_ref = grads_of(lambda q, k, v: attention_reference(q, k, v, None, *band)[0], (q, k, v), dout)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_16_bit_inputs_follow_flash_rule(dtype):
    """16-bit CPU inputs are computed in float32: at least as accurate as same-dtype arithmetic."""
    q, k, v = random_qkv(2, 40, 33, 4, 2, 32, dtype=dtype)
    dout = torch.randn_like(q)
    band = band_for(40, 33, causal=True)
    out, grads = grads_of(lambda q, k, v: flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    out_ref, grads_ref = grads_of(lambda q, k, v: attention_reference(q, k, v, None, *band)[0],
                                  [t.double() for t in (q, k, v)], dout.double())
    out_pt, grads_pt = grads_of(lambda q, k, v: attention_reference(q, k, v, None, *band, upcast=False)[0],
                                (q, k, v), dout)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_flash_rule(out, out_ref, out_pt, 2, "out")
    for name, grad, grad_ref, grad_pt in zip(("dq", "dk", "dv"), grads, grads_ref, grads_pt):
        assert_flash_rule(grad, grad_ref, grad_pt, 3, name, eps=GRADIENT_EPS)


def test_cpu_kvpacked_matches_unpacked():
    q, k, v = random_qkv(2, 13, 9, 8, 2, 8)
    dout = torch.randn_like(q)
    kv = torch.stack((k, v), dim=2)
    out, (dq, dkv) = grads_of(lambda q, kv: flash_attn_kvpacked_func(q, kv, causal=True), (q, kv), dout)
    out_ref, (dq_ref, dk_ref, dv_ref) = grads_of(lambda q, k, v: flash_attn_func(q, k, v, causal=True), (q, k, v),
                                                 dout)
    assert dkv.shape == kv.shape
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(dq, dq_ref, rtol=0, atol=0)
    torch.testing.assert_close(dkv, torch.stack((dk_ref, dv_ref), dim=2), rtol=0, atol=0)


def test_cpu_qkvpacked_matches_unpacked():
    qkv = torch.randn(2, 11, 3, 4, 8, dtype=torch.float64)
    dout = torch.randn(2, 11, 4, 8, dtype=torch.float64)
    out, (dqkv,) = grads_of(lambda qkv: flash_attn_qkvpacked_func(qkv, window_size=(2, 2)), (qkv,), dout)
    out_ref, grads_ref = grads_of(lambda q, k, v: flash_attn_func(q, k, v, window_size=(2, 2)), qkv.unbind(2), dout)
    assert dqkv.shape == qkv.shape
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(dqkv, torch.stack(grads_ref, dim=2), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["func", "kvpacked", "qkvpacked"])
def test_return_attn_probs_form(variant):
    q, k, v = random_qkv(2, 7, 7, 4, 4, 8, dtype=torch.float32)
    q.requires_grad_()
    calls = {
        "func": lambda **kw: flash_attn_func(q, k, v, causal=True, **kw),
        "kvpacked": lambda **kw: flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2), causal=True, **kw),
        "qkvpacked": lambda **kw: flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2), causal=True, **kw),
    }
    out_only = calls[variant]()
    result = calls[variant](return_attn_probs=True)
    assert isinstance(out_only, torch.Tensor)
    assert isinstance(result, tuple) and len(result) == 3
    out, lse, probs = result
    assert probs is None
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32 and not lse.requires_grad
    assert out.requires_grad
    torch.testing.assert_close(out, out_only, rtol=0, atol=0)
    assert_lse_equal(lse, naive_attention(q, k, v, causal=True)[1].float(), atol=1e-5)


def test_cpu_strided_inputs_give_the_same_result():
    """Transposed, sliced and expanded views give the same values and gradients as contiguous copies."""
    bases = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
             for shape in ((2, 8, 12, 4), (2, 3, 9, 1), (2, 9, 2, 6))]
    q = bases[0].transpose(1, 2)[..., :3]  # (2, 12, 8, 3)
    k = bases[1].permute(0, 2, 3, 1).expand(2, 9, 2, 3)  # head stride 0
    v = bases[2][..., ::2]  # last dim not contiguous
    dout = torch.randn(12, 2, 8, 3, dtype=torch.float64).transpose(0, 1)
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    out = flash_attn_func(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_ref, grads_ref = grads_of(lambda q, k, v: flash_attn_func(q, k, v, causal=True),
                                  [t.contiguous() for t in (q, k, v)], dout.contiguous())
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-14)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-14)


def test_cpu_deterministic_flag_and_default_scale():
    q, k, v = random_qkv(1, 5, 5, 2, 2, 16)
    out = flash_attn_func(q, k, v, deterministic=True)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, softmax_scale=0.25), rtol=0, atol=0)
    torch.testing.assert_close(out, naive_attention(q, k, v)[0], rtol=0, atol=1e-12)


def test_cpu_output_requires_grad_only_with_grad_inputs():
    q, k, v = random_qkv(1, 5, 5, 2, 2, 8)
    assert not flash_attn_func(q, k, v).requires_grad
    v.requires_grad_()
    assert flash_attn_func(q, k, v).requires_grad


class ReferenceExtension:
    """Stands in for ring_attn_ext._C on CPU to test the kernel path's plumbing without a GPU: the
    reference behind _C.fwd / _C.bwd's signatures, asserting the kernels' input contract (16-byte
    compatible strides, one dtype) and recording the mask bands and scales it is given."""

    def __init__(self):
        self.calls = []

    def supported_head_dims(self):
        return [8]

    def compiled_kernels(self):
        return [(direction, 8, dtype, masked) for direction in ("fwd", "bwd") for dtype in ("float16", "bfloat16")
                for masked in (False, True)]

    def _check(self, *tensors):
        assert all(checks.is_kernel_compatible(t) and t.dtype == tensors[0].dtype for t in tensors)

    def fwd(self, q, k, v, softmax_scale, key_offset_min, key_offset_max):
        self._check(q, k, v)
        self.calls.append(("fwd", softmax_scale, key_offset_min, key_offset_max))
        return attention_reference(q, k, v, softmax_scale, key_offset_min, key_offset_max)

    def bwd(self, dout, q, k, v, out, lse, softmax_scale, key_offset_min, key_offset_max):
        self._check(dout, q, k, v, out)
        self.calls.append(("bwd", softmax_scale, key_offset_min, key_offset_max))
        with torch.enable_grad():  # autograd's backward runs with grad mode off
            _, grads = grads_of(
                lambda q, k, v: attention_reference(q, k, v, softmax_scale, key_offset_min, key_offset_max)[0],
                (q, k, v), dout)
        return grads


@pytest.mark.parametrize("variant", ["func", "kvpacked", "qkvpacked"])
def test_kernel_path_plumbing(monkeypatch, variant):
    """flash_attn_* hand the extension kernel-compatible tensors, the band and the scale, and return
    its results (gradients packed like the inputs), identical to the reference path."""
    seqlen_k, heads_kv = (9, 4) if variant == "qkvpacked" else (6, 2)
    q, k, v = random_qkv(2, 9, seqlen_k, 4, heads_kv, 8, dtype=torch.float32)
    if variant == "func":
        fn, packed = flash_attn_func, (q, k, v)
    elif variant == "kvpacked":
        fn, packed = flash_attn_kvpacked_func, (q, torch.stack((k, v), dim=2))
    else:
        fn, packed = flash_attn_qkvpacked_func, (torch.stack((q, k, v), dim=2),)
    # Inputs and dout whose last dimension is not contiguous: the kernels cannot read them in place.
    inputs = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in packed]
    dout = torch.randn(2, 9, 8, 4).transpose(-1, -2)
    assert not any(checks.is_kernel_compatible(t) for t in (*inputs, dout))
    kwargs = dict(softmax_scale=0.3, causal=True, window_size=(2, -1))

    ext = ReferenceExtension()
    monkeypatch.setattr(checks, "check_device_support", lambda shape, device, what, dtype, backward: ext)
    out, grads = grads_of(lambda *t: fn(*t, **kwargs), inputs, dout)
    band = band_for(9, seqlen_k, True, (2, -1))
    assert ext.calls == [("fwd", 0.3, *band), ("bwd", 0.3, *band)]
    monkeypatch.undo()
    out_ref, grads_ref = grads_of(lambda *t: fn(*t, **kwargs), inputs, dout)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for grad, grad_ref, packed_input in zip(grads, grads_ref, packed):
        assert grad.shape == packed_input.shape
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- CUDA

# (batch, seqlen_q, seqlen_k, heads, heads_kv, causal, window_size)
CUDA_CASES = [
    (1, 1, 1, 4, 4, False, (-1, -1)),
    (2, 17, 17, 4, 1, True, (-1, -1)),
    (1, 127, 1000, 8, 2, True, (-1, -1)),
    (2, 1000, 127, 8, 8, True, (-1, -1)),  # rows that see no key
    (3, 257, 513, 4, 4, False, (-1, -1)),
    (2, 1000, 1000, 8, 1, False, (128, 0)),
    (1, 300, 300, 8, 4, False, (17, 33)),
    (1, 4097, 4097, 4, 1, True, (-1, -1)),
]


def cuda_check_against_reference(q, k, v, causal, window_size, softmax_scale=None):
    """Runs flash_attn_func forward and backward on CUDA and asserts FlashAttention's rule against
    the fp32 reference (factor 2 for out, 3 for gradients), and lse against the fp32 reference."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    band = band_for(seqlen_q, seqlen_k, causal, window_size)
    dout = torch.randn_like(q)
    poison_cuda_allocator()
    inputs = leaves((q, k, v))
    out, lse, _ = flash_attn_func(*inputs, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                  return_attn_probs=True)
    out.backward(dout)
    grads = [t.grad for t in inputs]
    out_ref, grads_ref = grads_of(lambda q, k, v: attention_reference(q, k, v, softmax_scale, *band)[0],
                                  [t.float() for t in (q, k, v)], dout.float())
    _, lse_ref = attention_reference(q, k, v, softmax_scale, *band)
    out_pt, grads_pt = grads_of(lambda q, k, v: attention_reference(q, k, v, softmax_scale, *band, upcast=False)[0],
                                (q, k, v), dout)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_flash_rule(out.detach(), out_ref, out_pt, 2, "out")
    assert_lse_equal(lse, lse_ref, atol=2e-4)
    for name, grad, grad_ref, grad_pt in zip(("dq", "dk", "dv"), grads, grads_ref, grads_pt):
        assert grad.dtype == q.dtype
        assert_flash_rule(grad, grad_ref, grad_pt, 3, name, eps=GRADIENT_EPS)


@requires_cuda_extension
class TestCUDA:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("head_dim", [64, 128])
    @pytest.mark.parametrize("batch,seqlen_q,seqlen_k,heads,heads_kv,causal,window_size", CUDA_CASES)
    def test_matches_reference(self, dtype, head_dim, batch, seqlen_q, seqlen_k, heads, heads_kv, causal,
                               window_size):
        skip_unless_built(head_dim, dtype, backward=True)
        q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype, "cuda")
        cuda_check_against_reference(q, k, v, causal, window_size)

    def test_every_compiled_head_dim(self):
        from ring_attn_ext._extension import _C
        built = [(head_dim, dtype) for head_dim in _C.supported_head_dims()
                 for dtype in (torch.bfloat16, torch.float16) if cuda_kernel_built(head_dim, dtype, True)]
        if not built:
            pytest.skip("this build has no backward kernels")
        for head_dim, dtype in built:
            q, k, v = random_qkv(2, 77, 130, 4, 2, head_dim, dtype, "cuda")
            cuda_check_against_reference(q, k, v, causal=True, window_size=(-1, -1), softmax_scale=0.1)

    def test_packed_variants_match_unpacked(self):
        skip_unless_built(128, torch.bfloat16, backward=True)
        q, k, v = random_qkv(2, 129, 129, 8, 8, 128, torch.bfloat16, "cuda")
        dout = torch.randn_like(q)
        out, grads = grads_of(lambda q, k, v: flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
        out_kv, (dq_kv, dkv) = grads_of(lambda q, kv: flash_attn_kvpacked_func(q, kv, causal=True),
                                        (q, torch.stack((k, v), dim=2)), dout)
        out_qkv, (dqkv,) = grads_of(lambda qkv: flash_attn_qkvpacked_func(qkv, causal=True),
                                    (torch.stack((q, k, v), dim=2),), dout)
        # The forward is deterministic; dq may differ in its last bit through atomic accumulation order.
        torch.testing.assert_close(out_kv, out, rtol=0, atol=0)
        torch.testing.assert_close(out_qkv, out, rtol=0, atol=0)
        torch.testing.assert_close(dkv, torch.stack(grads[1:], dim=2))
        torch.testing.assert_close(dq_kv, grads[0])
        torch.testing.assert_close(dqkv, torch.stack(grads, dim=2))

    def test_inputs_the_kernels_cannot_read_in_place_are_copied(self):
        skip_unless_built(64, torch.bfloat16)
        base = torch.randn(2, 100, 4, 64, dtype=torch.bfloat16, device="cuda")
        flat = torch.randn(2 * 100 * 4 * 64 + 1, dtype=torch.bfloat16, device="cuda")
        strided = {
            "last dim not contiguous": base.transpose(-1, -2).contiguous().transpose(-1, -2),
            "row stride not a 16-byte multiple": torch.randn(2, 100, 4, 67, dtype=torch.bfloat16,
                                                             device="cuda")[..., :64],
            "misaligned start": flat[1:].view(2, 100, 4, 64),
        }
        for what, q in strided.items():
            out, lse, _ = flash_attn_func(q, base, base, causal=True, return_attn_probs=True)
            out_ref, lse_ref, _ = flash_attn_func(q.contiguous(), base, base, causal=True, return_attn_probs=True)
            assert torch.equal(out, out_ref), what
            assert torch.equal(lse, lse_ref), what

    def test_empty_key_sequence_gives_zero_and_minus_inf(self):
        skip_unless_built(64, torch.bfloat16)
        q, k, v = random_qkv(2, 9, 0, 4, 4, 64, torch.bfloat16, "cuda")
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
        assert (out == 0).all() and torch.isneginf(lse).all()

    def test_rejects_float32_and_uncompiled_head_dim(self):
        from ring_attn_ext._extension import _C
        q = torch.randn(1, 4, 2, 64, device="cuda")
        with pytest.raises(TypeError, match="q must be float16 or bfloat16 on CUDA"):
            flash_attn_func(q, q, q)
        missing = next(d for d in (8, 16, 24, 40, 48, 72, 80) if d not in _C.supported_head_dims())
        q = torch.randn(1, 4, 2, missing, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=f"head_dim {missing} is not supported on CUDA"):
            flash_attn_func(q, q, q)

    @pytest.mark.parametrize("causal", [False, True])
    @pytest.mark.parametrize("heads_kv", [8, 2])
    def test_no_less_accurate_than_torch_sdpa(self, causal, heads_kv):
        skip_unless_built(128, torch.bfloat16, backward=True)
        seqlen, scale = 1024, 128 ** -0.5
        q, k, v = random_qkv(2, seqlen, seqlen, 8, heads_kv, 128, torch.bfloat16, "cuda")
        dout = torch.randn_like(q)
        band = band_for(seqlen, seqlen, causal)

        def sdpa(q, k, v):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale,
                enable_gqa=heads_kv != 8)
            return out.transpose(1, 2)

        out, grads = grads_of(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), (q, k, v), dout)
        out_sdpa, grads_sdpa = grads_of(sdpa, (q, k, v), dout)
        out_ref, grads_ref = grads_of(lambda q, k, v: attention_reference(q, k, v, scale, *band)[0],
                                      [t.float() for t in (q, k, v)], dout.float())
        assert_flash_rule(out, out_ref, out_sdpa, 2, "out vs SDPA")
        for name, grad, grad_ref, grad_sdpa in zip(("dq", "dk", "dv"), grads, grads_ref, grads_sdpa):
            assert_flash_rule(grad, grad_ref, grad_sdpa, 3, f"{name} vs SDPA", eps=GRADIENT_EPS)

    @pytest.mark.parametrize("causal,window_size", [(False, (-1, -1)), (True, (-1, -1)), (False, (100, 30))])
    def test_no_less_accurate_than_flash_attn(self, causal, window_size):
        flash_attn = pytest.importorskip("flash_attn", reason="flash_attn is not installed")
        skip_unless_built(128, torch.bfloat16, backward=True)
        q, k, v = random_qkv(2, 700, 900, 8, 2, 128, torch.bfloat16, "cuda")
        dout = torch.randn_like(q)
        band = band_for(700, 900, causal, window_size)
        kwargs = dict(causal=causal, window_size=window_size, return_attn_probs=True)
        inputs = leaves((q, k, v))
        out, lse, _ = flash_attn_func(*inputs, **kwargs)
        out.backward(dout)
        inputs_fa = leaves((q, k, v))
        out_fa, lse_fa, _ = flash_attn.flash_attn_func(*inputs_fa, **kwargs)
        out_fa.backward(dout)
        out_ref, grads_ref = grads_of(lambda q, k, v: attention_reference(q, k, v, None, *band)[0],
                                      [t.float() for t in (q, k, v)], dout.float())
        assert_flash_rule(out.detach(), out_ref, out_fa.detach(), 2, "out vs flash_attn")
        # Every row sees at least one key here, so flash_attn's lse (+inf for empty rows) is comparable.
        assert max_error(lse, lse_fa) <= 2e-4
        for name, ours, theirs, grad_ref in zip(("dq", "dk", "dv"), inputs, inputs_fa, grads_ref):
            assert_flash_rule(ours.grad, grad_ref, theirs.grad, 3, f"{name} vs flash_attn", eps=GRADIENT_EPS)
