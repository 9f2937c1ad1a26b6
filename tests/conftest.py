"""Shared test helpers: the import path, GPU skip markers, an independent naive attention oracle and
FlashAttention's error rule. Test modules import what they need with `from conftest import ...`."""
import contextlib
import functools
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ring_attn_ext._extension import EXTENSION_ERROR, _C, has_extension  # noqa: E402
from ring_attn_ext.masks import band_for  # noqa: E402


def _cuda_extension_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if not has_extension():
        return f"needs the compiled extension ring_attn_ext._C ({EXTENSION_ERROR})"
    return None


CUDA_EXTENSION_SKIP_REASON = _cuda_extension_skip_reason()


def requires_cuda_extension(test):
    """Marks a test (function or class) as a GPU test that skips, with the reason, without a CUDA
    GPU or without the compiled extension."""
    test = pytest.mark.gpu(test)
    return pytest.mark.skipif(CUDA_EXTENSION_SKIP_REASON is not None,
                              reason=CUDA_EXTENSION_SKIP_REASON or "")(test)


@functools.lru_cache(maxsize=None)
def cuda_kernel_built(head_dim, dtype, backward):
    """Whether this build holds the kernels for (head_dim, dtype): RING_ATTN_HEAD_DIMS,
    RING_ATTN_DTYPES and RING_ATTN_DISABLE_BACKWARD select them at build time."""
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    built = {(direction, dim, dtype_name) for direction, dim, dtype_name, _ in _C.compiled_kernels()}
    return ("fwd", head_dim, name) in built and (not backward or ("bwd", head_dim, name) in built)


def skip_unless_built(head_dim, dtype, backward=False):
    if not cuda_kernel_built(head_dim, dtype, backward):
        pytest.skip(f"this build has no {'backward' if backward else 'forward'} kernel for head_dim {head_dim} "
                    f"and {dtype} (see RING_ATTN_HEAD_DIMS / RING_ATTN_DTYPES / RING_ATTN_DISABLE_BACKWARD)")


@pytest.fixture
def exact_fp32_matmul():
    """For kernel tests (usefixtures): the fp32 reference must not run its products in TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def poison_cuda_allocator():
    """Fills the memory the caching allocator will hand out next with all-ones bytes, NaN in every
    floating dtype (fp32, fp16 and bf16 alike), so an output element a kernel forgets to write shows
    up as NaN instead of as a plausible stale value. The cache is emptied first: a free block left
    over from earlier work (a reference's gradient of the same shape, say) would otherwise be handed
    out before the poisoned ones."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    sizes = [256 << 20] + [1 << 19] * 16  # one large-pool block to split, and small-pool blocks
    buffers = [torch.full((size,), 255, dtype=torch.uint8, device="cuda") for size in sizes]
    del buffers
    torch.cuda.synchronize()


@contextlib.contextmanager
def fake_cuda_mode():
    """Tensors created inside report a CUDA device without any GPU or memory behind them, so the
    CUDA-only argument rules are testable on CPU-only machines. Only metadata can be read."""
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor",
                                      reason="needs torch's FakeTensorMode to fake CUDA tensors")
    with fake_tensor.FakeTensorMode():
        yield


def visible(i, j, seqlen_q, seqlen_k, causal, window_size):
    """FlashAttention-2's mask, written out per (query, key) pair: query i sits at key position
    i + seqlen_k - seqlen_q (bottom-right alignment)."""
    diagonal = i + seqlen_k - seqlen_q
    left, right = window_size
    if causal and j > diagonal:
        return False
    if left >= 0 and j < diagonal - left:
        return False
    if right >= 0 and j > diagonal + right:
        return False
    return True


def global_mask(seqlen, causal, window_size):
    """The same rule as visible() for s_q = s_k, as a (seqlen, seqlen) bool tensor over global
    positions: query i sees key j iff (not causal or j <= i), j >= i - left and j <= i + right
    (a bound of -1 is no bound)."""
    offset = torch.arange(seqlen)[None, :] - torch.arange(seqlen)[:, None]  # j - i
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool)
    left, right = window_size
    if causal:
        mask &= offset <= 0
    if left >= 0:
        mask &= offset >= -left
    if right >= 0:
        mask &= offset <= right
    return mask


def naive_attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """Independent float64 oracle: one explicit softmax per (batch, head, query row). Returns
    (out float64 (b, s_q, h, d), lse float64 (b, h, s_q)); a row with no visible key gives out 0
    and lse -inf. Meant for small shapes only."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    out = torch.zeros(batch, seqlen_q, heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv_head = h // (heads // heads_kv)
            for i in range(seqlen_q):
                keys = [j for j in range(seqlen_k) if visible(i, j, seqlen_q, seqlen_k, causal, window_size)]
                if not keys:
                    continue
                scores = torch.stack([q[b, i, h] @ k[b, j, kv_head] for j in keys]) * scale
                peak = scores.max()
                weights = torch.exp(scores - peak)
                total = weights.sum()
                lse[b, h, i] = peak + torch.log(total)
                out[b, i, h] = sum(w * v[b, j, kv_head] for w, j in zip(weights, keys)) / total
    return out, lse


def max_error(actual, reference):
    return (actual.double() - reference.double()).abs().max().item()


# FlashAttention-2's tests add 1e-5 to the gradient bound. It matters where a gradient is exactly 0
# in exact arithmetic (a query that sees a single key has dS = P (dP - delta) = 0): the same-dtype
# baseline can land on exactly 0 by its order of operations while fp32 accumulation in any kernel
# leaves a residue of about 1e-6.
GRADIENT_EPS = 1e-5


def assert_flash_rule(actual, reference, same_dtype, factor, name, eps=1e-6):
    """FlashAttention's test rule: the error of `actual` against a high-precision `reference` is at
    most `factor` times the error of a same-dtype PyTorch computation (`same_dtype`), plus twice
    the error of merely rounding the reference to actual's dtype, plus `eps` (GRADIENT_EPS for
    gradients)."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = max_error(actual, reference)
    baseline = max_error(same_dtype, reference)
    rounding = max_error(reference.to(actual.dtype), reference)
    bound = factor * baseline + 2 * rounding + eps
    assert error <= bound, f"{name}: max error {error:.3g} > {factor} x same-dtype error {baseline:.3g} + eps"


