"""The one-launch varlen path (packed_kernels.py): the sequence table and its launches on CPU, and on
CUDA the kernels against the per-sequence reference on arbitrary tables: entries of every length
(one row, many tiles), bands of every kind (full, causal, windows, shifted), entries sharing keys
(as the zigzag layout's two query runs do), GQA, rows that belong to no entry."""
import random

import pytest
import torch

import ring_attn_ext.packed_kernels as packed_kernels
from ring_attn_ext import checks, flash_attn_varlen_func
from conftest import (GRADIENT_EPS, assert_flash_rule, poison_cuda_allocator, requires_cuda_extension,
                      skip_unless_built)
from ring_attn_ext._extension import _C
from ring_attn_ext.packed_kernels import _disjoint_key_groups, _entry, _masks, launches
from ring_attn_ext.varlen import Sequence, varlen_backward, varlen_forward


def test_entry_clamps_the_band_into_the_sequence():
    rows, keys = slice(10, 20), slice(5, 35)  # 10 queries, 30 keys
    assert _entry(Sequence(rows, keys, (None, None))) == (10, 20, 5, 35, -10, 30)
    assert _entry(Sequence(rows, keys, (-100, 100))) == (10, 20, 5, 35, -10, 30)
    assert _entry(Sequence(rows, keys, (3, 5))) == (10, 20, 5, 35, 3, 5)
    assert _entry(Sequence(rows, keys, (40, None))) == (10, 20, 5, 35, 30, 30)
    # A band wholly below the keys: both ends clamped up to -s_q, the range the kernels are promised.
    assert _entry(Sequence(rows, keys, (None, -100))) == (10, 20, 5, 35, -10, -10)
    assert _entry(Sequence(rows, keys, (-100, -50))) == (10, 20, 5, 35, -10, -10)


@pytest.mark.parametrize("band, masks", [((None, None), False), ((None, 20), True), ((-9, 29), False),
                                         ((-8, 29), True), ((-9, 28), True), ((0, 0), True)])
def test_masks_says_whether_a_band_hides_a_key(band, masks):
    assert _masks(_entry(Sequence(slice(0, 10), slice(0, 30), band))) is masks


def test_one_query_row_under_a_causal_band_sees_every_key():
    assert not _masks(_entry(Sequence(slice(0, 1), slice(0, 5), (None, 4))))


def test_disjoint_key_groups_separate_overlapping_keys_only():
    def entry(k_begin, k_end, tag):
        return (tag, tag + 1, k_begin, k_end, 0, 0)

    entries = [entry(0, 10, 0), entry(10, 20, 1), entry(0, 10, 2), entry(5, 15, 3), entry(20, 30, 4),
               entry(0, 10, 5), entry(30, 31, 6)]
    groups = _disjoint_key_groups(entries)
    assert groups == [[entries[0], entries[1], entries[4], entries[6]], [entries[2]], [entries[3]], [entries[5]]]
    for group in groups:
        spans = sorted((e[2], e[3]) for e in group)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_disjoint_key_groups_fill_gaps_of_earlier_groups():
    entries = [(0, 1, 0, 10, 0, 0), (1, 2, 20, 30, 0, 0), (2, 3, 10, 20, 0, 0)]  # the third fits between
    assert _disjoint_key_groups(entries) == [entries]


def test_a_launch_fits_the_grid():
    """The entries of a launch run along the grid's y dimension, which CUDA caps at 65535 blocks."""
    assert packed_kernels.MAX_ENTRIES == checks.MAX_GRID_YZ == 65535


def test_launches_leave_out_empty_sequences_and_split_long_tables(monkeypatch):
    monkeypatch.setattr(packed_kernels, "MAX_ENTRIES", 2)
    packed_kernels._launches.cache_clear()
    sequences = [Sequence(slice(0, 5), slice(0, 7), (None, None)), Sequence(slice(5, 5), slice(7, 9), (None, 2)),
                 Sequence(slice(5, 9), slice(9, 9), (None, None)), Sequence(slice(9, 12), slice(9, 20), (None, 8)),
                 Sequence(slice(12, 30), slice(20, 22), (None, None))]
    try:
        result = launches(sequences, "cpu", disjoint_keys=False)
        assert [launch.table.tolist() for launch in result] == [[[0, 5, 0, 7, -5, 7], [9, 12, 9, 20, -3, 8]],
                                                                [[12, 30, 20, 22, -18, 2]]]
        assert [(launch.max_seqlen_q, launch.max_seqlen_k, launch.is_masked) for launch in result] == [
            (5, 11, True), (18, 2, False)]
        assert all(launch.table.dtype == torch.int32 for launch in result)
        assert launches(sequences, "cpu", disjoint_keys=False) is result  # cached per packing
    finally:
        packed_kernels._launches.cache_clear()


