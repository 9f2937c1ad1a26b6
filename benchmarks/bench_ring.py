"""Ring attention across the GPUs of one host: ours (ring, zigzag, stripe layouts) against
ring-flash-attn 0.1.8, forward and forward+backward iterations per second, and the efficiency
against a single GPU.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_ring.py        # or:
    python3 benchmarks/bench_ring.py --nproc 2                               # spawns its own processes
    python3 benchmarks/bench_ring.py --quick                                 # two configs, short timing
    python3 benchmarks/bench_ring.py --configs all                           # the 8-config grid

A configuration is the LOCAL shard of every rank: batch 1, s_local tokens, h query heads, h_kv
key/value heads, d 128, bf16, causal or not (the global sequence is N * s_local). The default set is
the project's four target configurations (s8k_h32_kv8_causal, s8k_h32_kv32_causal,
s8k_h32_kv32_full, s32k_h32_kv8_causal). Every rank holds its shard of the same global tensors, in each layout.

Per configuration, each measurement runs a loop of iterations between two CUDA events on every
rank after a barrier and a warm-up; the time is the slowest rank's:
  ours_local, fa2_local  one GPU, no communication: our kernel (ring_attn_ext.flash_attn_func) and
                         PyTorch's FlashAttention-2 (what ring-flash-attn runs per block) on the
                         local shard alone (local q against local k/v, causal when the config is).
  ours / rfa x layout    ring_attn_ext.{ring_flash_attn,zigzag_ring_flash_attn,stripe_flash_attn}_func
                         and ring-flash-attn's functions of the same names.
Modes: fwd (under torch.no_grad) and fwd_bwd (forward, then torch.autograd.grad for q, k, v).
Efficiency = iter/s / (ours_local iter/s / N): one GPU does 1 block where the ring does N on each
of N GPUs, so a perfect ring reaches 1.0. efficiency_own_kernel divides by the implementation's own
kernel instead (ring-flash-attn: fa2_local), which is ring-flash-attn's "theoretic" convention.
ring-flash-attn rejects non-causal zigzag and stripe: those rows say "rejects". Every forward of
ours is also compared with ring-flash-attn's on the same shards (max_abs_diff_vs_rfa).
With --usp, every rank also joins one Ulysses group (usp_groups(N): Ulysses groups of all N ranks,
rings of one) and two more rows run on shards cut with ulysses_degree=N:
  ours_usp  ring_attn_ext.usp_attn_func (layout zigzag);
  yc_usp    yunchang 0.6.4's LongContextAttention (ring_impl_type "zigzag", attn_type FA: the
            flash_attn stand-in on PyTorch's FlashAttention-2 kernels) from the same peers folder.

ring-flash-attn comes from the peers folder (shared/peers: peers.py, the flash_attn stand-in on
PyTorch's kernels, and the wheels): --peers-dir, else $PEERS_DIR, else .carry/peers in the repo,
else ../shared/peers beside it. Without it, only our rows are measured.
Rank 0 prints a table and writes benchmarks/results/ring_<gpu>_w<N>.json after every configuration.
"""
import os

# NVLink multicast stays off (a program using it can put a shared host's GPUs out of service); it
# must be set before NCCL or torch.distributed initialise, also in processes this script spawns.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402

import bench_common  # noqa: E402

LAYOUTS = ("ring", "zigzag", "stripe")
FUNCTION_NAMES = {"ring": "ring_flash_attn_func", "zigzag": "zigzag_ring_flash_attn_func",
                  "stripe": "stripe_flash_attn_func"}
MODES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Config:
    seqlen_local: int
    heads: int
    heads_kv: int
    causal: bool
    head_dim: int = 128

    @property
    def name(self):
        return (f"s{self.seqlen_local // 1024}k_h{self.heads}_kv{self.heads_kv}_"
                f"{'causal' if self.causal else 'full'}")


DESIGN_CONFIGS = (Config(8192, 32, 8, True), Config(8192, 32, 32, True), Config(8192, 32, 32, False),
                  Config(32768, 32, 8, True))
