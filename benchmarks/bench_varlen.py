"""Packed variable-length sequences on the GPUs of one host: ours against ring-flash-attn 0.1.8's
functions of the same names (llama3_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_func);
and each GPU alone on the whole packed stream, ours (flash_attn_varlen_func) against PyTorch's
FlashAttention-2 varlen kernels. Forward and forward+backward iterations per second.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_varlen.py      # or:
    python3 benchmarks/bench_varlen.py --nproc 2                             # spawns its own processes
    python3 benchmarks/bench_varlen.py --quick                               # short timing

A configuration is a packed stream of N * chunk tokens (N ranks; bf16, d 128, 32 query heads,
h_kv key/value heads, causal) cut into sequences whose lengths are drawn uniformly from a range and
rounded up to multiples of 2N (seeded, the same on every rank; the last one is cut where the stream
ends). For llama3, rank r holds tokens r * chunk : (r + 1) * chunk; for zigzag, its two chunks of
2N of every sequence.
Rows (time = the slowest rank's loop time / iterations, as in bench_ring.py):
  ours_1gpu, fa2_1gpu  every GPU alone on the whole stream: flash_attn_varlen_func and PyTorch's
                       FlashAttention-2 varlen kernels (aten::_flash_attention_forward/backward with
                       cumulative lengths); each is one kernel launch for all sequences.
  ours, rfa            llama3_flash_attn_varlen_func across the N ranks, heads_k_stride = h_kv
                       (--heads-k-stride to change), on cu_seqlens from each library's own
                       llama3_flash_attn_prepare_cu_seqlens.
  ours_zigzag,         zigzag_ring_flash_attn_varlen_func on the zigzag shards (ours gathers K/V,
  rfa_zigzag           heads_k_stride as above; ring-flash-attn passes them around its ring).
efficiency = iter/s / (N * ours_1gpu iter/s): the one-GPU rows run the whole stream, which N ranks
share, so a perfect split runs N times as many iterations per second; efficiency_own_kernel divides
by the implementation's own single-GPU kernel instead (ring-flash-attn: fa2_1gpu). Every forward of ours is compared with
ring-flash-attn's on the same shards (max_abs_diff_vs_rfa).

ring-flash-attn's llama3 functions call flash-attn's _flash_attn_varlen_forward/backward, which
the peers' flash_attn stand-in does not provide: this script gives them to it, on PyTorch's
varlen kernels. Peers are found as bench_ring.py finds them. Rank 0 prints a table and writes
benchmarks/results/varlen_<gpu>_w<N>.json after every configuration.
"""
import os

# NVLink multicast stays off (see bench_ring.py); set before NCCL or torch.distributed initialise.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import bench_common  # noqa: E402
from bench_ring import (Ring, add_run_arguments, load_peers, make_step, measure, table_cell,  # noqa: E402
                        timing_metadata)

MODES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    chunk: int          # tokens per rank
    min_len: int        # sequence lengths drawn uniformly from [min_len, max_len]
    max_len: int
    heads: int = 32
    heads_kv: int = 8
    head_dim: int = 128


CONFIGS = (Config("long_s16k_kv8", 16384, 2048, 16384), Config("short_s16k_kv8", 16384, 128, 1024),
           Config("tiny_s16k_kv8", 16384, 32, 256), Config("long_s16k_kv32", 16384, 2048, 16384, heads_kv=32))


def sequence_bounds(total, min_len, max_len, seed, unit=1):
    """cu_seqlens (a list) of a stream of `total` tokens (a multiple of unit) cut into lengths drawn
    uniformly from [min_len, max_len] and rounded up to multiples of unit; the last sequence ends
    with the stream."""
    rng = random.Random(seed)
    bounds = [0]
    while bounds[-1] < total:
        length = -(-rng.randint(min_len, max_len) // unit) * unit
        bounds.append(min(total, bounds[-1] + length))
    return bounds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ", ".join(c.name for c in CONFIGS)
    p.add_argument("--configs", default="all", help=f"'all' (default) or a comma list of: {names}")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, fwd_bwd")
    p.add_argument("--heads-k-stride", type=int, default=0, help="k/v heads per all-gather (default: all of them)")
    add_run_arguments(p)
    p.add_argument("--quick", action="store_true", help="--target-s 0.3")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/varlen_<gpu>_w<N>.json)")
    args = p.parse_args(argv)
    by_name = {c.name: c for c in CONFIGS}
    if args.configs == "all":
        args.configs = list(CONFIGS)
    else:
        unknown = [n for n in bench_common.parse_list(args.configs) if n not in by_name]
        if unknown:
            p.error(f"--configs: unknown {unknown}; known: {names}")
        args.configs = [by_name[n] for n in bench_common.parse_list(args.configs)]
    if args.quick:
        args.target_s = 0.3
    args.modes = bench_common.parse_list(args.modes)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: {bad} not among {list(MODES)}")
    return args


