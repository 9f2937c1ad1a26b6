"""Attention masks as bands of key offsets.

Every mask this package supports is a band: key j is visible to query i iff
    key_offset_min <= j - i <= key_offset_max,
with None meaning unbounded on that side. Full attention is (None, None); FlashAttention-2's
bottom-right-aligned causal mask is (None, s_k - s_q); a sliding window (left, right) is
(s_k - s_q - left, s_k - s_q + right); the ring's per-step masks are bands over the block's offsets.
The kernels, the reference and the ring all speak this one language.
"""


def check_window_size(window_size):
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded, got {window_size!r}")
    return left, right


def band_for(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1)):
    """(key_offset_min, key_offset_max) for FlashAttention-2 semantics: causal and window are
    aligned bottom-right (query i sits at key position i + s_k - s_q); causal caps the right side of
    the window at 0."""
    return band_at_shift(seqlen_k - seqlen_q, causal, window_size)


def band_at_shift(shift, causal=False, window_size=(-1, -1)):
    """The band of causal and window_size for query i sitting at key position i + shift: band_for
    with an explicit shift, for callers that know where their queries and keys sit (the packed
    sequences of varlen.py)."""
    left, right = check_window_size(window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    key_offset_min = None if left < 0 else shift - left
    key_offset_max = None if right < 0 else shift + right
    return key_offset_min, key_offset_max


def clamp_key_offset(offset, seqlen_q, seqlen_k):
    """A band edge clamped into [-s_q, s_k]: j - i only ranges over [-(s_q - 1), s_k - 1], so the
    clamp hides or shows no other key, and keeps the kernels' int32 arithmetic in range whatever
    the caller passed (the C++ API clamps a plain call's band the same way)."""
    return min(max(offset, -seqlen_q), seqlen_k)
