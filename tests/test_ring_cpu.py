"""The ring on CPU tensors over gloo (ring_reference.py through ring.py and ring_flash_attn.py),
against full attention on the unsharded tensors in float64, forward and backward.

Process start-up dominates the time, so one pool of world_size processes (tests/ring_workers.py)
serves every test of that world size; pytest groups the tests by the pool's parameter.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import assert_rounded_once, global_mask
from ring_attn_ext import __main__ as main_job
from ring_attn_ext import checks, group_checks, ring
from ring_attn_ext import ring_flash_attn as rfa
from ring_attn_ext.sharding import shard
from ring_workers import RankPool

ATOL = 1e-11  # float64 end to end: anything above rounding noise is a bug

FUNCTIONS = {
    ("ring", "separate"): rfa.ring_flash_attn_func,
    ("ring", "kvpacked"): rfa.ring_flash_attn_kvpacked_func,
    ("ring", "qkvpacked"): rfa.ring_flash_attn_qkvpacked_func,
    ("zigzag", "separate"): rfa.zigzag_ring_flash_attn_func,
    ("zigzag", "kvpacked"): rfa.zigzag_ring_flash_attn_kvpacked_func,
    ("zigzag", "qkvpacked"): rfa.zigzag_ring_flash_attn_qkvpacked_func,
    ("stripe", "separate"): rfa.stripe_flash_attn_func,
    ("stripe", "kvpacked"): rfa.stripe_flash_attn_kvpacked_func,
    ("stripe", "qkvpacked"): rfa.stripe_flash_attn_qkvpacked_func,
}


def oracle(q, k, v, causal, window_size, softmax_scale):
    """Full attention over global positions, float64, written from the definition (conftest's
    global_mask)."""
    visible = global_mask(q.shape[1], causal, window_size)
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v), torch.logsumexp(scores, dim=-1)


def assert_close(name, actual, expected, atol=ATOL):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert error <= atol, f"{name}: max error {error:.3g} > {atol}"


def make_case(layout, causal, window_size=(-1, -1), heads=4, heads_kv=4, seqlen_local=None, batch=2, head_dim=8,
              softmax_scale=None, packing="separate"):
    if seqlen_local is None:
        seqlen_local = 4 if layout == "zigzag" else 3
    return dict(layout=layout, causal=causal, window_size=window_size, heads=heads, heads_kv=heads_kv,
                seqlen_local=seqlen_local, batch=batch, head_dim=head_dim, softmax_scale=softmax_scale,
                packing=packing)


@pytest.fixture(scope="module")
def pool(request):
    """A RankPool of request.param processes (use with indirect parametrisation)."""
    ranks = RankPool(request.param)
    yield ranks
    ranks.close()


def cases(world_size):
    """Every layout, causal or not, MHA/GQA/MQA, the packed forms, windows and tiny shards; the
    largest worlds run a subset that still covers each layout with causal, GQA and a window."""
    if world_size > 4:
        return [make_case(layout, causal, window_size=window, heads_kv=heads_kv, packing=packing)
                for layout in ("ring", "zigzag", "stripe")
                for causal, window, heads_kv, packing in ((False, (-1, -1), 4, "separate"),
                                                          (True, (-1, -1), 2, "kvpacked"),
                                                          (True, (3, 0), 1, "separate"))]
    result = []
    for layout in ("ring", "zigzag", "stripe"):
        for causal in (False, True):
            result.append(make_case(layout, causal))                                         # MHA
            result.append(make_case(layout, causal, heads=4, heads_kv=2, softmax_scale=0.3))  # GQA
            result.append(make_case(layout, causal, heads=4, heads_kv=1, packing="kvpacked"))  # MQA
            result.append(make_case(layout, causal, packing="qkvpacked", batch=1))
        small = 2 if layout == "zigzag" else 1
        result.append(make_case(layout, True, seqlen_local=small))
        result.append(make_case(layout, False, window_size=(2, 1)))
        result.append(make_case(layout, True, window_size=(3, -1), heads_kv=2))
        result.append(make_case(layout, False, window_size=(-1, 0)))
        result.append(make_case(layout, False, window_size=(0, 0)))
    return result


def global_tensors(case, world_size, seed):
    generator = torch.Generator().manual_seed(seed)
    seqlen = case["seqlen_local"] * world_size

    def randn(heads):
        return torch.randn(case["batch"], seqlen, heads, case["head_dim"], generator=generator, dtype=torch.float64)

    return randn(case["heads"]), randn(case["heads_kv"]), randn(case["heads_kv"]), randn(case["heads"])


def check_case(rank, world_size, case, seed, group=None):
    """Runs one case on this rank (low-level API and the drop-in function with autograd) and
    compares this rank's shards with the shards of the oracle's results."""
    layout, causal, window, scale = case["layout"], case["causal"], case["window_size"], case["softmax_scale"]
    q, k, v, dout = global_tensors(case, world_size, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = oracle(*leaves, causal, window, scale)
    # Gradients of sum(out * dout), i.e. backward with dout: passing dout as grad_outputs instead would
    # make torch import sympy (seconds per process) to check its shape.
    ref_dq, ref_dk, ref_dv = torch.autograd.grad((ref_out * dout).sum(), leaves)
    local = [shard(t, layout, rank, world_size) for t in (q, k, v, dout)]
    expected = dict(out=shard(ref_out.detach(), layout, rank, world_size),
                    lse=shard(ref_lse.detach(), layout, rank, world_size, dim=2),
                    dq=shard(ref_dq, layout, rank, world_size), dk=shard(ref_dk, layout, rank, world_size),
                    dv=shard(ref_dv, layout, rank, world_size))
    label = f"{case} rank {rank}/{world_size}"
    options = dict(group=group, causal=causal, softmax_scale=scale, layout=layout, window_size=window)

    out, lse = ring.forward(*local[:3], **options)
    assert_close(f"{label} forward out", out, expected["out"])
    assert_close(f"{label} forward lse", lse, expected["lse"])
    dq, dk, dv = ring.backward(local[3], *local[:3], out, lse, **options)
    for name, actual in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert_close(f"{label} backward {name}", actual, expected[name])

    # The drop-in function, with autograd, in the case's packing.
    packing = case["packing"]
    q_l, k_l, v_l = local[:3]
    if packing == "separate":
        inputs = [t.clone().requires_grad_() for t in (q_l, k_l, v_l)]
    elif packing == "kvpacked":
        inputs = [q_l.clone().requires_grad_(), torch.stack((k_l, v_l), dim=2).requires_grad_()]
    else:
        inputs = [torch.stack((q_l, k_l, v_l), dim=2).requires_grad_()]
    out, lse, probs = FUNCTIONS[(layout, packing)](*inputs, softmax_scale=scale, causal=causal, window_size=window,
                                                   return_attn_probs=True, group=group)
    assert probs is None
    assert_close(f"{label} {packing} out", out, expected["out"])
    assert_close(f"{label} {packing} lse", lse, expected["lse"])
    (out * local[3]).sum().backward()
    grads = [t.grad for t in inputs]
    if packing == "kvpacked":
        grads = [grads[0], *grads[1].unbind(2)]
    elif packing == "qkvpacked":
        grads = grads[0].unbind(2)
    for name, actual in zip(("dq", "dk", "dv"), grads):
        assert_close(f"{label} {packing} {name}", actual, expected[name])


def all_cases_on_rank(rank, world_size):
    for index, case in enumerate(cases(world_size)):
        check_case(rank, world_size, case, seed=1000 * world_size + index)
    return len(cases(world_size))


@pytest.mark.parametrize("pool", [1, 2, 3, 4, 5, 8], indirect=True)
def test_ring_matches_full_attention(pool):
    assert pool.run(all_cases_on_rank) == [len(cases(pool.world_size))] * pool.world_size


def subgroup_rings_on_rank(rank, world_size):
    """Two rings side by side on the ranks {0, 2} and {1, 3} of a world of 4: group ranks differ
    from global ranks, and the neighbours must be found through the group."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates both, in order
    group = groups[rank % 2]
    group_rank = dist.get_rank(group)
    for index, case in enumerate([make_case("zigzag", True), make_case("stripe", False, heads_kv=2),
                                  make_case("ring", True, window_size=(2, 0))]):
        # Each ring uses its own data (seed by ring), so a message crossing rings would show.
        check_case(group_rank, 2, case, seed=77 + 10 * index + rank % 2, group=group)
    return group_rank