def torch_varlen_kernels(torch):
    """(forward, backward, attention) on PyTorch's FlashAttention-2 varlen kernels: forward and
    backward with flash-attn 2.6's _flash_attn_varlen_forward/backward signatures (ring-flash-attn
    fills their arguments from these defaults), attention(q, k, v, cu_seqlens, max_seqlen) -> out
    with autograd, causal."""
    aten = torch.ops.aten

    def window(size):
        return None if size is None or size < 0 else int(size)

    def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                return_softmax=False, block_table=None):
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and block_table is None
        out, lse, *_ = aten._flash_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, False,
            scale=softmax_scale, window_size_left=window(window_size_left), window_size_right=window(window_size_right))
        return out, lse, None, None

    def gradients(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  softmax_scale, causal, window_size_left=-1, window_size_right=-1):
        """(dq, dk, dv), allocated by PyTorch's kernel."""
        seed = torch.zeros(2, dtype=torch.int64, device=q.device)  # no dropout: the philox state is unused
        offset = torch.empty(0, device=q.device)
        return aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            0.0, causal, seed, offset, scale=softmax_scale, window_size_left=window(window_size_left),
            window_size_right=window(window_size_right))[:3]

    def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p=0.0, softmax_scale=None, causal=False, window_size_left=-1, window_size_right=-1,
                 softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None):
        # flash-attn's kernel writes into the caller's dq, dk, dv; PyTorch's allocates its own, so
        # ring-flash-attn pays one copy of the gradients here that it would not pay on flash-attn.
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
        grads = gradients(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_size_left, window_size_right)
        for destination, grad in zip((dq, dk, dv), grads):
            destination.copy_(grad)
        return dq, dk, dv, None

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu_seqlens, max_seqlen):
            scale = q.shape[-1] ** -0.5
            out, lse, _, _ = forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale,
                                     causal=True)
            ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
            ctx.max_seqlen, ctx.scale = max_seqlen, scale
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
            dq, dk, dv = gradients(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
                                   ctx.scale, True)
            return dq, dk, dv, None, None

    return forward, backward, lambda q, k, v, cu_seqlens, max_seqlen: Attention.apply(q, k, v, cu_seqlens, max_seqlen)


def give_rfa_varlen_kernels(rfa, forward, backward):
    """ring-flash-attn's varlen modules (llama3, ring, zigzag) imported flash-attn's varlen
    functions by name at import: each gets these instead."""
    for name, module in list(sys.modules.items()):
        if name.startswith(rfa.__name__ + ".") and hasattr(module, "_flash_attn_varlen_forward"):
            module._flash_attn_varlen_forward, module._flash_attn_varlen_backward = forward, backward


def bench_config(torch, ring, args, cfg, rfa, torch_attention, device="cuda"):
    """All rows of one configuration (device: where the tensors live; CUDA but in the tests)."""
    import ring_attn_ext as ra
    torch.manual_seed(args.seed)  # identical global tensors on every rank
    total = cfg.chunk * ring.world
    bounds = sequence_bounds(total, cfg.min_len, cfg.max_len, args.seed, unit=2 * ring.world)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    kw = {"device": device, "dtype": torch.bfloat16}
    full = [torch.randn(total, heads, cfg.head_dim, **kw) for heads in (cfg.heads, cfg.heads_kv, cfg.heads_kv,
                                                                        cfg.heads)]
    rows_of_rank = slice(ring.rank * cfg.chunk, (ring.rank + 1) * cfg.chunk)
    local = [t[rows_of_rank].clone() for t in full]
    for tensors in (full, local):
        for t in tensors[:3]:
            t.requires_grad_()
    stride = args.heads_k_stride or cfg.heads_kv
    zigzag_rows = torch.cat([begin + ra.positions(end - begin, "zigzag", ring.rank, ring.world, device=device)
                             for begin, end in zip(bounds, bounds[1:])])
    zigzag = [t[zigzag_rows].detach().clone().requires_grad_(t.requires_grad) for t in full]
    cu_local, longest_local = cu // ring.world, longest // ring.world

    def parallel_functions(library):
        """{impl suffix: (callable on (q, k, v), tensors)} of one library's llama3 and zigzag varlen."""
        prepared = library.llama3_flash_attn_prepare_cu_seqlens(cu, True, ring.rank, ring.world)
        extra = {"heads_k_stride": stride} if library is ra else {}
        return {"llama3": (lambda q, k, v: library.llama3_flash_attn_varlen_func(
                    q, k, v, *prepared[:4], stride, prepared[4], causal=True), local),
                "zigzag": (lambda q, k, v: library.zigzag_ring_flash_attn_varlen_func(
                    q, k, v, cu_local, longest_local, causal=True, **extra), zigzag)}

    # (impl, callable on (q, k, v), tensors (q, k, v, dout))
    runs = [("ours_1gpu", lambda q, k, v: ra.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True),
             full),
            ("fa2_1gpu", lambda q, k, v: torch_attention(q, k, v, cu, longest), full)]
    libraries = {"ours": parallel_functions(ra)}
    if rfa is not None:
        libraries["rfa"] = parallel_functions(rfa)
    for library, functions in libraries.items():
        runs += [(f"{library}_{kind}", fn, tensors) for kind, (fn, tensors) in functions.items()]
    rows = []
    for mode in args.modes:
        for impl, fn, tensors in runs:
            row = {"config": cfg.name, "chunk": cfg.chunk, "sequences": len(bounds) - 1, "longest": longest,
                   "heads": cfg.heads, "heads_kv": cfg.heads_kv, "head_dim": cfg.head_dim, "heads_k_stride": stride,
                   "causal": True, "dtype": "bf16", "mode": mode, "impl": impl}
            row.update(measure(torch, ring, args, make_step(torch, fn, tensors, mode), ()))
            rows.append(row)
            torch.cuda.empty_cache()
    if rfa is not None:
        for kind, (ours_fn, tensors) in libraries["ours"].items():
            try:
                with torch.no_grad():
                    diff = (ours_fn(*tensors[:3]).float() - libraries["rfa"][kind][0](*tensors[:3]).float())
                value = diff.abs().max().item()
            except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError):
                value = float("nan")  # the timed rows record the error itself
            value = ring.max([value])[0]
            for row in rows:
                if row["impl"] == f"ours_{kind}" and row["mode"] == "fwd":
                    row["max_abs_diff_vs_rfa"] = value
    add_efficiency(rows, ring.world)
    return rows


