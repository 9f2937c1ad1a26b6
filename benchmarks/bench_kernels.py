"""Single-GPU attention kernels: ours against PyTorch's FlashAttention-2 and cuDNN SDPA kernels.

    python3 benchmarks/bench_kernels.py                  # the full grid (a few minutes on an H100)
    python3 benchmarks/bench_kernels.py --quick          # bf16, d 64/128, s 1k/4k/16k
    python3 benchmarks/bench_kernels.py --dtypes bf16 --head-dims 128 --seqlens 4k,16k --causal true

Measured per shape (b * s = --tokens, h = --hidden / d, h_kv = h, s_q = s_k = s) and per provider:
  fwd: the training forward (inputs require grad, so every kernel also writes its log-sum-exp);
       ours through ring_attn_ext.flash_attn_func, PyTorch's through scaled_dot_product_attention
       restricted to one backend (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION) on
       (b, h, s, d) views of the same (b, s, h, d) tensors.
  bwd: the backward alone, given the forward's results: ours through ring_attn_ext._C.bwd(dout, q,
       k, v, out, lse, ...), PyTorch's through torch.autograd.grad on a retained graph (one aten
       backward op per call, no gradient accumulation).
TFLOP/s by FlashAttention's convention: fwd 4*b*h*s_q*s_k*d, halved when causal; bwd 2.5x fwd.
Times are medians over many calls, each bracketed by CUDA events, after a warm-up; inputs rotate
among several copies when one set would fit in L2. Peak memory: torch.cuda.max_memory_allocated
during one call, minus what was allocated before it (the call's own outputs and workspace).
Writes every row, with the GPU, versions, date and command line, to
benchmarks/results/kernels_<gpu>.json (rewritten after every shape, so a killed run keeps its rows).
"""
import argparse
import contextlib
import math
import os
import statistics
import sys

import bench_common

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
PROVIDERS = ("ours", "fa2", "cudnn")
DEFAULT_SEQLENS = "1k,2k,4k,8k,16k"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16 (default: both)")
    p.add_argument("--head-dims", default="64,128", help="comma list (default: 64,128)")
    p.add_argument("--seqlens", default=DEFAULT_SEQLENS,
                   help=f"comma list, k suffix allowed (default: {DEFAULT_SEQLENS})")
    p.add_argument("--tokens", default="32k",
                   help="comma list of batch*seqlen totals; batch = tokens // seqlen (default: 32k)")
    p.add_argument("--hidden", type=int, default=2048, help="heads * head_dim (default: 2048)")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--modes", default="fwd,bwd", help="comma list of fwd, bwd (default: both)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--warmup-ms", type=float, default=30.0, help="warm-up time per measurement (default: 30)")
    p.add_argument("--rep-ms", type=float, default=150.0, help="timed time per measurement (default: 150)")
    p.add_argument("--quick", action="store_true",
                   help="bf16, d 64 and 128, s 1k/4k/16k, shorter timing: a smoke run in well under a minute")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernels_<gpu>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.dtypes, args.seqlens, args.warmup_ms, args.rep_ms = "bf16", "1k,4k,16k", 10.0, 40.0
    args.dtypes = bench_common.parse_list(args.dtypes)
    args.head_dims = bench_common.parse_list(args.head_dims, int)
    args.seqlens = bench_common.parse_list(args.seqlens, bench_common.parse_size)
    args.tokens = bench_common.parse_list(args.tokens, bench_common.parse_size)
    args.causal = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    args.modes = bench_common.parse_list(args.modes)
    args.providers = bench_common.parse_list(args.providers)
    for name, values, allowed in (("--dtypes", args.dtypes, DTYPES), ("--modes", args.modes, ("fwd", "bwd")),
                                  ("--providers", args.providers, PROVIDERS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: {bad} not among {list(allowed)}")
    for d in args.head_dims:
        if args.hidden % d:
            p.error(f"--hidden {args.hidden} is not a multiple of head dim {d}")
    return args


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, mode):
    flops = 4 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        flops //= 2
    return flops * 5 // 2 if mode == "bwd" else flops


class Timer:
    """Median time of fn(i) over many calls, each between two CUDA events. fn(i) runs on input
    set i % n_sets, so inputs that fit in L2 are not timed out of the cache."""

    def __init__(self, torch, warmup_ms, rep_ms):
        self.torch, self.warmup_ms, self.rep_ms = torch, warmup_ms, rep_ms

    def median_ms(self, fn, n_sets):
        torch = self.torch
        fn(0)  # first call: module load, handle creation, cuDNN plan building
        torch.cuda.synchronize()
        probe = 5
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(probe):
            fn(i % n_sets)
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / probe, 1e-3)
        for i in range(max(1, int(self.warmup_ms / estimate))):
            fn(i % n_sets)
        reps = min(max(int(self.rep_ms / estimate), 10), 2000)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(i % n_sets)
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), reps


