"""python -m ring_attn_ext: the main job.

Runs ring attention across the GPUs present (one process per GPU, NCCL) or, without a GPU, across
4 CPU processes (gloo); with --ulysses-degree U > 1, Ulysses x ring attention (usp_attn_func) on
Ulysses groups of U ranks; with --varlen, the packed-sequence functions (llama3, ring and zigzag
varlen) on one stream of random sequences. For each layout it shards one random global q/k/v (the
same on every rank), runs the drop-in function forward and backward on the shards, and checks every
rank's out, lse, dq, dk and dv against full attention on the unsharded tensors computed in float64, by
FlashAttention's rule: the ring's error is at most 2x (3x for gradients) the error of the same
attention computed by PyTorch in the input dtype, plus twice the error of rounding the exact
result to the input dtype and 1e-6. Prints one row per layout and exits non-zero on any failure.
"""
import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ._extension import has_extension
from .masks import band_for
from .llama3_attention import llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func
from .reference import attention_reference, masked_attention_reference
from .ring_flash_attn import ring_flash_attn_func, stripe_flash_attn_func, zigzag_ring_flash_attn_func
from .sharding import LAYOUTS, positions, ring_size, shard, tokens_per_rank
from .usp_attention import heads_kv_repeat, usp_attn_func
from .usp_process_groups import usp_groups
from .varlen_ring_attention import ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_func