@pytest.mark.parametrize("pool", [4], indirect=True)
def test_rings_on_subgroups(pool):
    assert pool.run(subgroup_rings_on_rank) == [0, 0, 1, 1]


def expect_error(error_type, fragment, function):
    """Asserts that function() raises error_type with `fragment` in its message."""
    try:
        function()
    except error_type as error:
        assert fragment in str(error), f"expected {fragment!r} in the error message, got: {error}"
        return str(error)
    except Exception as error:  # a wrong exception type fails with its own message
        raise AssertionError(f"expected {error_type.__name__} containing {fragment!r}, got {error!r}") from error
    raise AssertionError(f"expected {error_type.__name__} containing {fragment!r}, nothing was raised")


def mismatches_on_rank(rank, world_size):
    """Ranks that disagree, or one rank whose arguments are invalid: every rank raises, none hangs
    (the harness deadline would catch a hang). Rank 1 is the odd one out."""
    odd = rank == 1
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 4, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    base = dict(causal=True, softmax_scale=None, layout="zigzag", window_size=(-1, -1))

    def forward(**changes):
        options = dict(base, **(changes if odd else {}))
        tensors = options.pop("tensors", (q, k, v))
        return lambda: ring.forward(*tensors, **options)

    short = tuple(t[:, :2] for t in (q, k, v))
    disagreements = [
        (forward(tensors=short), "q shape"),
        (forward(tensors=(q, k[:, :, :2], v[:, :, :2])), "k/v shape"),
        (forward(tensors=tuple(t.float() for t in (q, k, v))), "dtype"),
        (forward(causal=False), "causal"),
        (forward(layout="stripe"), "layout"),
        (forward(window_size=(2, 0)), "window_size"),
        (forward(softmax_scale=0.25), "softmax_scale"),
        # Only rank 1 would run a backward, which exchanges with the others: they would never join.
        (forward(tensors=(q.detach().requires_grad_(), k, v)), "requires_grad"),
    ]
    for call, field in disagreements:
        message = expect_error(ValueError, "disagree on " + field, call)
        assert "rank 0: " in message and "rank 1: " in message, message
        if field == "layout":  # each rank's value, decoded
            assert "rank 0: 'zigzag'" in message and "rank 1: 'stripe'" in message, message
    # The last rank the odd one out: every record is compared, not only the first two.
    last = world_size - 1
    message = expect_error(ValueError, "disagree on softmax_scale", lambda: ring.forward(
        q, k, v, **dict(base, softmax_scale=0.25 if rank == last else None)))
    assert f"rank {last}: 0.25" in message, message

    def rejected(error_type, fragment, call):
        if odd:
            expect_error(error_type, fragment, call)
        else:
            expect_error(ValueError, "rank(s) [1] of the process group rejected their arguments", call)

    rejected(ValueError, "must divide the number of heads", forward(tensors=(q, k[:, :, :3], v[:, :, :3])))
    rejected(ValueError, "seqlen_local must be even", forward(tensors=tuple(t[:, :3] for t in (q, k, v))))
    rejected(ValueError, "window_size", forward(window_size=(-2, 0)))
    rejected(TypeError, "causal must be a bool", forward(causal=1))
    # Too large for the check's int64 record: refused by name on that rank, not overflowing there alone.
    rejected(ValueError, "window_size: 9223372036854775808 is out of range", forward(window_size=(2 ** 63, -1)))

    out, lse = ring.forward(q, k, v, **base)
    wrong_lse = lse[:, :, :3] if odd else lse
    rejected(ValueError, "lse must have shape", lambda: ring.backward(out, q, k, v, out, wrong_lse, **base))
    expect_error(ValueError, "disagree on causal",
                 lambda: ring.backward(out, q, k, v, out, lse, **dict(base, causal=not odd)))
    rejected(NotImplementedError, "dropout_p", lambda: rfa.zigzag_ring_flash_attn_func(
        q, k, v, dropout_p=0.1 if odd else 0.0, causal=True))
    rejected(NotImplementedError, "alibi_slopes", lambda: rfa.zigzag_ring_flash_attn_func(
        q, k, v, alibi_slopes=torch.ones(4) if odd else None, causal=True))

    # The group is still healthy: a consistent call after all that gives the right answer.
    check_case(rank, world_size, make_case("zigzag", True), seed=9)

    # RING_ATTN_GROUP_CHECKS=0 skips the cross-rank check entirely (no collective is made).
    def no_collective(*args):
        raise AssertionError("the cross-rank check ran although RING_ATTN_GROUP_CHECKS=0")

    saved = group_checks._all_gather_records
    group_checks._all_gather_records = no_collective
    os.environ["RING_ATTN_GROUP_CHECKS"] = "0"
    try:
        check_case(rank, world_size, make_case("stripe", True), seed=10)
    finally:
        del os.environ["RING_ATTN_GROUP_CHECKS"]
        group_checks._all_gather_records = saved
    return True


