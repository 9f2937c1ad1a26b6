"""Where a ring call's GPU time goes, per rank: our ring traced with torch.profiler (CUDA activity).

    torchrun --standalone --nproc_per_node=2 benchmarks/trace_ring.py --config s8k_h32_kv32_causal
    python3 benchmarks/trace_ring.py --nproc 2 --config s8k_h32_kv32_full --layout ring --mode fwd

bench_ring.py says how efficient a ring is; this says where the rest went. Every rank runs warm-up
iterations, then --iters traced ones, each between a barrier and a device synchronisation, so each
iteration's kernels fall inside its own host-side window. From the kernels' GPU start and end times
it measures, per iteration (reported for the traced iteration of median span, so that the parts
below add up):
  span        first kernel start to last kernel end
  attention   time while at least one of our attention kernels runs (forward or backward, any stream)
  nccl        time while an NCCL kernel runs, and nccl_only: while one runs and no attention does
  other_only  time while only other kernels run (the backward's adds, casts, zero-fills, delta)
  idle        time inside the span with no kernel at all
  attention_during_nccl  attention and NCCL kernels at once (the overlap a ring relies on)
  nccl_ctas   the largest grid (CTAs) of an NCCL kernel: while it runs, that many SMs host an NCCL
              CTA, and the backward kernel (one CTA of 255-register threads per SM) fits beside none
The same for our kernel on the local shard alone (what bench_ring calls ours_local): a perfect ring
of N spends N times that kernel's attention time, so
  span - N * local attention = (attention - N * local attention)        kernels slower or split up
                             + nccl_only + other_only + idle             attention not running
Rank 0 prints a table and writes benchmarks/results/trace_ring_<gpu>_w<N>_<config>_<layout>_<mode>.json;
--trace-dir also keeps each rank's Chrome trace (chrome://tracing, ui.perfetto.dev).
"""
import argparse
import json
import os
import re
import tempfile

import bench_common
import bench_ring  # also sets the NVLink-multicast environment before torch.distributed starts

# Our forward and backward attention kernels, as traces name them: "void ring_attn::flash::flash_fwd_kernel<...>(...)"
# and "void ring_attn::flash_bwd_kernel<...>(...)" (not the backward's delta kernel).
ATTENTION_KERNEL = re.compile(r"\bring_attn::(\w+::)*flash_(fwd|bwd)_kernel<")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [c.name for c in bench_ring.ALL_CONFIGS]
    p.add_argument("--config", default="s8k_h32_kv32_causal", choices=names)
    p.add_argument("--layout", default="zigzag", choices=bench_ring.LAYOUTS)
    p.add_argument("--mode", default="fwd_bwd", choices=bench_ring.MODES)
    p.add_argument("--iters", type=int, default=5, help="traced iterations (default 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=0,
                   help="processes to spawn when not started by torchrun (default: every visible GPU)")
    p.add_argument("--trace-dir", default=None, help="keep each rank's Chrome trace in this folder")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/trace_ring_<gpu>_w<N>_<config>_<layout>_<mode>.json)")
    args = p.parse_args(argv)
    args.config = {c.name: c for c in bench_ring.ALL_CONFIGS}[args.config]
    if args.iters < 1:
        p.error("--iters: at least 1")
    return args


# --- Interval arithmetic on (start, end) pairs, in microseconds -------------------------------------