ALL_CONFIGS = tuple(Config(s, 32, kv, causal) for s in (8192, 32768) for kv in (8, 32) for causal in (True, False))
QUICK_CONFIGS = (Config(8192, 32, 8, True), Config(8192, 32, 32, False))


def add_run_arguments(p):
    """The options measure(), load_peers() and bench_common.launch() read (bench_varlen.py shares them)."""
    p.add_argument("--iters", type=int, default=0, help="timed iterations (default: enough for --target-s)")
    p.add_argument("--target-s", type=float, default=1.0, help="seconds per timed loop when --iters is 0 (default 1)")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=500)
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before each measurement (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers-dir", default=None, help="folder holding peers.py (default: see bench_ring.py)")
    p.add_argument("--no-peers", action="store_true", help="measure ours only")
    p.add_argument("--nproc", type=int, default=0,
                   help="processes to spawn when not started by torchrun (default: every visible GPU)")


def timing_metadata(args):
    """How the rows were timed, for the JSON."""
    return {"warmup_iters": args.warmup, "iters": args.iters or None, "target_s": args.target_s,
            "statistic": "total loop time of the slowest rank / iterations"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ", ".join(c.name for c in ALL_CONFIGS)
    p.add_argument("--configs", default="design",
                   help=f"'design' (the four target configurations, default), 'all', or a comma list of: {names}")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of ring, zigzag, stripe")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, fwd_bwd")
    add_run_arguments(p)
    p.add_argument("--quick", action="store_true",
                   help=f"configs {QUICK_CONFIGS[0].name} and {QUICK_CONFIGS[1].name}, --target-s 0.3")
    p.add_argument("--usp", action="store_true",
                   help="also Ulysses attention across all ranks: ours (usp_attn_func) and yunchang's")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/ring_<gpu>_w<N>.json)")
    args = p.parse_args(argv)
    by_name = {c.name: c for c in ALL_CONFIGS}
    if args.quick:
        args.configs, args.target_s = list(QUICK_CONFIGS), 0.3
    elif args.configs == "design":
        args.configs = list(DESIGN_CONFIGS)
    elif args.configs == "all":
        args.configs = list(ALL_CONFIGS)
    else:
        unknown = [n for n in bench_common.parse_list(args.configs) if n not in by_name]
        if unknown:
            p.error(f"--configs: unknown {unknown}; known: {names}")
        args.configs = [by_name[n] for n in bench_common.parse_list(args.configs)]
    args.layouts = bench_common.parse_list(args.layouts)
    args.modes = bench_common.parse_list(args.modes)
    for flag, values, allowed in (("--layouts", args.layouts, LAYOUTS), ("--modes", args.modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{flag}: {bad} not among {list(allowed)}")
    return args


def first_line(error):
    return f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]


def find_peers_dir(args):
    candidates = [args.peers_dir, os.environ.get("PEERS_DIR"), os.path.join(bench_common.REPO, ".carry", "peers"),
                  os.path.join(os.path.dirname(bench_common.REPO), "shared", "peers")]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "peers.py")):
            return os.path.abspath(path)
    return None


class Ring:
    """This process's view of the group, and the collective helpers the measurements need."""

    def __init__(self, torch, dist):
        self.torch, self.dist = torch, dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def barrier(self):
        self.dist.barrier(device_ids=[self.torch.cuda.current_device()])

    def max(self, values):
        t = self.torch.tensor(values, dtype=self.torch.float64, device="cuda")
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t.tolist()


def load_peers(args, ring):
    """(ring_flash_attn module, flash_attn stand-in module, note). Rank 0 imports first, since peers.py
    unpacks the wheels into one temporary folder that the other ranks then only read."""
    if args.no_peers:
        return None, None, "--no-peers"
    peers_dir = find_peers_dir(args)
    if peers_dir is None:
        return None, None, "no peers folder found (--peers-dir, $PEERS_DIR, .carry/peers, ../shared/peers)"
    sys.path.insert(0, peers_dir)
    rfa = fa2 = None
    note = f"ring-flash-attn from {peers_dir}"
    for turn in (0, 1):
        if (ring.rank == 0) == (turn == 0):
            try:
                import peers
                rfa = peers.ring_flash_attn()
                import flash_attn as fa2
            except Exception as error:  # a broken peer must not stop the measurement of ours
                note = f"ring-flash-attn did not import: {first_line(error)}"
        ring.barrier()
    if ring.max([0.0 if rfa is not None else 1.0])[0]:
        return None, None, note if rfa is None else "ring-flash-attn did not import on every rank"
    return rfa, fa2, note