FUNCTIONS = {"ring": ring_flash_attn_func, "zigzag": zigzag_ring_flash_attn_func, "stripe": stripe_flash_attn_func}
# --varlen: how the packed stream lies across the ranks ("llama3": equal contiguous chunks of the
# stream; "ring" / "zigzag": each sequence split on its own).
VARLEN_LAYOUTS = ("llama3", "ring", "zigzag")
VARLEN_FUNCTIONS = {"ring": ring_flash_attn_varlen_func, "zigzag": zigzag_ring_flash_attn_varlen_func}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
QUANTITIES = ("out", "lse", "dq", "dk", "dv")
FACTORS = {"out": 2, "lse": 2, "dq": 3, "dk": 3, "dv": 3}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m ring_attn_ext", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when a GPU is present and the CUDA extension was built, else cpu")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes in the ring (default: the number of GPUs, or 4 on CPU)")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="global sequence length (default: 4096 on CUDA, 256 on CPU); "
                             "a multiple of 2 * world-size for zigzag")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--layouts", default=None,
                        help=f"comma-separated subset of {', '.join(LAYOUTS)} (with --varlen: of "
                             f"{', '.join(VARLEN_LAYOUTS)}); default: all")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ulysses-degree", type=int, default=1,
                        help="ranks per Ulysses group: > 1 runs Ulysses x ring attention (usp_attn_func) on "
                             "world-size / ulysses-degree rings; 1: plain ring attention")
    parser.add_argument("--varlen", action="store_true",
                        help="packed variable-length sequences instead: one stream of --seqlen tokens cut into "
                             "random sequences (lengths multiples of 2 * world-size), through the llama3, ring "
                             "and zigzag varlen functions")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and has_extension() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if args.device == "cuda" and not has_extension():
        parser.error("--device cuda: the CUDA extension was not built (a pure-Python install runs on CPU "
                     "processes: --device cpu)")
    if args.world_size is None:
        args.world_size = torch.cuda.device_count() if args.device == "cuda" else 4
    if args.world_size < 1 or (args.device == "cuda" and args.world_size > torch.cuda.device_count()):
        parser.error(f"--world-size {args.world_size}: need 1 to {torch.cuda.device_count()} processes "
                     f"(one per GPU)" if args.device == "cuda" else f"--world-size {args.world_size} must be >= 1")
    if args.seqlen is None:
        args.seqlen = 4096 if args.device == "cuda" else 256
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    known = VARLEN_LAYOUTS if args.varlen else LAYOUTS
    args.layouts = [layout.strip() for layout in (args.layouts or ",".join(known)).split(",") if layout.strip()]
    unknown = [layout for layout in args.layouts if layout not in known]
    if unknown or not args.layouts:
        parser.error(f"--layouts: unknown {unknown}; choose from {', '.join(known)}")
    if args.varlen:
        if args.ulysses_degree != 1 or args.batch != 1:
            parser.error("--varlen packs the sequences along one token dimension and runs without Ulysses groups: "
                         "leave --batch and --ulysses-degree at 1")
        if args.seqlen < 1 or args.seqlen % (2 * args.world_size):
            parser.error(f"--seqlen: with --varlen the stream length must be a positive multiple of 2 * world-size "
                         f"= {2 * args.world_size}; got {args.seqlen}")
        return args
    degree = args.ulysses_degree
    try:
        ring_size(args.world_size, degree)
        heads_kv_repeat(args.heads, args.kv_heads, degree)
    except ValueError as error:
        parser.error(f"--ulysses-degree {degree}: {error}")
    for layout in args.layouts:
        try:
            tokens_per_rank(args.seqlen, layout, args.world_size, ulysses_degree=degree)
        except ValueError as error:
            parser.error(f"--seqlen: {error}")
    return args


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def check_layout(rank, world_size, layout, args, device, groups):
    """Errors of this rank's shards and the bounds they must meet, as {quantity: (error, bound)}.
    groups: the UspGroups of --ulysses-degree > 1, else None."""
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(20260101)  # the same global tensors on every rank

    def randn(heads):
        return torch.randn(args.batch, args.seqlen, heads, args.head_dim, generator=generator).to(device)

    q, k, v, dout = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads), randn(args.heads)
    band = band_for(args.seqlen, args.seqlen, args.causal)

    def mine(t, dim=1):
        return shard(t, layout, rank, world_size, dim=dim, ulysses_degree=args.ulysses_degree)

    def full_attention(compute_dtype, upcast):
        """Full attention on the unsharded tensors and its gradients (of sum(out * dout), i.e.
        backward with dout), as this rank's shards."""
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attention_reference(*leaves, None, *band, upcast=upcast)
        grads = torch.autograd.grad((out * dout.to(compute_dtype)).sum(), leaves)
        results = dict(out=out.detach(), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
        return {name: mine(t, dim=2 if name == "lse" else 1) for name, t in results.items()}

    exact = full_attention(torch.float64, upcast=True)
    same_dtype = full_attention(dtype, upcast=False)

    local = [mine(t).to(dtype).detach().requires_grad_() for t in (q, k, v)]
    if groups is None:
        out, lse, _ = FUNCTIONS[layout](*local, causal=args.causal, return_attn_probs=True)
    else:
        out, lse, _ = usp_attn_func(*local, causal=args.causal, return_attn_probs=True, groups=groups, layout=layout)
    (out * mine(dout).to(dtype)).sum().backward()
    ring = dict(out=out.detach(), lse=lse, dq=local[0].grad, dk=local[1].grad, dv=local[2].grad)
    return _report(ring, exact, same_dtype)


def packed_bounds(total, unit, generator):
    """cu_seqlens (a list) of `total` tokens cut into random sequences, lengths multiples of unit."""
    bounds = [0]
    while bounds[-1] < total:
        units = int(torch.randint(1, max(2, total // (4 * unit)) + 1, (1,), generator=generator))
        bounds.append(min(total, bounds[-1] + units * unit))
    return bounds


def check_varlen(rank, world_size, layout, args, device):
    """check_layout for the packed-sequence functions (--varlen): `layout` is one of VARLEN_LAYOUTS."""
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(20260102)  # the same stream on every rank
    bounds = packed_bounds(args.seqlen, 2 * world_size, generator)

    def randn(heads):
        return torch.randn(args.seqlen, heads, args.head_dim, generator=generator).to(device)

    q, k, v, dout = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads), randn(args.heads)
    sequence = torch.zeros(args.seqlen, dtype=torch.long, device=device)
    for begin in bounds[1:-1]:
        sequence[begin:] += 1
    visible = sequence[:, None] == sequence[None, :]
    if args.causal:
        visible &= torch.ones_like(visible).tril()
    if layout == "llama3":
        chunk = args.seqlen // world_size
        rows = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    else:
        rows = torch.cat([begin + positions(end - begin, layout, rank, world_size, device=device)
                          for begin, end in zip(bounds, bounds[1:])])

    def full_attention(compute_dtype, upcast):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        out, lse = masked_attention_reference(*leaves, visible, upcast=upcast)
        grads = torch.autograd.grad((out * dout.to(compute_dtype)).sum(), leaves)
        results = dict(out=out.detach(), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
        return {name: t[:, rows] if name == "lse" else t[rows] for name, t in results.items()}

    exact = full_attention(torch.float64, upcast=True)
    same_dtype = full_attention(dtype, upcast=False)
    local = [t[rows].to(dtype).detach().requires_grad_() for t in (q, k, v)]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    if layout == "llama3":
        cu_q, cu_k, max_q, max_k, keys = llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, args.causal, rank,
                                                                              world_size)
        out, lse, _ = llama3_flash_attn_varlen_func(*local, cu_q, cu_k, max_q, max_k, args.kv_heads, keys,
                                                    causal=args.causal, return_attn_probs=True)
    else:
        longest = max(end - begin for begin, end in zip(bounds, bounds[1:])) // world_size
        out, lse, _ = VARLEN_FUNCTIONS[layout](*local, cu_seqlens // world_size, longest, causal=args.causal,
                                               return_attn_probs=True)
    (out * dout[rows].to(dtype)).sum().backward()
    return _report(dict(out=out.detach(), lse=lse, dq=local[0].grad, dk=local[1].grad, dv=local[2].grad), exact,
                   same_dtype)


def _report(ring, exact, same_dtype):
    """{quantity: (error against exact, bound)} by FlashAttention's rule (module docstring)."""
    report = {}
    for name in QUANTITIES:
        error = max_error(ring[name], exact[name])
        rounding = max_error(exact[name].to(ring[name].dtype), exact[name])
        bound = FACTORS[name] * max_error(same_dtype[name], exact[name]) + 2 * rounding + 1e-6
        if not torch.isfinite(ring[name]).all():
            error = float("inf")
        report[name] = (error, bound)
    return report


def worker(rank, args, init_method, results):
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=args.world_size,
                                timeout=datetime.timedelta(minutes=5), device_id=device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=args.world_size,
                                timeout=datetime.timedelta(minutes=5))
    try:
        groups = usp_groups(args.ulysses_degree) if args.ulysses_degree > 1 else None
        rows = []
        for layout in args.layouts:
            if args.varlen:
                report = check_varlen(rank, args.world_size, layout, args, device)
            else:
                report = check_layout(rank, args.world_size, layout, args, device, groups)
            # Every rank's (error, bound) per quantity and its verdict go to rank 0 for the table.
            values = torch.tensor([v for name in QUANTITIES for v in report[name]]
                                  + [float(all(e <= b for e, b in report.values()))], dtype=torch.float64,
                                  device=device)
            gathered = [torch.empty_like(values) for _ in range(args.world_size)]
            dist.all_gather(gathered, values)
            rows.append((layout, [t.tolist() for t in gathered]))
        if rank == 0:
            results.put(rows)
    finally:
        if args.device == "cuda":
            from ._ring_cuda import destroy_communicators  # spawned workers do not run atexit handlers
            destroy_communicators()
        dist.destroy_process_group()


def print_table(args, rows):
    what = ("ring attention" if args.ulysses_degree == 1 else
            f"Ulysses x ring attention ({args.ulysses_degree} x {args.world_size // args.ulysses_degree})")
    shape = f"batch {args.batch}, seqlen {args.seqlen}"
    if args.varlen:
        what, shape = "packed variable-length sequences", f"a stream of {args.seqlen} tokens"
    print(f"{what}, {args.device}, world {args.world_size}, {args.dtype}, {shape}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, causal {args.causal}; max error over ranks vs float64 full attention (bound)")
    header = f"{'layout':<8}{'world':>6}  " + "".join(f"{name:>22}" for name in QUANTITIES) + "  result"
    print(header)
    all_passed = True
    for layout, per_rank in rows:
        cells = []
        for index, name in enumerate(QUANTITIES):
            worst = max(per_rank, key=lambda values: values[2 * index] - values[2 * index + 1])
            cells.append(f"{worst[2 * index]:.2e} ({worst[2 * index + 1]:.1e})")
        passed = all(values[-1] == 1.0 for values in per_rank)
        all_passed &= passed
        print(f"{layout:<8}{args.world_size:>6}  " + "".join(f"{cell:>22}" for cell in cells)
              + f"  {'pass' if passed else 'FAIL'}")
    return all_passed


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # NVLink multicast (NVLS) is not available on every machine and the ring does not need it.
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as directory:
        init_method = "file://" + os.path.join(directory, "rendezvous")
        mp.spawn(worker, args=(args, init_method, results), nprocs=args.world_size, join=True)
    return 0 if print_table(args, results.get()) else 1


if __name__ == "__main__":
    # Run the copy of this module imported under its package name: spawned processes find `worker`
    # there (multiprocessing does not re-run a package's __main__ in its children).
    from ring_attn_ext.__main__ import main as main_of_module
    sys.exit(main_of_module())