def union(intervals):
    """Sorted, disjoint intervals covering the same time as `intervals`."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(m) for m in merged]


def length(intervals):
    return sum(end - start for start, end in union(intervals))


def intersection(a, b):
    """Intervals covered by both a and b."""
    a, b = union(a), union(b)
    result, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            result.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return result


def kind_of(kernel_name):
    """attention, nccl or other."""
    if ATTENTION_KERNEL.search(kernel_name):
        return "attention"
    if kernel_name.startswith("nccl"):
        return "nccl"
    return "other"


def iteration_breakdown(kernels):
    """Microseconds of one iteration from its kernels [(name, start, end, ctas)] (ctas: the grid's
    size, None where the trace has none): see the module docstring."""
    if not kernels:
        return None
    by_kind = {"attention": [], "nccl": [], "other": []}
    nccl_grids = []
    for name, start, end, ctas in kernels:
        kind = kind_of(name)
        by_kind[kind].append((start, end))
        if kind == "nccl" and ctas is not None:
            nccl_grids.append(ctas)
    span = max(end for _, _, end, _ in kernels) - min(start for _, start, _, _ in kernels)
    attention, nccl, other = (by_kind[k] for k in ("attention", "nccl", "other"))
    busy = length(attention + nccl + other)
    attention_or_nccl = length(attention + nccl)
    return {
        "span_us": span,
        "attention_us": length(attention),
        "nccl_us": length(nccl),
        "nccl_only_us": attention_or_nccl - length(attention),
        "other_only_us": busy - attention_or_nccl,
        "idle_us": span - busy,
        "attention_kernels": len(attention),
        "attention_during_nccl_us": length(intersection(attention, nccl)),
        "nccl_ctas": max(nccl_grids, default=None),  # None: no NCCL kernel, or no grid in the trace
    }


def grid_size(event):
    """CTAs of a kernel event (torch.profiler's Chrome trace gives its "grid" in args), or None."""
    grid = event.get("args", {}).get("grid")
    return None if not grid else grid[0] * grid[1] * grid[2]


def kernels_by_iteration(trace_events, prefix):
    """{iteration: [(name, start, end, ctas)]}: GPU kernels of a Chrome trace, assigned to the
    host-side windows (user annotations named prefix + number) that contain their start."""
    windows = [(int(e["name"][len(prefix):]), e["ts"], e["ts"] + e["dur"]) for e in trace_events
               if e.get("cat") == "user_annotation" and e.get("name", "").startswith(prefix)]
    result = {index: [] for index, _, _ in windows}
    for e in trace_events:
        if e.get("cat") != "kernel":
            continue
        for index, start, end in windows:
            if start <= e["ts"] <= end:
                result[index].append((e["name"], e["ts"], e["ts"] + e["dur"], grid_size(e)))
                break
    return result


def median_breakdown(per_iteration):
    """The breakdown of the iteration of median span (the lower of the middle two for an even count)
    among those that ran kernels: one iteration's parts, which add up to its span, where medians
    taken key by key need not."""
    rows = sorted((b for b in per_iteration if b is not None), key=lambda b: b["span_us"])
    return rows[(len(rows) - 1) // 2] if rows else None


# --- Tracing -------------------------------------------------------------------------------------

def traced_breakdown(torch, ring, step, args, label):
    """Median breakdown of `step` over args.iters traced iterations on this rank; with --trace-dir
    the Chrome trace is also kept there."""
    from torch.profiler import ProfilerActivity, profile, record_function
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    prefix = f"{label}_iteration_"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.iters):
            ring.barrier()
            torch.cuda.synchronize()
            with record_function(f"{prefix}{i}"):
                step()
                torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
        with open(os.path.join(args.trace_dir, f"{label}_rank{ring.rank}.json"), "w") as f:
            json.dump(trace, f)
    kernels = kernels_by_iteration(trace.get("traceEvents", []), prefix)
    return median_breakdown([iteration_breakdown(kernels[i]) for i in sorted(kernels)])


def format_report(config_name, layout, mode, world, results):
    """results: [(rank, local breakdown, ring breakdown)]."""
    lines = [f"{config_name} {layout} {mode}, {world} ranks; milliseconds, the traced iteration of median span",
             f"{'rank':>4} {'local attn':>10} {'span':>8} {'attn':>8} {'attn-N*local':>12} {'nccl':>8} "
             f"{'nccl only':>9} {'other only':>10} {'idle':>8} {'N*local/span':>12} {'nccl CTAs':>9}"]
    for rank, local, ring in results:
        ideal = world * local["attention_us"]
        lines.append(f"{rank:>4} {local['attention_us'] / 1e3:10.3f} {ring['span_us'] / 1e3:8.3f} "
                     f"{ring['attention_us'] / 1e3:8.3f} {(ring['attention_us'] - ideal) / 1e3:12.3f} "
                     f"{ring['nccl_us'] / 1e3:8.3f} {ring['nccl_only_us'] / 1e3:9.3f} "
                     f"{ring['other_only_us'] / 1e3:10.3f} {ring['idle_us'] / 1e3:8.3f} "
                     f"{ideal / ring['span_us']:12.3f} {ring['nccl_ctas'] or '-':>9}")
    return "\n".join(lines)


def run(args, rank, world, local_rank):
    import torch
    import torch.distributed as dist
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        import ring_attn_ext
        ring = bench_ring.Ring(torch, dist)
        cfg, causal = args.config, args.config.causal
        data = bench_ring.shards(torch, ring_attn_ext, ring, cfg, args)
        local_step = bench_ring.make_step(
            torch, lambda q, k, v: ring_attn_ext.flash_attn_func(q, k, v, causal=causal), data["ring"], args.mode)
        ring_fn = getattr(ring_attn_ext, bench_ring.FUNCTION_NAMES[args.layout])
        ring_step = bench_ring.make_step(torch, lambda q, k, v: ring_fn(q, k, v, causal=causal), data[args.layout],
                                         args.mode)
        local = traced_breakdown(torch, ring, local_step, args, "local")
        ring_result = traced_breakdown(torch, ring, ring_step, args, f"{args.layout}_{args.mode}")
        gathered = [None] * world
        dist.all_gather_object(gathered, (rank, local, ring_result))
        if rank == 0:
            meta = bench_common.run_metadata(torch)
            print(format_report(cfg.name, args.layout, args.mode, world, gathered))
            name = f"trace_ring_{bench_common.gpu_slug(meta['gpu'])}_w{world}_{cfg.name}_{args.layout}_{args.mode}.json"
            out = args.out or os.path.join(bench_common.RESULTS_DIR, name)
            document = dict(meta, world_size=world, config=cfg.name, layout=args.layout, mode=args.mode,
                            iters=args.iters, statistic="the traced iteration of median span, microseconds",
                            ranks=[{"rank": r, "local": lo, "ring": ri} for r, lo, ri in gathered])
            bench_common.write_json(out, document)
            print(f"wrote {out}")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    bench_common.launch(run, parse_args(argv), "trace_ring.py")


if __name__ == "__main__":
    main()