@pytest.mark.parametrize("pool", [2, 3], indirect=True)
def test_mismatched_ranks_raise_everywhere(pool):
    assert pool.run(mismatches_on_rank) == [True] * pool.world_size


def test_world_of_one_without_torch_distributed():
    assert not dist.is_initialized()
    for index, case in enumerate(cases(1)):
        check_case(0, 1, case, seed=index)


def test_group_without_torch_distributed_is_an_error():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ring.forward(q, q, q, group=object())


def test_unsupported_options_raise_and_name_themselves():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        rfa.ring_flash_attn_func(q, q, q, dropout_p=0.5)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        rfa.stripe_flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="layout"):
        ring.forward(q, q, q, layout="diagonal")
    with pytest.raises(ValueError, match="same sequence"):
        ring.forward(q, q[:, :2], q[:, :2])
    with pytest.raises(ValueError, match="kv must have shape"):
        rfa.ring_flash_attn_kvpacked_func(q, q)


def test_a_bad_ring_timeout_raises_in_the_cross_rank_check(monkeypatch):
    """CUDA shards of a ring of several ranks read RING_ATTN_TIMEOUT_S while validating (so a rank
    with a bad value raises with all the others), not first when the communicator is made."""
    monkeypatch.setenv("RING_ATTN_TIMEOUT_S", "soon")
    shape = checks.QKVShape(batch=1, seqlen_q=8, seqlen_k=8, heads=2, heads_kv=2, head_dim=64)
    with pytest.raises(ValueError, match="RING_ATTN_TIMEOUT_S must be a positive number"):
        ring.plan_call(shape, torch.bfloat16, torch.device("cuda", 0), False, ring.RingGroup(None, 0, 2), True,
                       None, "zigzag", (-1, -1))
    # A CPU ring has no NCCL communicator: the setting is not read.
    _, call = ring.plan_call(shape, torch.float32, torch.device("cpu"), False, ring.RingGroup(None, 0, 1),
                                  True, None, "zigzag", (-1, -1))
    assert len(call.plan) == 1


