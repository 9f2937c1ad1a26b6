"""Benchmark scripts' logic that runs on CPU: which result files the ring plot picks up by default,
how the ring and varlen benchmarks rate and tabulate their rows, how the varlen benchmark cuts its
packed streams, and how the ring trace splits a timeline."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_common  # noqa: E402  (benchmarks/ is not a package)
import bench_ring  # noqa: E402
import bench_varlen  # noqa: E402
import plot_ring  # noqa: E402
import trace_ring  # noqa: E402


def test_results_record_a_torchrun_command_that_runs_again(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_ring.py", "--quick"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    plain = bench_common.command_line()
    assert plain.endswith(" benchmarks/bench_ring.py --quick") and "torch.distributed.run" not in plain
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert bench_common.command_line().endswith(
        " -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/bench_ring.py --quick")


def test_ring_plot_takes_bench_ring_results_and_leaves_out_loopback_ones(tmp_path):
    names = ["ring_nvidia-h200_w2.json", "ring_nvidia-h100-80gb-hbm3_w8.json",
             "ring_loopback_nvidia-h100-80gb-hbm3.json", "kernels_nvidia-h200.json"]
    for name in names:
        (tmp_path / name).write_text("{}")
    picked = [os.path.basename(path) for path in plot_ring.ring_result_files(str(tmp_path))]
    assert picked == ["ring_nvidia-h100-80gb-hbm3_w8.json", "ring_nvidia-h200_w2.json"]


def test_ring_bench_rates_ulysses_rows_against_each_ones_own_kernel():
    def row(impl, layout, iter_s, status="ok"):
        return {"config": "s8k_h32_kv8_causal", "mode": "fwd", "impl": impl, "layout": layout, "iter_s": iter_s,
                "status": status}

    rows = [row("ours_local", None, 600.0), row("fa2_local", None, 500.0), row("ours", "zigzag", 290.0),
            row("ours_usp", "ulysses", 270.0), row("yc_usp", "ulysses", 240.0), row("rfa", "ring", 0.0, "rejects")]
    bench_ring.add_efficiency(rows, world=2)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["ours_usp"]["efficiency"] == 270.0 / 300.0
    assert by_impl["yc_usp"]["efficiency"] == 240.0 / 300.0
    assert by_impl["yc_usp"]["efficiency_own_kernel"] == 240.0 / 250.0
    assert "efficiency" not in by_impl["rfa"] and "efficiency" not in by_impl["ours_local"]
    header, _, line = bench_ring.format_table(rows, ["zigzag"], usp=True).split("\n")
    assert header.split()[-4:] == ["ours", "ulysses", "yc", "ulysses"]
    assert line.endswith("270.0 ( 90%)    240.0 ( 80%)"), line
    assert "ulysses" not in bench_ring.format_table(rows, ["zigzag"])


def test_varlen_bench_cuts_streams_within_the_length_range():
    for seed in range(20):
        for unit in (1, 4):
            bounds = bench_varlen.sequence_bounds(32768, 128, 1024, seed, unit)
            lengths = [b - a for a, b in zip(bounds, bounds[1:])]
            assert bounds[0] == 0 and bounds[-1] == 32768
            assert all(128 <= n <= 1024 and n % unit == 0 for n in lengths[:-1]), lengths
            assert 1 <= lengths[-1] <= 1024 and lengths[-1] % unit == 0
    assert bench_varlen.sequence_bounds(100, 7, 30, 3) == bench_varlen.sequence_bounds(100, 7, 30, 3)


def test_varlen_bench_rates_multi_gpu_rows_against_one_gpu_on_the_whole_stream():
    def row(impl, iter_s, mode="fwd", status="ok"):
        return {"config": "long_s16k_kv8", "sequences": 5, "mode": mode, "impl": impl, "iter_s": iter_s,
                "status": status}

    # One GPU runs the whole stream at 100 iter/s: two ranks sharing it perfectly would run 200.
    rows = [row("ours_1gpu", 100.0), row("fa2_1gpu", 80.0), row("ours_llama3", 180.0), row("rfa_llama3", 144.0),
            row("ours_zigzag", 160.0), row("rfa_zigzag", 152.0),
            row("ours_1gpu", 30.0, "fwd_bwd"), row("rfa_zigzag", 0.0, "fwd_bwd", "error")]
    bench_varlen.add_efficiency(rows, world=2)
    by_impl = {r["impl"]: r for r in rows if r["mode"] == "fwd"}
    assert by_impl["ours_llama3"]["efficiency"] == 180.0 / 200.0
    assert by_impl["ours_llama3"]["efficiency_own_kernel"] == 180.0 / 200.0
    assert by_impl["rfa_llama3"]["efficiency"] == 144.0 / 200.0
    assert by_impl["rfa_llama3"]["efficiency_own_kernel"] == 144.0 / 160.0
    assert by_impl["rfa_zigzag"]["efficiency_own_kernel"] == 152.0 / 160.0
    assert "efficiency" not in by_impl["ours_1gpu"] and "efficiency" not in rows[-1]
    header, _, fwd, fwd_bwd = bench_varlen.format_table(rows).split("\n")
    assert header.split()[-4:] == ["ours", "zigzag", "rfa", "zigzag"]
    assert fwd.endswith("180.0 ( 90%)    144.0 ( 72%)    160.0 ( 80%)    152.0 ( 76%)"), fwd
    assert fwd_bwd.split()[-5:] == ["-", "-", "-", "-", "error"], fwd_bwd



class OneRank:
    """bench_ring.Ring for a world of one process."""
    rank, world = 0, 1

    def max(self, values):
        return list(values)


def test_varlen_bench_runs_its_rows_on_cpu(monkeypatch):
    """bench_varlen.bench_config on a tiny configuration on CPU, every step run once instead of
    timed (PyTorch's FA2 varlen kernels replaced by our flash_attn_varlen_func)."""
    import ring_attn_ext as ra
    ran = []

    def run_once(torch_module, ring, args, step, rejects_as):
        step()
        ran.append(step)
        return {"status": "ok", "iter_s": float(len(ran))}

    def single_gpu_stand_in(q, k, v, cu_seqlens, max_seqlen):
        return ra.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)

    monkeypatch.setattr(bench_varlen, "measure", run_once)
    config = bench_varlen.Config("tiny", chunk=48, min_len=3, max_len=20, heads=4, heads_kv=2, head_dim=16)
    args = bench_varlen.parse_args(["--configs", "long_s16k_kv8"])
    rows = bench_varlen.bench_config(torch, OneRank(), args, config, None, single_gpu_stand_in, device="cpu")
    assert len(ran) == len(rows) and all(r["status"] == "ok" for r in rows)
    assert [r["impl"] for r in rows if r["mode"] == "fwd"] == ["ours_1gpu", "fa2_1gpu", "ours_llama3", "ours_zigzag"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd_bwd"}
    assert all("efficiency" in r for r in rows if r["impl"] in ("ours_llama3", "ours_zigzag"))


ATTENTION = "void ring_attn::flash_bwd_kernel<ring_attn::BwdTraits<bfloat16_t, 128>, false>(ring_attn::BwdParams)"
FORWARD = "void ring_attn::flash::flash_fwd_kernel<ring_attn::flash::FwdTraits<cutlass::bfloat16_t, 128>>(...)"
DELTA = "void ring_attn::bwd_delta_kernel<cutlass::bfloat16_t, 128>(ring_attn::BwdParams)"
NCCL = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"
ADD = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>(int, ...)"


def test_trace_breakdown_splits_an_iteration_by_what_runs():
    # attention 0-10 and 12-20 (20-22 on a second stream overlaps the first), NCCL 5-15, an add
    # 25-30, nothing 22-25 and 30-31, one more NCCL kernel 31-32.
    kernels = [(ATTENTION, 0, 10, 2048), (ATTENTION, 12, 20, 2048), (ATTENTION, 19, 22, 2048), (NCCL, 5, 15, 4),
               (ADD, 25, 30, 512), (NCCL, 31, 32, None)]
    b = trace_ring.iteration_breakdown(kernels)
    assert b["span_us"] == 32
    assert b["attention_us"] == 20  # 0-10, 12-22
    assert b["nccl_us"] == 11
    assert b["nccl_only_us"] == 3  # 10-12 and 31-32
    assert b["other_only_us"] == 5
    assert b["idle_us"] == 32 - 20 - 3 - 5
    assert b["attention_during_nccl_us"] == 8  # 5-10 and 12-15
    assert b["attention_kernels"] == 3
    assert b["nccl_ctas"] == 4  # the largest NCCL grid; other kernels' grids do not count
    assert trace_ring.iteration_breakdown([]) is None
    assert trace_ring.iteration_breakdown([(ATTENTION, 0, 10, 2048)])["nccl_ctas"] is None


def test_trace_reports_the_iteration_of_median_span_whole():
    rows = [{"span_us": 10, "idle_us": 1}, {"span_us": 30, "idle_us": 9}, None, {"span_us": 20, "idle_us": 7},
            {"span_us": 25, "idle_us": 2}]
    assert trace_ring.median_breakdown(rows) == {"span_us": 20, "idle_us": 7}  # the lower middle of four
    assert trace_ring.median_breakdown(rows[:3]) == {"span_us": 10, "idle_us": 1}
    assert trace_ring.median_breakdown([None]) is None


def test_trace_counts_our_forward_and_backward_kernels_as_attention():
    assert trace_ring.kind_of(FORWARD) == trace_ring.kind_of(ATTENTION) == "attention"
    assert trace_ring.kind_of(DELTA) == trace_ring.kind_of(ADD) == "other"
    assert trace_ring.kind_of(NCCL) == "nccl"


def test_trace_kernels_go_to_the_iteration_window_they_start_in():
    events = [
        {"cat": "user_annotation", "name": "ring_iteration_0", "ts": 100.0, "dur": 50.0},
        {"cat": "user_annotation", "name": "ring_iteration_1", "ts": 200.0, "dur": 50.0},
        {"cat": "user_annotation", "name": "local_iteration_0", "ts": 0.0, "dur": 500.0},
        {"cat": "kernel", "name": ATTENTION, "ts": 110.0, "dur": 30.0},
        {"cat": "kernel", "name": NCCL, "ts": 210.0, "dur": 5.0, "args": {"grid": [2, 1, 1], "block": [640, 1, 1]}},
        {"cat": "kernel", "name": ADD, "ts": 260.0, "dur": 5.0},  # outside both windows
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 105.0, "dur": 1.0},
    ]
    assert trace_ring.kernels_by_iteration(events, "ring_iteration_") == {
        0: [(ATTENTION, 110.0, 140.0, None)], 1: [(NCCL, 210.0, 215.0, 2)]}