def test_launches_of_one_tuple_are_built_once(monkeypatch):
    built = []
    entry = packed_kernels._entry
    monkeypatch.setattr(packed_kernels, "_entry", lambda sequence: built.append(sequence) or entry(sequence))
    sequences = (Sequence(slice(0, 3), slice(0, 3), (None, 0)), Sequence(slice(3, 9), slice(3, 9), (None, 0)))
    first = launches(sequences, "cpu", disjoint_keys=False)
    assert launches(sequences, "cpu", disjoint_keys=False) is first
    assert len(built) == 2
    launches(list(sequences), "cpu", disjoint_keys=False)  # a list may change: its entries are rebuilt
    assert len(built) == 4
    changing = [Sequence(slice(0, 3), slice(0, 3), (None, 0))]
    launches(changing, "cpu", disjoint_keys=False)
    changing[0] = Sequence(slice(0, 5), slice(0, 5), (None, None))  # the same list, another packing
    assert launches(changing, "cpu", disjoint_keys=False)[0].table.tolist() == [[0, 5, 0, 5, -5, 5]]


def test_backward_launches_hold_disjoint_keys():
    shared = [Sequence(slice(0, 4), slice(0, 8), (None, 4)), Sequence(slice(4, 8), slice(0, 8), (None, 0)),
              Sequence(slice(8, 9), slice(8, 16), (None, None))]
    forward = launches(shared, "cpu", disjoint_keys=False)
    backward = launches(shared, "cpu", disjoint_keys=True)
    assert [launch.table.shape[0] for launch in forward] == [3]
    assert [launch.table[:, 0].tolist() for launch in backward] == [[0, 8], [4]]


# CUDA: random tables through the kernels against the reference path of the same functions (ext =
# None: each entry on its own, float64 for the error bound, the input dtype for FlashAttention's rule).

def random_table(seed, entries, padding_rows):
    """(sequences, total_q, total_k): entries with their own query rows, some reusing an earlier
    entry's keys; random lengths from 1 to 700 and random bands."""
    rng = random.Random(seed)
    sequences, total_q, total_k = [], 0, 0
    for _ in range(entries):
        s_q = rng.choice([1, rng.randint(1, 70), rng.randint(64, 700)])
        if sequences and rng.random() < 0.25:
            keys = rng.choice(sequences).keys
        else:
            s_k = rng.choice([1, rng.randint(1, 70), rng.randint(64, 700)])
            keys = slice(total_k, total_k + s_k)
            total_k += s_k
        s_k = keys.stop - keys.start
        shift = s_k - s_q
        band = rng.choice([(None, None), (None, shift), (shift - 40, shift), (shift - 100, shift + 30),
                           (rng.randint(-s_q, s_k), None), (-3, 5)])
        if band[0] is not None and band[1] is not None and band[0] > band[1]:
            band = (band[1], band[0])
        sequences.append(Sequence(slice(total_q, total_q + s_q), keys, band))
        total_q += s_q
    return sequences, total_q + padding_rows, total_k


