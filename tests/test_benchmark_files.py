"""Benchmark scripts that run on CPU: which result files the ring plot picks up by default."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot_ring  # noqa: E402  (benchmarks/ is not a package)


def test_ring_plot_takes_bench_ring_results_and_leaves_out_loopback_ones(tmp_path):
    names = ["ring_nvidia-h200_w2.json", "ring_nvidia-h100-80gb-hbm3_w8.json",
             "ring_loopback_nvidia-h100-80gb-hbm3.json", "kernels_nvidia-h200.json"]
    for name in names:
        (tmp_path / name).write_text("{}")
    picked = [os.path.basename(path) for path in plot_ring.ring_result_files(str(tmp_path))]
    assert picked == ["ring_nvidia-h100-80gb-hbm3_w8.json", "ring_nvidia-h200_w2.json"]