def test_drop_in_return_values_and_flags():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    out = rfa.stripe_flash_attn_func(q, k, v, causal=True, deterministic=True)
    assert isinstance(out, torch.Tensor)
    assert_close("deterministic", out, oracle(q, k, v, True, (-1, -1), None)[0])
    out_bf16 = rfa.ring_flash_attn_func(*(t.bfloat16() for t in (q, k, v)), causal=True)
    assert out_bf16.dtype == torch.bfloat16
    rounded = (t.bfloat16().double() for t in (q, k, v))
    assert_rounded_once("bf16 out", out_bf16, oracle(*rounded, True, (-1, -1), None)[0])


def test_bf16_ring_on_cpu_rounds_once():
    """bf16 shards through the ring's CPU path, forward and backward (float64 inputs, as the other
    CPU tests use, cannot show a partial result rounded to the input dtype: delta in bf16 doubles the
    gradients' error here)."""
    generator = torch.Generator().manual_seed(11)
    q, k, v, dout = (2 * torch.randn(2, 64, 4, 64, generator=generator) for _ in range(4))
    q, k, v, dout = (t.bfloat16() for t in (q, k, v, dout))
    out, lse = ring.forward(q, k, v, causal=True)
    grads = ring.backward(dout, q, k, v, out, lse, causal=True)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    exact, _ = oracle(*leaves, True, (-1, -1), None)
    exact_grads = torch.autograd.grad(exact, leaves, dout.double())
    assert_rounded_once("out", out, exact.detach())
    for name, grad, exact_grad in zip(("dq", "dk", "dv"), grads, exact_grads):
        assert_rounded_once(name, grad, exact_grad)


def test_main_job_on_cpu():
    """`python -m ring_attn_ext` (the README's main job) on 2 CPU processes: every layout passes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "ring_attn_ext", "--device", "cpu", "--world-size", "2", "--seqlen", "16",
               "--heads", "2", "--kv-heads", "1", "--head-dim", "8"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    rows = [row for row in map(str.split, result.stdout.splitlines()) if row[:2] in (["ring", "2"], ["zigzag", "2"],
                                                                                     ["stripe", "2"])]
    assert [row[0] for row in rows] == ["ring", "zigzag", "stripe"] and all(row[-1] == "pass" for row in rows), \
        result.stdout


def test_main_job_runs_on_cpu_where_the_extension_was_not_built(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(main_job, "has_extension", lambda: False)
    assert main_job.parse_args([]).device == "cpu"
    with pytest.raises(SystemExit):
        main_job.parse_args(["--device", "cuda"])
    assert "--device cuda: the CUDA extension was not built" in capsys.readouterr().err


def test_main_job_reports_failure_and_bad_arguments(capsys):
    args = main_job.parse_args(["--device", "cpu", "--world-size", "2", "--seqlen", "8"])
    passing = [0.1, 1.0] * len(main_job.QUANTITIES) + [1.0]
    failing = [0.1, 1.0] * (len(main_job.QUANTITIES) - 1) + [2.0, 1.0, 0.0]
    assert main_job.print_table(args, [("ring", [passing, passing])]) is True
    assert main_job.print_table(args, [("ring", [passing, failing])]) is False
    assert "FAIL" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main_job.parse_args(["--device", "cpu", "--world-size", "4", "--seqlen", "12"])
    assert exit_info.value.code == 2
    assert "multiple of 2 * world_size = 8" in capsys.readouterr().err
