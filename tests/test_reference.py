"""The PyTorch reference (the oracle of every other test) against an independent naive float64
softmax loop, torch.logsumexp and torch.autograd.gradcheck; merge_partial against full attention."""
import pytest
import torch

from conftest import assert_lse_equal, naive_attention
from ring_attn_ext.masks import band_for
from ring_attn_ext.reference import attention_reference, merge_partial


def random_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype=torch.float64, requires_grad=False):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, window_size)
MASK_CASES = [
    (2, 5, 5, 4, 4, 8, False, (-1, -1)),
    (1, 1, 1, 2, 2, 4, False, (-1, -1)),
    (1, 1, 6, 2, 1, 4, True, (-1, -1)),
    (2, 7, 7, 2, 2, 8, True, (-1, -1)),
    (1, 9, 4, 4, 1, 8, True, (-1, -1)),  # s_q > s_k: the first 5 rows see no key
    (2, 4, 9, 8, 2, 8, True, (-1, -1)),  # s_q < s_k: every row sees the first 6+ keys
    (1, 9, 9, 8, 1, 4, False, (2, 1)),
    (1, 9, 9, 2, 2, 4, True, (3, -1)),
    (1, 5, 11, 4, 4, 4, False, (-1, 2)),
    (1, 8, 3, 2, 1, 4, False, (0, 0)),  # rows 0..4 see no key
    (1, 3, 8, 2, 2, 4, True, (1, 5)),  # causal caps the right side at 0
    (1, 6, 6, 4, 4, 4, False, (0, -1)),
]


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,heads,heads_kv,head_dim,causal,window_size", MASK_CASES)
def test_reference_matches_naive_loop(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, window_size):
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)
    out, lse = attention_reference(q, k, v, None, *band_for(seqlen_q, seqlen_k, causal, window_size))
    out_naive, lse_naive = naive_attention(q, k, v, None, causal, window_size)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    assert lse.shape == (batch, heads, seqlen_q)
    torch.testing.assert_close(out, out_naive, rtol=0, atol=1e-12)
    assert_lse_equal(lse, lse_naive.float(), atol=1e-5)
    empty_rows = torch.isneginf(lse_naive).transpose(1, 2)  # (b, s_q, h)
    assert torch.equal(out[empty_rows], torch.zeros_like(out[empty_rows]))


def test_reference_has_empty_rows_in_the_mask_cases():
    """Guards the intent of MASK_CASES: some of them must exercise rows that see no key."""
    assert band_for(9, 4, causal=True) == (None, -5)
    out, lse = attention_reference(*random_qkv(1, 9, 4, 1, 1, 4), None, *band_for(9, 4, causal=True))
    assert torch.isneginf(lse[0, 0, :5]).all() and torch.isfinite(lse[0, 0, 5:]).all()
    assert (out[0, :5] == 0).all()


def test_reference_custom_softmax_scale():
    q, k, v = random_qkv(2, 6, 5, 4, 2, 8)
    out, lse = attention_reference(q, k, v, 0.3, *band_for(6, 5, causal=True))
    out_naive, lse_naive = naive_attention(q, k, v, 0.3, causal=True)
    torch.testing.assert_close(out, out_naive, rtol=0, atol=1e-12)
    assert_lse_equal(lse, lse_naive.float(), atol=1e-5)


def test_reference_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = random_qkv(1, 4, 4, 2, 2, 16)
    torch.testing.assert_close(attention_reference(q, k, v)[0], attention_reference(q, k, v, 0.25)[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("causal,window_size", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2))])
def test_lse_matches_torch_logsumexp(causal, window_size):
    seqlen_q, seqlen_k = 13, 10
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, 4, 2, 16, dtype=torch.float32)
    kmin, kmax = band_for(seqlen_q, seqlen_k, causal, window_size)
    _, lse = attention_reference(q, k, v, 0.5, kmin, kmax)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * 0.5
    offsets = torch.arange(seqlen_k)[None, :] - torch.arange(seqlen_q)[:, None]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if kmin is not None:
        visible &= offsets >= kmin
    if kmax is not None:
        visible &= offsets <= kmax
    expected = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    assert_lse_equal(lse, expected.float(), atol=1e-5)


def test_upcast_computes_16_bit_inputs_in_float32():
    q, k, v = random_qkv(2, 9, 7, 4, 1, 16, dtype=torch.bfloat16)
    band = band_for(9, 7, causal=True)
    out, lse = attention_reference(q, k, v, None, *band, upcast=True)
    out_fp32, lse_fp32 = attention_reference(q.float(), k.float(), v.float(), None, *band)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out, out_fp32.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_fp32, rtol=0, atol=0, equal_nan=False)
    # upcast=False is the same-dtype baseline of FlashAttention's rule: still correct, less precise.
    out_same, _ = attention_reference(q, k, v, None, *band, upcast=False)
    assert out_same.dtype == torch.bfloat16
    torch.testing.assert_close(out_same.float(), out_fp32, rtol=0, atol=5e-2)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(0, 5), (5, 0)])
def test_reference_empty_sequences(seqlen_q, seqlen_k):
    out, lse = attention_reference(*random_qkv(2, seqlen_q, seqlen_k, 2, 1, 4))
    assert out.shape == (2, seqlen_q, 2, 4) and lse.shape == (2, 2, seqlen_q)
    assert (out == 0).all() and torch.isneginf(lse).all()