def load_yunchang(args, ring, peers_dir_loaded):
    """yunchang's LongContextAttention over one Ulysses group of every rank, or None, and a note.
    Rank 0 imports first, as in load_peers."""
    if not args.usp or not peers_dir_loaded:
        return None, "yunchang not measured (needs --usp and the peers folder)"
    attention, note = None, "yunchang 0.6.4 from the peers folder"
    for turn in (0, 1):
        if (ring.rank == 0) == (turn == 0):
            try:
                import peers
                yc = peers.yunchang()
                from yunchang.kernels import AttnType
                yc.set_seq_parallel_pg(ring.world, 1, ring.rank, ring.world)
                attention = yc.LongContextAttention(ring_impl_type="zigzag", attn_type=AttnType.FA)
            except Exception as error:  # a broken peer must not stop the measurement of ours
                note = f"yunchang did not import: {first_line(error)}"
        ring.barrier()
    if ring.max([0.0 if attention is not None else 1.0])[0]:
        return None, note if attention is None else "yunchang did not import on every rank"
    return attention, note


def make_step(torch, fn, tensors, mode):
    q, k, v, dout = tensors
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v)
    else:
        def step():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)
    return step


def timed_seconds(torch, ring, step, iters):
    """Seconds for `iters` steps: CUDA events on every rank, started together, slowest rank's time."""
    ring.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    end.synchronize()
    return ring.max([start.elapsed_time(end) / 1e3])[0]


def measure(torch, ring, args, step, rejects_as):
    """One row's numbers. Every rank takes the same branch: failures are agreed on by all-reduce,
    and the iteration count comes from the slowest rank's probe."""
    error = None
    try:
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as e:
        error = e
    if ring.max([1.0 if error is not None else 0.0])[0]:
        if error is None:
            return {"status": "error", "error": "failed on another rank"}
        status = "rejects" if isinstance(error, rejects_as) else "error"
        return {"status": status, "error": first_line(error)}
    if args.iters:
        iters = args.iters
    else:
        probe = 3
        per_iter = timed_seconds(torch, ring, step, probe) / probe
        iters = int(min(max(round(args.target_s / per_iter), args.min_iters), args.max_iters))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed_seconds(torch, ring, step, iters)
    peak = torch.cuda.max_memory_allocated()
    peak_mib, extra_mib, before_mib = ring.max([peak / 2**20, (peak - before) / 2**20, before / 2**20])
    return {"status": "ok", "iters": iters, "seconds": seconds, "iter_s": iters / seconds,
            "mem_peak_mib": round(peak_mib, 1), "mem_extra_mib": round(extra_mib, 1),
            "mem_before_mib": round(before_mib, 1)}


def shards(torch, ring_attn_ext, ring, cfg, args):
    """{layout: (q, k, v, dout)}: this rank's part of one set of global tensors, in each layout."""
    torch.manual_seed(args.seed)  # identical global tensors on every rank
    seqlen = cfg.seqlen_local * ring.world
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    q_shape, kv_shape = (1, seqlen, cfg.heads, cfg.head_dim), (1, seqlen, cfg.heads_kv, cfg.head_dim)
    full = (torch.randn(q_shape, **kw), torch.randn(kv_shape, **kw), torch.randn(kv_shape, **kw),
            torch.randn(q_shape, **kw))  # q, k, v, dout
    result = {}
    for layout in LAYOUTS:
        q, k, v, dout = (ring_attn_ext.shard(t, layout, ring.rank, ring.world) for t in full)
        result[layout] = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout)
    if args.usp:
        q, k, v, dout = (ring_attn_ext.shard(t, "zigzag", ring.rank, ring.world, ulysses_degree=ring.world)
                         for t in full)
        result["ulysses"] = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout)
    return result


