"""Instruction counts of a kernel's main loops, read from compiled SASS: a way to compare how ptxas
allocated registers in two variants of a kernel without a GPU.

    python3 scripts/sass_loop_stats.py build/temp.*/csrc/flash/instantiations/flash_bwd_hdim128_fp16_masked.o

For every kernel in the object (or shared library) whose name contains --kernel, it finds the loops
(backward branches) of at least --min-length instructions (a banded backward kernel has three:
masked query blocks, unmasked ones, masked ones) and prints, for each in address order, its
instruction count and opcode histogram twice: for the whole loop and for its hot path, which leaves
out the regions that a forward branch inside the loop jumps over and that look rarely taken: a TMA
issue block (one thread per CTA) or a masking block (mostly integer compares). Local loads (LDL)
inside the hot path are spills that every iteration pays for.

Build the objects with `RING_ATTN_HEAD_DIMS=128 python3 setup.py build_ext --inplace` (add
NVCC_APPEND_FLAGS="-Xptxas -v" to see ptxas's register and spill counts in the build log). SASS
comes from cuobjdump: $CUDA_HOME/bin/cuobjdump, else the copy that ships in the triton wheel.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BRANCH_TARGET = re.compile(r"\bBRA\b(?!\.U\.ANY).*?(0x[0-9a-f]+)")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")
# A forward branch inside the loop that skips at least this many instructions is a region candidate.
MIN_REGION = 60


def find_cuobjdump():
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump")]
    try:
        import triton  # the wheel ships cuobjdump with its NVIDIA backend
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    sys.exit("cuobjdump not found: set CUDA_HOME to a CUDA toolkit that has it, or pip install triton")


def opcode(text):
    return PREDICATE.sub("", text).split()[0].split(".")[0]


def parse_kernels(sass):
    """{kernel name: [(address, instruction text), ...]} from cuobjdump -sass output."""
    kernels = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        kernels[name] = [(int(m.group(1), 16), m.group(2).strip()) for m in INSTRUCTION.finditer(chunk)]
    return kernels


def region_kind(texts):
    """Why a skipped region is off the hot path, or None if it does not look rarely taken."""
    if any(opcode(t).startswith("UTMA") for t in texts):
        return "tma"
    if sum(opcode(t) == "ISETP" for t in texts) * 4 >= len(texts):
        return "mask"
    return None


def branch_target(text, index):
    """Position (in the kernel's instruction list) that the branch `text` jumps to, or None."""
    match = BRANCH_TARGET.search(text)
    return index.get(int(match.group(1), 16)) if match else None


def main_loops(instructions, min_length=200):
    """[(loop length, whole-loop Counter, hot-path Counter, [(kind, length), ...]), ...] of every loop
    of at least min_length instructions, in address order."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    loops = []
    for i, (_, text) in enumerate(instructions):
        first = branch_target(text, index)
        if first is not None and first < i and i - first + 1 >= min_length:
            loops.append(loop_stats(instructions, index, first, i))
    return loops


def loop_stats(instructions, index, first, last):
    """(length, whole-loop Counter, hot-path Counter, regions) of the loop from first to last."""
    skipped, regions = set(), []
    for i in range(first, last):
        target = branch_target(instructions[i][1], index)
        if target is not None and i < target <= last and target - i > MIN_REGION:
            kind = region_kind([text for _, text in instructions[i + 1:target]])
            if kind:
                skipped.update(range(i + 1, target))
                regions.append((kind, target - i - 1))
    body = range(first, last + 1)
    whole = collections.Counter(opcode(instructions[i][1]) for i in body)
    hot = collections.Counter(opcode(instructions[i][1]) for i in body if i not in skipped)
    return last - first + 1, whole, hot, regions


def format_counter(counter):
    return " ".join(f"{name}={count}" for name, count in counter.most_common())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("objects", nargs="+", help=".o or .so files with sm_90a (or other) SASS")
    parser.add_argument("--kernel", default="", help="only kernels whose (mangled) name contains this")
    parser.add_argument("--min-length", type=int, default=200, help="shortest loop shown, in instructions")
    args = parser.parse_args(argv)
    cuobjdump = find_cuobjdump()
    for path in args.objects:
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
        for name, instructions in parse_kernels(sass).items():
            if args.kernel not in name:
                continue
            print(f"{path}: {name}")
            loops = main_loops(instructions, args.min_length)
            if not loops:
                print(f"  {len(instructions)} instructions, no loop of {args.min_length} or more")
            for number, (length, whole, hot, regions) in enumerate(loops, 1):
                print(f"  loop {number}: {length} instructions: {format_counter(whole)}")
                for kind, size in regions:
                    print(f"    off the hot path: {kind} region, {size} instructions")
                print(f"    hot path {sum(hot.values())} instructions: {format_counter(hot)}")


if __name__ == "__main__":
    main()