def shifted_band(band, key_start):
    """The band of a block of keys starting at key_start, in the block's own key offsets."""
    return tuple(None if bound is None else bound - key_start for bound in band)


def merge_blocks(q, k, v, softmax_scale, band, block_sizes):
    """Full attention computed block by block over the keys and merged with merge_partial."""
    batch, seqlen_q, heads, head_dim = q.shape
    out = torch.zeros(batch, seqlen_q, heads, head_dim, dtype=torch.float32)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"))
    start = 0
    for size in block_sizes:
        block_out, block_lse = attention_reference(q, k[:, start:start + size], v[:, start:start + size],
                                                   softmax_scale, *shifted_band(band, start))
        out, lse = merge_partial(out, lse, block_out.float(), block_lse)
        start += size
    assert start == k.shape[1]
    return out, lse


@pytest.mark.parametrize("seqlen_q,seqlen_k,heads,heads_kv,causal,window_size,block_sizes", [
    (16, 16, 4, 4, False, (-1, -1), [3, 5, 1, 7]),
    (16, 16, 4, 2, True, (-1, -1), [4, 4, 4, 4]),  # blocks past the diagonal hold -inf rows
    (6, 20, 8, 1, True, (-1, -1), [10, 10]),
    (20, 6, 2, 2, True, (-1, -1), [1, 2, 3]),  # rows that see no key at all stay (0, -inf)
    (17, 17, 4, 4, False, (2, 3), [5, 5, 5, 2]),  # most blocks are empty for most rows
])
def test_merge_partial_of_key_blocks_equals_full_attention(seqlen_q, seqlen_k, heads, heads_kv, causal,
                                                           window_size, block_sizes):
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, heads, heads_kv, 8, dtype=torch.float32)
    band = band_for(seqlen_q, seqlen_k, causal, window_size)
    out_full, lse_full = attention_reference(q, k, v, None, *band)
    out, lse = merge_blocks(q, k, v, None, band, block_sizes)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, out_full, rtol=1e-5, atol=1e-6)
    assert_lse_equal(lse, lse_full, atol=1e-5)


def random_partial_state(empty_fraction):
    """A (out, lse) pair as one block would give it, with some rows that saw no key."""
    out = torch.randn(2, 9, 3, 8)
    lse = torch.randn(2, 3, 9) * 3
    empty = torch.rand(2, 3, 9) < empty_fraction
    lse = lse.masked_fill(empty, float("-inf"))
    out = out.masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
    return out, lse


def test_merge_partial_is_associative_and_commutative():
    a, b, c = (random_partial_state(0.3) for _ in range(3))
    left_out, left_lse = merge_partial(*merge_partial(*a, *b), *c)
    right_out, right_lse = merge_partial(*a, *merge_partial(*b, *c))
    torch.testing.assert_close(left_out, right_out, rtol=1e-5, atol=1e-6)
    assert_lse_equal(left_lse, right_lse, atol=1e-5)
    ab_out, ab_lse = merge_partial(*a, *b)
    ba_out, ba_lse = merge_partial(*b, *a)
    torch.testing.assert_close(ab_out, ba_out, rtol=1e-6, atol=1e-7)
    assert_lse_equal(ab_lse, ba_lse, atol=1e-6)


def test_merge_partial_with_empty_state_is_identity_and_never_nan():
    state = random_partial_state(0.3)
    empty = (torch.zeros(2, 9, 3, 8), torch.full((2, 3, 9), float("-inf")))
    for merged in (merge_partial(*empty, *state), merge_partial(*state, *empty)):
        torch.testing.assert_close(merged[0], state[0], rtol=0, atol=0)
        torch.testing.assert_close(merged[1], state[1], rtol=0, atol=0)
    out, lse = merge_partial(*empty, *empty)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_partial_weights_equal_logsumexp():
    """Two blocks with known lse: the merged lse is logaddexp, the merged out the weighted mean."""
    (out_a, lse_a), (out_b, lse_b) = random_partial_state(0.0), random_partial_state(0.0)
    out, lse = merge_partial(out_a, lse_a, out_b, lse_b)
    expected_lse = torch.logaddexp(lse_a.double(), lse_b.double())
    weight_a = torch.exp(lse_a.double() - expected_lse).transpose(1, 2).unsqueeze(-1)
    weight_b = torch.exp(lse_b.double() - expected_lse).transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), weight_a * out_a + weight_b * out_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seqlen_q,seqlen_k,heads,heads_kv,causal,window_size", [
    (3, 3, 2, 2, False, (-1, -1)),
    (5, 3, 4, 2, True, (-1, -1)),  # includes rows that see no key: their gradients must be 0, not NaN
    (3, 5, 4, 1, True, (-1, -1)),
    (4, 4, 2, 1, False, (1, 0)),
])
def test_reference_gradients_match_gradcheck(seqlen_q, seqlen_k, heads, heads_kv, causal, window_size):
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, heads, heads_kv, 4, requires_grad=True)
    band = band_for(seqlen_q, seqlen_k, causal, window_size)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_reference(q, k, v, 0.7, *band)[0], (q, k, v))