def bench_config(torch, ring, args, cfg, ours, rfa, fa2_local, usp_groups, yc_attention):
    """All rows of one configuration."""
    import ring_attn_ext
    data = shards(torch, ring_attn_ext, ring, cfg, args)
    torch.cuda.empty_cache()
    c = cfg.causal
    # (impl, layout, callable on (q, k, v) or None, why it is missing, tensors)
    runs = [("ours_local", None, lambda q, k, v: ring_attn_ext.flash_attn_func(q, k, v, causal=c), None, data["ring"])]
    if fa2_local is not None:
        runs.append(("fa2_local", None, lambda q, k, v: fa2_local.flash_attn_func(q, k, v, causal=c), None,
                     data["ring"]))
    for impl, module in (("ours", ours), ("rfa", rfa)):
        if module is None:
            continue
        for layout in args.layouts:
            fn = getattr(module, FUNCTION_NAMES[layout], None)
            why = None if fn is not None else f"{module.__name__} has no {FUNCTION_NAMES[layout]}"
            runs.append((impl, layout, None if fn is None else (lambda q, k, v, fn=fn: fn(q, k, v, causal=c)), why,
                         data[layout]))
    if usp_groups is not None:
        runs.append(("ours_usp", "ulysses", lambda q, k, v: ring_attn_ext.usp_attn_func(
            q, k, v, causal=c, groups=usp_groups, layout="zigzag"), None, data["ulysses"]))
    if yc_attention is not None:
        runs.append(("yc_usp", "ulysses", lambda q, k, v: yc_attention(q, k, v, causal=c), None, data["ulysses"]))

    rows = []
    for mode in args.modes:
        for impl, layout, fn, why, tensors in runs:
            row = {"config": cfg.name, "seqlen_local": cfg.seqlen_local, "heads": cfg.heads, "heads_kv": cfg.heads_kv,
                   "head_dim": cfg.head_dim, "causal": c, "dtype": "bf16", "mode": mode, "impl": impl, "layout": layout}
            if fn is None:
                row.update(status="error", error=why)
            else:
                # ring-flash-attn (and yunchang's copy of its zigzag ring) asserts causal for zigzag and stripe:
                # that is a rejection, not a failure.
                rejects_as = AssertionError if impl in ("rfa", "yc_usp") else ()
                row.update(measure(torch, ring, args, make_step(torch, fn, tensors, mode), rejects_as))
            rows.append(row)
            torch.cuda.empty_cache()
    # After the timed rows: ring-flash-attn's transfers go through torch's NCCL process group, which
    # may keep their buffers alive until its next operation, and our rows (which do not use it) would
    # count them in mem_before_mib and mem_peak_mib (s32k in session 5: 768 MiB, 3 x its K/V buffers).
    diffs = forward_differences(torch, ring, cfg, args, ours, rfa, data) if rfa is not None else {}
    for row in rows:
        if row["impl"] == "ours" and row["mode"] == "fwd" and row["layout"] in diffs:
            row["max_abs_diff_vs_rfa"] = diffs[row["layout"]]
    add_efficiency(rows, ring.world)
    return rows


def forward_differences(torch, ring, cfg, args, ours, rfa, data):
    """{layout: max |ours - rfa|} of the forward outputs on the same shards, over all ranks. Without
    a causal mask every layout computes plain attention, so rfa's ring function is the reference
    where rfa rejects the layout."""
    diffs = {}
    for layout in args.layouts:
        mine = getattr(ours, FUNCTION_NAMES[layout], None)
        theirs = getattr(rfa, FUNCTION_NAMES[layout if cfg.causal else "ring"])
        if mine is None:
            continue
        q, k, v, _ = data[layout]
        try:
            with torch.no_grad():
                diff = mine(q, k, v, causal=cfg.causal).float() - theirs(q, k, v, causal=cfg.causal).float()
            value = diff.abs().max().item()
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError):
            value = float("nan")  # the measurement of this layout records the error itself
        diffs[layout] = ring.max([value])[0]
    return diffs


