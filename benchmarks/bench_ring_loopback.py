"""The ring's scheduling cost on ONE GPU: a whole ring of N virtual ranks through the loopback
transport (the same C++ step machines as the NCCL ring; blocks move by device copies), against
N * N single-GPU calls of our kernel on a local shard.

    python3 benchmarks/bench_ring_loopback.py                 # s_local 8k, N 2 and 8, every layout
    python3 benchmarks/bench_ring_loopback.py --worlds 2,4,8 --seqlens 8k,32k --modes fwd

Why: a real ring's efficiency (benchmarks/bench_ring.py) needs several GPUs. The loopback runs all
N ranks' work on one GPU, so it shows what the ring costs beyond the attention itself (the fp32
merge of every step, the split into per-step pieces, the final casts, the dK/dV accumulation,
stream and event overheads), but not the interconnect: the copies between virtual ranks use the
GPU's own memory bandwidth instead of NVLink.

A configuration is the local shard of every rank (batch 1, s_local tokens, h, h_kv, d 128, bf16,
causal or not). The global attention has N * N times the work of one shard against itself
(causal: of the causal local shard), so
    compute efficiency = N * N * t(local) / t(loopback ring of N ranks),
where t(local) times ring_attn_ext._C.fwd (fwd) or _C.fwd + _C.bwd (fwd_bwd) on one shard and the
loopback times ring_forward_loopback (+ ring_backward_loopback) over all N ranks. 1.0 means the
ring adds nothing on top of the kernels. MiB/rank is one such call's peak allocation beyond its
inputs, divided by N: about what one rank of a real ring allocates (the virtual ranks' buffers all live
through the call). Prints a table and writes benchmarks/results/ring_loopback_<gpu>.json.
"""
import argparse
import itertools
import os
import sys

import bench_common

LAYOUTS = ("ring", "zigzag", "stripe")
MODES = ("fwd", "fwd_bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="2,8", help="comma list of ring sizes N (default: 2,8)")
    p.add_argument("--seqlens", default="8k", help="comma list of s_local, k suffix allowed (default: 8k)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-kv", default="8,32", help="comma list (default: 8,32)")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, fwd_bwd")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--target-s", type=float, default=0.4, help="timed seconds per measurement (default: 0.4)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/ring_loopback_<gpu>.json)")
    args = p.parse_args(argv)
    args.worlds = bench_common.parse_list(args.worlds, int)
    args.seqlens = bench_common.parse_list(args.seqlens, bench_common.parse_size)
    args.heads_kv = bench_common.parse_list(args.heads_kv, int)
    args.causal = {"both": (True, False), "true": (True,), "false": (False,)}[args.causal]
    args.modes = bench_common.parse_list(args.modes)
    args.layouts = bench_common.parse_list(args.layouts)
    return args


def seconds_per_call(torch, fn, target_s):
    """Seconds per call of fn: a warm-up call, a probe call that sizes the loop, then one loop of
    about target_s between two CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    iters = max(3, min(200, round(target_s / max(start.elapsed_time(end) / 1e3, 1e-6))))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def peak_mib(torch, fn):
    """MiB that one call of fn allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def local_call(C, band, mode, shard, scale):
    q, k, v, dout = shard
    if mode == "fwd":
        return lambda: C.fwd(q, k, v, scale, *band)

    def fwd_bwd():
        out, lse = C.fwd(q, k, v, scale, *band)
        C.bwd(dout, q, k, v, out, lse, scale, *band)
    return fwd_bwd


def loopback_call(ring_cuda, mode, shards, plans, scale):
    qs, ks, vs, douts = shards
    if mode == "fwd":
        return lambda: ring_cuda.ring_forward_loopback(qs, ks, vs, plans, scale)

    def fwd_bwd():
        outs, lses = ring_cuda.ring_forward_loopback(qs, ks, vs, plans, scale)
        ring_cuda.ring_backward_loopback(douts, qs, ks, vs, outs, lses, plans, scale)
    return fwd_bwd


def main(argv=None):
    args = parse_args(argv)
    import torch
    import ring_attn_ext
    from ring_attn_ext import _ring_cuda
    from ring_attn_ext._extension import _C
    from ring_attn_ext.masks import band_for
    from ring_attn_ext.ring_plan import build_plan

    if _C is None or not torch.cuda.is_available():
        sys.exit("bench_ring_loopback.py needs a CUDA GPU and the compiled extension")
    gpu = torch.cuda.get_device_name()
    head_dim, scale = 128, 128 ** -0.5
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"ring_loopback_{bench_common.gpu_slug(gpu)}.json")
    document = {"meta": bench_common.run_metadata(torch), "rows": []}
    header = f"{'N':>2} {'s_local':>7} {'h':>3} {'h_kv':>4} {'causal':>6} {'mode':>7} {'layout':>6} | " \
             f"{'local ms':>9} {'ring ms':>9} {'compute eff':>11} {'MiB/rank':>10}"
    print(f"{gpu}: loopback ring, bf16, d {head_dim}\n{header}\n{'-' * len(header)}", flush=True)
    for world, seqlen, heads_kv, causal in itertools.product(args.worlds, args.seqlens, args.heads_kv, args.causal):
        torch.manual_seed(0)
        kw = {"device": "cuda", "dtype": torch.bfloat16}
        q_shape, kv_shape = (1, seqlen * world, args.heads, head_dim), (1, seqlen * world, heads_kv, head_dim)
        full = (torch.randn(q_shape, **kw), torch.randn(kv_shape, **kw), torch.randn(kv_shape, **kw),
                torch.randn(q_shape, **kw))
        local = tuple(t[:, :seqlen].contiguous() for t in full)
        band = band_for(seqlen, seqlen, causal)
        for mode in args.modes:
            local_s = seconds_per_call(torch, local_call(_C, band, mode, local, scale), args.target_s)
            for layout in args.layouts:
                shards = [[ring_attn_ext.shard(t, layout, rank, world).contiguous() for rank in range(world)]
                          for t in full]
                plans = [build_plan(layout, rank, world, seqlen, causal) for rank in range(world)]
                ring = loopback_call(_ring_cuda, mode, shards, plans, scale)
                ring_s = seconds_per_call(torch, ring, args.target_s)
                efficiency = world * world * local_s / ring_s
                per_rank_mib = peak_mib(torch, ring) / world
                row = {"world": world, "seqlen_local": seqlen, "heads": args.heads, "heads_kv": heads_kv,
                       "head_dim": head_dim, "causal": causal, "mode": mode, "layout": layout,
                       "local_ms": round(local_s * 1e3, 4), "ring_ms": round(ring_s * 1e3, 4),
                       "compute_efficiency": round(efficiency, 4), "peak_mib_per_rank": round(per_rank_mib, 1)}
                document["rows"].append(row)
                print(f"{world:>2} {seqlen:>7} {args.heads:>3} {heads_kv:>4} {str(causal):>6} {mode:>7} "
                      f"{layout:>6} | {local_s * 1e3:>9.3f} {ring_s * 1e3:>9.3f} {efficiency:>11.3f} "
                      f"{per_rank_mib:>10.1f}", flush=True)
                del ring
                del shards
        del full, local
        torch.cuda.empty_cache()
        bench_common.write_json(out_path, document)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