def peak_memory_mib(torch, fn):
    """(MiB allocated above the level before one call, absolute peak MiB) for one call of fn."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20, peak / 2**20


class Ours:
    name = "ours"

    def __init__(self, torch):
        import ring_attn_ext
        from ring_attn_ext._extension import require_extension
        self.torch, self.api, self.ext = torch, ring_attn_ext, require_extension("benchmarks/bench_kernels.py")

    def context(self):
        return contextlib.nullcontext()

    def forward(self, q, k, v, causal, scale):
        return self.api.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)

    def backward_fn(self, q, k, v, dout, causal, scale):
        band = self.api.band_for(q.shape[1], k.shape[1], causal)
        q, k, v = (t.detach() for t in (q, k, v))
        out, lse = self.ext.fwd(q, k, v, scale, *band)
        return lambda: self.ext.bwd(dout, q, k, v, out, lse, scale, *band)

    def output_bshd(self, out):
        return out


class TorchSDPA:
    """scaled_dot_product_attention restricted to one backend; (b, h, s, d) views of our tensors."""

    def __init__(self, torch, name, backend):
        from torch.nn.attention import sdpa_kernel
        self.torch, self.name, self.backend, self.sdpa_kernel = torch, name, backend, sdpa_kernel

    def context(self):
        return self.sdpa_kernel(self.backend)

    def forward(self, q, k, v, causal, scale):
        f = self.torch.nn.functional.scaled_dot_product_attention
        return f(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale)

    def backward_fn(self, q, k, v, dout, causal, scale):
        out = self.forward(q, k, v, causal, scale)
        dout_t = dout.transpose(1, 2)
        return lambda: self.torch.autograd.grad(out, (q, k, v), dout_t, retain_graph=True)

    def output_bshd(self, out):
        return out.transpose(1, 2)


def make_providers(torch, names):
    """Providers that can run here; the others come back as (name, reason) to record as skipped."""
    from torch.nn.attention import SDPBackend
    providers, skipped = [], []
    for name in names:
        if name == "ours":
            try:
                providers.append(Ours(torch))
            except RuntimeError as error:
                skipped.append((name, str(error)))
        elif name == "fa2":
            providers.append(TorchSDPA(torch, "fa2", SDPBackend.FLASH_ATTENTION))
        elif name == "cudnn":
            if torch.backends.cudnn.is_available():
                providers.append(TorchSDPA(torch, "cudnn", SDPBackend.CUDNN_ATTENTION))
            else:
                skipped.append((name, "cuDNN is not available in this torch build"))
    return providers, skipped


def first_line(error):
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:300]


def make_call(provider, mode, sets, causal, scale):
    """fn(i): one timed call of `provider` in `mode` on input set i. For bwd, the forwards run here,
    once per set, so that only the backward is timed."""
    if mode == "fwd":
        def fn(i):
            q, k, v, _ = sets[i]
            return provider.forward(q, k, v, causal, scale)
        return fn
    backward = [provider.backward_fn(q, k, v, dout, causal, scale) for q, k, v, dout in sets]
    return lambda i: backward[i]()


def bench_shape(torch, args, timer, providers, shape):
    """All rows of one shape: every provider, every mode."""
    dtype_name, head_dim, seqlen, batch, causal = shape
    heads = args.hidden // head_dim
    dtype = getattr(torch, DTYPES[dtype_name])
    scale = head_dim ** -0.5
    tensor_bytes = batch * seqlen * heads * head_dim * torch.finfo(dtype).bits // 8
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    set_bytes = 5 * tensor_bytes  # q, k, v, dout, out
    n_sets = 1 if set_bytes >= 2 * l2_bytes else min(16, math.ceil(2 * l2_bytes / set_bytes))
    sets = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype).requires_grad_()
                   for _ in range(3))
        sets.append((q, k, v, torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)))

    base = {"dtype": dtype_name, "head_dim": head_dim, "seqlen": seqlen, "batch": batch, "heads": heads,
            "causal": causal, "input_sets": n_sets}
    rows, outputs = [], {}
    for provider in providers:
        for mode in args.modes:
            row = dict(base, provider=provider.name, mode=mode)
            try:
                with provider.context():
                    if mode == "fwd":
                        with torch.no_grad():
                            q, k, v, _ = sets[0]
                            outputs[provider.name] = provider.output_bshd(provider.forward(q, k, v, causal, scale))
                    fn = make_call(provider, mode, sets, causal, scale)
                    ms, reps = timer.median_ms(fn, n_sets)
                    extra_mib, peak_mib = peak_memory_mib(torch, fn)
                flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, mode)
                row.update(status="ok", ms=ms, reps=reps, tflops=flops / (ms * 1e-3) / 1e12,
                           mem_extra_mib=round(extra_mib, 1), mem_peak_mib=round(peak_mib, 1))
            except torch.cuda.OutOfMemoryError as error:
                row.update(status="oom", error=first_line(error))
            except (RuntimeError, ValueError, TypeError) as error:
                # An SDPA backend that cannot take this shape ("No available kernel"), or a head dim or
                # dtype this build of ours did not compile: record it and go on.
                row.update(status="error", error=first_line(error))
            fn = None  # drops retained graphs and gradients before the next measurement
            torch.cuda.empty_cache()
            rows.append(row)
    if "ours" in outputs and "fa2" in outputs:
        # A fast wrong kernel is worthless: record how far our output is from FlashAttention-2's.
        diff = (outputs["ours"].float() - outputs["fa2"].float()).abs().max().item()
        for row in rows:
            if row["provider"] == "ours" and row["mode"] == "fwd":
                row["max_abs_diff_vs_fa2"] = diff
    del sets, outputs
    torch.cuda.empty_cache()
    return rows


def shapes(args):
    for dtype_name in args.dtypes:
        for head_dim in args.head_dims:
            for tokens in args.tokens:
                for seqlen in args.seqlens:
                    if tokens % seqlen:
                        continue
                    for causal in args.causal:
                        yield dtype_name, head_dim, seqlen, tokens // seqlen, causal


def format_table(rows, providers):
    """One line per (shape, mode): TFLOP/s of each provider, ours over FA2, extra memory."""
    lines = []
    header = (f"{'dtype':5} {'d':>4} {'causal':6} {'seqlen':>6} {'batch':>5} {'heads':>5} {'mode':4} | "
              + " ".join(f"{p:>8}" for p in providers) + f" | {'ours/fa2':>8} | MiB extra ("
              + "/".join(providers) + ")")
    lines += [header, "-" * len(header)]
    keyed = {}
    for row in rows:
        key = (row["dtype"], row["head_dim"], row["causal"], row["seqlen"], row["batch"], row["heads"], row["mode"])
        keyed.setdefault(key, {})[row["provider"]] = row
    for key, by_provider in keyed.items():
        dtype_name, head_dim, causal, seqlen, batch, heads, mode = key
        cells, mems = [], []
        for p in providers:
            row = by_provider.get(p)
            ok = row is not None and row["status"] == "ok"
            cells.append(f"{row['tflops']:8.1f}" if ok else f"{(row or {}).get('status', '-'):>8}")
            mems.append(f"{row['mem_extra_mib']:.0f}" if ok else "-")
        ours, fa2 = by_provider.get("ours"), by_provider.get("fa2")
        ratio = (f"{ours['tflops'] / fa2['tflops']:8.2f}"
                 if ours and fa2 and ours["status"] == fa2["status"] == "ok" else f"{'-':>8}")
        lines.append(f"{dtype_name:5} {head_dim:4d} {str(causal):6} {seqlen:6d} {batch:5d} {heads:5d} {mode:4} | "
                     + " ".join(cells) + f" | {ratio} | " + "/".join(mems))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    meta = bench_common.run_metadata(torch)
    out_path = args.out or os.path.join(bench_common.RESULTS_DIR, f"kernels_{bench_common.gpu_slug(meta['gpu'])}.json")
    providers, skipped = make_providers(torch, args.providers)
    for name, reason in skipped:
        print(f"skipping provider {name}: {reason}")
    meta.update(skipped_providers=dict(skipped), timing={"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                                                         "statistic": "median"})
    print(f"{meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}")
    timer = Timer(torch, args.warmup_ms, args.rep_ms)
    rows = []
    for shape in shapes(args):
        new_rows = bench_shape(torch, args, timer, providers, shape)
        rows += new_rows
        for row in new_rows:
            if row["status"] != "ok":
                print(f"  {row['provider']} {row['mode']} {shape}: {row['status']}: {row.get('error', '')}")
        bench_common.write_json(out_path, dict(meta, rows=rows))
    print()
    print(format_table(rows, [p.name for p in providers]))
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