def assert_rounded_once(name, actual, exact):
    """For the CPU paths, which keep every partial result in fp32 and round once at the end: the
    error against the exact result is at most twice that of rounding the exact result to actual's
    dtype (a partial result rounded to a 16-bit dtype on the way roughly doubles it)."""
    error = max_error(actual, exact)
    rounding = max_error(exact.to(actual.dtype), exact)
    assert error <= 2 * rounding, f"{name}: max error {error:.3g} > 2 x rounding error {rounding:.3g}"


def assert_lse_equal(actual, reference, atol, name="lse"):
    """lse with -inf rows: the -inf pattern must match exactly, finite values within atol."""
    assert actual.dtype == torch.float32, f"{name}: dtype {actual.dtype}, want float32"
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    empty = torch.isneginf(reference)
    assert torch.equal(torch.isneginf(actual), empty), f"{name}: -inf rows differ"
    assert not torch.isnan(actual).any() and not torch.isposinf(actual).any(), f"{name}: NaN or +inf"
    if (~empty).any():
        error = max_error(actual[~empty], reference[~empty])
        assert error <= atol, f"{name}: max error {error:.3g} > {atol}"


KERNEL_TEST_BANDS = ("full", "causal", "window", "wide_window", "causal_strict", "offset", "empty")


def kernel_test_band(kind, seqlen_q, seqlen_k):
    """(key_offset_min, key_offset_max) of a band kind used by the kernel tests; None = unbounded."""
    if kind == "full":
        return None, None
    if kind == "causal":
        return band_for(seqlen_q, seqlen_k, causal=True)
    if kind == "window":  # narrower than any tile: every visited tile needs masking
        return band_for(seqlen_q, seqlen_k, window_size=(37, 5))
    if kind == "wide_window":  # long rows: tiles masked at both ends of a kernel's walk, clear between
        return band_for(seqlen_q, seqlen_k, window_size=(700, 300))
    if kind == "causal_strict":  # the ring's "causal excluding the diagonal"
        return None, seqlen_k - seqlen_q - 1
    if kind == "offset":  # keys 100..300 positions behind the query: blocks skipped on both sides
        return -300, -100
    if kind == "empty":  # min > max: no key is visible anywhere
        return 5, 2
    raise ValueError(kind)


def varlen_mask(bounds_q, bounds_k, causal, window_size, device="cpu"):
    """(total_q, total_k) bool: visible() within each packed sequence, aligned to the sequence's own
    bottom-right corner, and nothing across sequences; rows after bounds_q[-1] see nothing."""
    mask = torch.zeros(bounds_q[-1], bounds_k[-1], dtype=torch.bool, device=device)
    left, right = window_size
    for q_begin, q_end, k_begin, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        i = torch.arange(q_end - q_begin, device=device)[:, None]
        j = torch.arange(k_end - k_begin, device=device)[None, :]
        diagonal = i + (k_end - k_begin) - (q_end - q_begin)  # the key position of query i
        seen = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=device)
        if causal:
            seen &= j <= diagonal
        if left >= 0:
            seen &= j >= diagonal - left
        if right >= 0:
            seen &= j <= diagonal + right
        mask[q_begin:q_end, k_begin:k_end] = seen
    return mask


def packed_attention(q, k, v, mask, softmax_scale=None):
    """Dense attention over packed rows q (total_q, h, d), k and v (total_k, h_kv, d) under an
    explicit mask (total_q' <= total_q, total_k) in q's dtype, differentiable: (out (total_q, h, d),
    lse (h, total_q)). Rows with no visible key, and rows past the mask, give out 0 and lse -inf."""
    padded = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = (torch.einsum("qhd,khd->hqk", q, k) * scale).masked_fill(~padded, float("-inf"))
    has_key = padded.any(dim=1)[:, None]
    # Rows without a key: a softmax over zeros, multiplied by 0, keeps NaN out of out and its gradients.
    probs = torch.softmax(torch.where(has_key, scores, torch.zeros_like(scores)), dim=-1) * has_key
    return torch.einsum("hqk,khd->qhd", probs, v), torch.logsumexp(scores, dim=-1)


def packed_attention_with_grads(q, k, v, dout, mask, precision):
    """packed_attention of q, k, v computed in `precision`, with dout backpropagated:
    (out, lse, [dq, dk, dv]); the inputs themselves stay out of the graph."""
    leaves = [t.detach().to(precision).requires_grad_() for t in (q, k, v)]
    out, lse = packed_attention(*leaves, mask)
    out.backward(dout.to(precision))
    return out, lse, [t.grad for t in leaves]