def add_efficiency(rows, world):
    """efficiency of the multi-GPU rows against N * ours_1gpu (one GPU runs the whole stream that the
    N ranks share), efficiency_own_kernel against N times the implementation's own single-GPU
    kernel (ours: ours_1gpu, rfa: fa2_1gpu)."""
    single = {(r["config"], r["impl"], r["mode"]): r["iter_s"] for r in rows
              if r["impl"] in ("ours_1gpu", "fa2_1gpu") and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok" or r["impl"] in ("ours_1gpu", "fa2_1gpu"):
            continue
        base = single.get((r["config"], "ours_1gpu", r["mode"]))
        if base is not None:
            r["efficiency"] = r["iter_s"] / (base * world)
        own = single.get((r["config"], "ours_1gpu" if r["impl"].startswith("ours") else "fa2_1gpu", r["mode"]))
        if own is not None:
            r["efficiency_own_kernel"] = r["iter_s"] / (own * world)


def format_table(rows):
    """One line per (config, mode): the single-GPU rows' iter/s, then each multi-GPU row's iter/s and
    efficiency."""
    titles = {"ours_1gpu": "ours-1gpu", "fa2_1gpu": "fa2-1gpu", "ours_llama3": "ours llama3",
              "rfa_llama3": "rfa llama3", "ours_zigzag": "ours zigzag", "rfa_zigzag": "rfa zigzag"}
    header = f"{'config':18} {'seqs':>5} {'mode':7} " + " ".join(f"{t:>15}" for t in titles.values())
    lines = [header, "-" * len(header)]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["config"], r["sequences"], r["mode"]), {})[r["impl"]] = r
    for (config, sequences, mode), by_impl in keyed.items():
        cells = [table_cell(by_impl.get(impl)) for impl in titles]
        lines.append(f"{config:18} {sequences:5d} {mode:7} " + " ".join(cells))
    return "\n".join(lines)


def run(args, rank, world, local_rank):
    import torch
    import torch.distributed as dist
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        ring = Ring(torch, dist)
        rfa, _, peers_note = load_peers(args, ring)
        forward, backward, torch_attention = torch_varlen_kernels(torch)
        if rfa is not None:
            give_rfa_varlen_kernels(rfa, forward, backward)
        meta = bench_common.run_metadata(torch)
        meta.update(world_size=world, peers=peers_note, configs=[dataclasses.asdict(c) for c in args.configs],
                    timing=timing_metadata(args))
        out_path = args.out or os.path.join(bench_common.RESULTS_DIR,
                                            f"varlen_{bench_common.gpu_slug(meta['gpu'])}_w{world}.json")
        if rank == 0:
            print(f"{meta['gpu']} x{world}, torch {meta['torch']}; {peers_note}", flush=True)
        rows = []
        for cfg in args.configs:
            new_rows = bench_config(torch, ring, args, cfg, rfa, torch_attention)
            rows += new_rows
            if rank == 0:
                for r in new_rows:
                    if r["status"] != "ok":
                        print(f"  {cfg.name} {r['mode']} {r['impl']}: {r.get('error', '')}", flush=True)
                bench_common.write_json(out_path, dict(meta, rows=rows))
        if rank == 0:
            print(format_table(rows))
            print(f"\nwrote {out_path}")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    bench_common.launch(run, parse_args(argv), "bench_varlen.py")


if __name__ == "__main__":
    main()
