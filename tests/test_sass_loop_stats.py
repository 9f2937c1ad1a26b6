"""scripts/sass_loop_stats.py's reading of SASS text (CPU only): the main loops are the backward
branches of at least a minimum length, in address order, and a hot path leaves out the TMA and
masking regions that forward branches skip, but not other skipped code."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import sass_loop_stats  # noqa: E402  (scripts/ is not a package)


def sass_function(name, lines):
    """cuobjdump-style text of one function whose instructions are `lines`, 16 bytes apart; a line
    may name a label ("BRA label") that resolves to the address of the line tagged "label:"."""
    labels = {}
    for i, line in enumerate(lines):
        if ":" in line:
            labels[line.split(":")[0]] = 16 * i
    text = ["\tcode for sm_90a", f"        Function : {name}"]
    for i, line in enumerate(lines):
        instruction = line.split(":", 1)[1].strip() if ":" in line else line
        for label, address in labels.items():
            instruction = instruction.replace(f"BRA {label}", f"BRA {address:#x}")
        text.append(f"        /*{16 * i:04x}*/                   {instruction} ;")
    return "\n".join(text)


def test_hot_path_leaves_out_tma_and_mask_regions_only():
    lines = ["MOV R1, c[0x0][0x28]",
             "top: HMMA.16816.F32 R4, R8, R12, R4",
             "@P0 BRA after_tma"] + ["UTMAREDG.4D [UR4], [UR8]"] + ["UIADD3 UR4, UR4, 0x1, URZ"] * 69 + [
             "after_tma: @!P1 BRA after_mask"] + ["ISETP.GE.AND P2, PT, R0, R3, PT", "FSEL R4, R4, RZ, P2"] * 35 + [
             "after_mask: @P3 BRA after_other"] + ["IMAD R5, R5, R6, R7"] * 70 + [
             "after_other: LDL R9, [R1+0x4]",
             "@P4 BRA top",
             "EXIT"]
    kernels = sass_loop_stats.parse_kernels(sass_function("_Z6kernelv", lines))
    [(length, whole, hot, regions)] = sass_loop_stats.main_loops(kernels["_Z6kernelv"])
    assert length == len(lines) - 2  # from "top" through the backward branch
    assert regions == [("tma", 70), ("mask", 70)]
    assert hot["UTMAREDG"] == 0 and hot["ISETP"] == 0 and whole["ISETP"] == 35
    assert hot["IMAD"] == 70  # an ordinary skipped region stays on the hot path
    assert hot["HMMA"] == 1 and hot["LDL"] == 1 and hot["BRA"] == 4
    assert sum(hot.values()) == length - 140


def test_every_long_loop_in_address_order_short_ones_left_out():
    lines = (["first: FFMA R1, R2, R3, R1"] + ["FFMA R1, R2, R3, R1"] * 249 + ["@P0 BRA first"] +
             ["short: IADD3 R4, R4, 0x1, RZ"] + ["IADD3 R4, R4, 0x1, RZ"] * 9 + ["@P1 BRA short"] +
             ["second: HMMA.16816.F32 R4, R8, R12, R4"] + ["HMMA.16816.F32 R4, R8, R12, R4"] * 299 +
             ["@P2 BRA second", "EXIT"])
    kernels = sass_loop_stats.parse_kernels(sass_function("_Z5threev", lines))
    loops = sass_loop_stats.main_loops(kernels["_Z5threev"], min_length=200)
    assert [(length, hot["FFMA"], hot["HMMA"]) for length, _, hot, _ in loops] == [(251, 250, 0), (301, 0, 300)]
    assert len(sass_loop_stats.main_loops(kernels["_Z5threev"], min_length=5)) == 3


def test_kernel_without_loop():
    kernels = sass_loop_stats.parse_kernels(sass_function("_Z4flatv", ["MOV R1, R2", "EXIT"]))
    assert sass_loop_stats.main_loops(kernels["_Z4flatv"]) == []