def run_varlen(ext, q, k, v, dout, sequences, scale):
    """The caller's part as varlen.py's callers play it: out 0 and lse -inf in rows of no sequence,
    and here NaN in the rows the kernels must write (those of entries with queries and keys), so a
    row they leave unwritten shows."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device,
                     dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    for sequence in sequences:
        if sequence.keys.stop > sequence.keys.start:
            out[sequence.queries] = float("nan")
            lse[:, sequence.queries] = float("nan")
    varlen_forward(ext, q, k, v, sequences, scale, out, lse)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    varlen_backward(ext, dout, q, k, v, out, lse, sequences, scale, *grads)
    return out, lse, grads


@requires_cuda_extension
@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("head_dim", [64, 128, 32, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed, entries, heads, heads_kv", [(0, 40, 4, 4), (1, 25, 6, 2), (2, 300, 2, 1)])
def test_one_launch_matches_the_per_sequence_reference(head_dim, dtype, seed, entries, heads, heads_kv):
    skip_unless_built(head_dim, dtype, backward=True)
    sequences, total_q, total_k = random_table(seed, entries, padding_rows=3)
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(rows, count):
        return torch.randn(rows, count, head_dim, device="cuda", dtype=dtype, generator=generator)

    q, k, v, dout = randn(total_q, heads), randn(total_k, heads_kv), randn(total_k, heads_kv), randn(total_q, heads)
    scale = head_dim ** -0.5
    poison_cuda_allocator()  # the kernels' own buffers (dQ, dK/dV accumulators) start as garbage
    out, lse, grads = run_varlen(_C, q, k, v, dout, sequences, scale)
    ref_out, ref_lse, ref_grads = run_varlen(None, *(t.double() for t in (q, k, v, dout)), sequences, scale)
    same_out, _, same_grads = run_varlen(None, q, k, v, dout, sequences, scale)
    assert_flash_rule(out, ref_out, same_out, 2, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < 1e-3
    for name, grad, ref, same in zip(("dq", "dk", "dv"), grads, ref_grads, same_grads):
        assert_flash_rule(grad, ref, same, 3, name, eps=GRADIENT_EPS)
    assert not out[-3:].any() and not grads[0][-3:].any()  # padding rows: out 0, gradient 0


@requires_cuda_extension
def test_packed_backward_adds_into_an_unaligned_dq_accumulator():
    """The Hopper kernels add dQ through the TMA, which needs rows that start 16-byte aligned: an
    accumulator that starts 4 bytes off must receive the same sum (through an aligned temporary)."""
    skip_unless_built(64, torch.bfloat16, backward=True)
    sequences = (Sequence(slice(0, 70), slice(0, 90), (None, None)),
                 Sequence(slice(70, 200), slice(90, 200), (None, 0)))
    generator = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, dout = (torch.randn(200, 2, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
                     for _ in range(4))
    out, lse = torch.zeros_like(q), torch.full((2, 200), float("-inf"), device="cuda")
    packed_kernels.packed_forward(_C, q, k, v, sequences, 0.125, out, lse)
    delta = (dout.float() * out.float()).sum(-1).t().contiguous()  # (heads, rows), as lse
    (launch,) = launches(sequences, q.device, disjoint_keys=True)

    def add_dq_into(dq_accum):
        dq_accum.fill_(1.0)  # the kernel adds to what is there
        dk, dv = (torch.zeros(200, 2, 64, device="cuda") for _ in range(2))
        _C.varlen_bwd_accumulate(dout, q, k, v, lse, delta, dq_accum, dk, dv, launch.table, launch.max_seqlen_q,
                                 launch.max_seqlen_k, 0.125, launch.is_masked)
        return dq_accum

    aligned = add_dq_into(torch.empty(200, 2, 64, device="cuda"))
    unaligned = add_dq_into(torch.empty(200 * 2 * 64 + 1, device="cuda")[1:].view(200, 2, 64))
    assert unaligned.data_ptr() % 16 == 4 and unaligned.is_contiguous()
    assert (aligned - 1).abs().amax() > 0.1  # the gradient arrived
    torch.testing.assert_close(unaligned, aligned, rtol=1e-5, atol=1e-5)


@requires_cuda_extension
def test_a_captured_graph_keeps_its_tables_after_the_cache_drops_them():
    """A CUDA graph replays its kernels with the addresses of the tables they read at capture. The
    tables' caches may drop them later (other packings push them out); the graph must still read
    what it captured, not whatever the allocator put in that memory since (zeros here: entries
    without rows, so a replay reading them would write no row of out beyond its zero fill)."""
    skip_unless_built(64, torch.bfloat16)
    generator = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, 100, 130, 300], dtype=torch.int32)  # on the host: read without a sync

    def run():
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 170, 170, causal=True)

    expected = run()  # also the warm-up that puts the packing's tables in the cache
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = run()
    packed_kernels._launches.cache_clear()
    packed_kernels._BY_IDENTITY.clear()
    torch.cuda.synchronize()
    # 2 MB of the tables' 512-byte block size: every small block the cache freed, the tables' included.
    reused = [torch.zeros(128, dtype=torch.int32, device="cuda") for _ in range(4096)]
    captured_out.fill_(float("nan"))  # capture ran nothing: the replay alone must write it
    graph.replay()
    torch.cuda.synchronize()
    del reused  # kept through the replay
    assert torch.equal(captured_out, expected)


@requires_cuda_extension
def test_capturing_a_packing_never_run_uncaptured_raises_by_name():
    """Its tables would have to be copied to the device from pageable host memory, which capture
    forbids; PyTorch's own error would advise pinning that memory, which the caller cannot do. The
    message says what to do instead."""
    skip_unless_built(64, torch.bfloat16)
    packed_kernels._launches.cache_clear()
    packed_kernels._BY_IDENTITY.clear()
    q, k, v = (torch.randn(201, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu_seqlens = torch.tensor([0, 77, 201], dtype=torch.int32)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="run it once uncaptured with the same cu_seqlens"):
        with torch.cuda.graph(graph):
            flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 124, 124)
    # The capture ended cleanly: the same call, uncaptured, runs.
    assert torch.isfinite(flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 124, 124)).all()