def add_efficiency(rows, world):
    """efficiency against our single-GPU kernel, efficiency_own_kernel against the implementation's
    own (ours: ours_local, rfa: fa2_local), both as iter/s over (local iter/s / N)."""
    local = {(r["impl"], r["mode"]): r["iter_s"] for r in rows
             if r["impl"] in ("ours_local", "fa2_local") and r["status"] == "ok"}
    own = {"ours": "ours_local", "rfa": "fa2_local", "ours_local": "ours_local", "fa2_local": "fa2_local",
           "ours_usp": "ours_local", "yc_usp": "fa2_local"}
    for r in rows:
        if r["status"] != "ok":
            continue
        base = local.get(("ours_local", r["mode"]))
        if base is not None and r["layout"] is not None:
            r["theoretic_iter_s"] = base / world
            r["efficiency"] = r["iter_s"] / (base / world)
        own_base = local.get((own[r["impl"]], r["mode"]))
        if own_base is not None and r["layout"] is not None:
            r["efficiency_own_kernel"] = r["iter_s"] / (own_base / world)


def table_cell(row):
    """A row's 15-character table cell: iter/s, with the efficiency where there is one, or its
    status when it did not run; "-" for no row."""
    if row is None:
        return f"{'-':>15}"
    if row["status"] != "ok":
        return f"{row['status']:>15}"
    if "efficiency" in row:
        return f"{row['iter_s']:8.1f} ({100 * row['efficiency']:3.0f}%)"
    return f"{row['iter_s']:15.1f}"


def format_table(rows, layouts, usp=False):
    """One line per (config, mode): local kernels' iter/s, then each ring's iter/s and efficiency."""
    columns = [("ours_local", None), ("fa2_local", None)] + [(i, l) for i in ("ours", "rfa") for l in layouts]
    titles = ["ours-1gpu", "fa2-1gpu"] + [f"{i} {l}" for i, l in columns[2:]]
    if usp:
        columns += [("ours_usp", "ulysses"), ("yc_usp", "ulysses")]
        titles += ["ours ulysses", "yc ulysses"]
    header = f"{'config':22} {'mode':7} " + " ".join(f"{t:>15}" for t in titles)
    lines = [header, "-" * len(header)]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["config"], r["mode"]), {})[(r["impl"], r["layout"])] = r
    for (config, mode), by_key in keyed.items():
        cells = [table_cell(by_key.get(key)) for key in columns]
        lines.append(f"{config:22} {mode:7} " + " ".join(cells))
    return "\n".join(lines)


def run(args, rank, world, local_rank):
    import torch
    import torch.distributed as dist
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        ring = Ring(torch, dist)
        import ring_attn_ext
        rfa, fa2_local, peers_note = load_peers(args, ring)
        usp_groups = ring_attn_ext.usp_groups(world) if args.usp else None
        yc_attention, yc_note = load_yunchang(args, ring, rfa is not None)
        if args.usp:
            peers_note += "; " + yc_note
        meta = bench_common.run_metadata(torch)
        meta.update(world_size=world, peers=peers_note, configs=[c.name for c in args.configs],
                    timing=timing_metadata(args))
        out_path = args.out or os.path.join(bench_common.RESULTS_DIR,
                                            f"ring_{bench_common.gpu_slug(meta['gpu'])}_w{world}.json")
        if rank == 0:
            print(f"{meta['gpu']} x{world}, torch {meta['torch']}; {peers_note}", flush=True)
            print(format_table([], args.layouts, args.usp), flush=True)
        rows = []
        for cfg in args.configs:
            new_rows = bench_config(torch, ring, args, cfg, ring_attn_ext, rfa, fa2_local, usp_groups, yc_attention)
            rows += new_rows
            if rank == 0:
                for r in new_rows:
                    if r["status"] == "error":
                        print(f"  {cfg.name} {r['mode']} {r['impl']} {r['layout']}: {r['error']}", flush=True)
                print(format_table(new_rows, args.layouts, args.usp).split("\n", 2)[2], flush=True)  # rows only
                bench_common.write_json(out_path, dict(meta, rows=rows))
        if rank == 0:
            print()
            print(format_table(rows, args.layouts, args.usp))
            print(f"\nwrote {out_path}")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    bench_common.launch(run, parse_args(argv), "bench_ring.py")


if __name__ == "__main__":
    main()
