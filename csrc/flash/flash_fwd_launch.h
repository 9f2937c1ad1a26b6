// Host-side launcher of the forward kernel, one instantiation per (dtype, head dim, masked) in
// instantiations/flash_fwd_hdim*_*.cu. Tile shapes per head dim start from what FlashAttention-2
// measured fastest on A100/H100 for mma.sync kernels (research/flash_design.md, section 1.2): 4 warps
// with 128-row query blocks, 64-key blocks for d 96/128, 128 for d = 32, and 64x64 for d = 256 (96 KB
// of shared memory, so two CTAs fit on an H100 SM).
// d = 64 uses 128x64 rather than FlashAttention-2's 128x128. Measured on an H100 (bf16, b*s = 32k,
// h*d = 2048, 2026-11-23): causal 1.08-1.13x FlashAttention-2 against 0.98-1.06x with 128x128, full
// 1.04-1.11x against 1.11-1.14x; and it compiles without register spills (128x128 spills ~200 bytes).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "flash_fwd_kernel.h"
#include "flash_params.h"
#include "kernel_registry.h"  // FwdRegistration and DType, used by the instantiation files

namespace ring_attn {

template <int kHeadDim>
struct FwdTileShape;
template <>
struct FwdTileShape<32> {
    static constexpr int kBlockM = 128, kBlockN = 128, kNWarps = 4;
};
template <>
struct FwdTileShape<64> {
    static constexpr int kBlockM = 128, kBlockN = 64, kNWarps = 4;
};
template <>
struct FwdTileShape<96> {
    static constexpr int kBlockM = 128, kBlockN = 64, kNWarps = 4;
};
template <>
struct FwdTileShape<128> {
    static constexpr int kBlockM = 128, kBlockN = 64, kNWarps = 4;
};
template <>
struct FwdTileShape<256> {
    static constexpr int kBlockM = 64, kBlockN = 64, kNWarps = 4;
};

// Launches the forward kernel on `stream`. Throws std::invalid_argument when the parameters do not
// fit this instantiation and std::runtime_error when CUDA refuses the configuration; launch errors
// are left for the caller's C10_CUDA_KERNEL_LAUNCH_CHECK.
template <typename Element, int kHeadDim, bool kIsMasked>
void launch_flash_fwd(const FwdParams& params, cudaStream_t stream) {
    using TileShape = FwdTileShape<kHeadDim>;
    using Traits = flash::FwdTraits<Element, kHeadDim, TileShape::kBlockM, TileShape::kBlockN, TileShape::kNWarps>;
    if (params.head_dim != kHeadDim) {
        throw std::invalid_argument("launch_flash_fwd: head_dim " + std::to_string(params.head_dim) +
                                    " does not match the compiled head dim " + std::to_string(kHeadDim));
    }
    if (params.heads_kv <= 0 || params.heads % params.heads_kv != 0) {
        throw std::invalid_argument("launch_flash_fwd: heads_kv must divide heads");
    }
    if (params.mask.is_masked != kIsMasked) {
        throw std::invalid_argument("launch_flash_fwd: mask kind does not match the instantiation");
    }
    const bool packed = params.sequences != nullptr;
    if (packed && (params.merge_into_accum || params.out_final != nullptr)) {
        throw std::invalid_argument("launch_flash_fwd: a varlen launch is a plain forward (no merge, no emit)");
    }
    // Without keys only emit mode has work: every tile takes the kernel's no-key path.
    if (params.batch == 0 || params.seqlen_q == 0 || (params.seqlen_k == 0 && params.out_final == nullptr)) return;

    auto kernel =
        packed ? &flash::flash_fwd_packed_kernel<Traits, kIsMasked> : &flash::flash_fwd_kernel<Traits, kIsMasked>;
    constexpr int kSmemBytes = Traits::kSmemBytes;
    if (kSmemBytes > 48 * 1024) {
        const cudaError_t status =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
        if (status != cudaSuccess) {
            throw std::runtime_error("launch_flash_fwd: cannot raise the shared-memory limit to " +
                                     std::to_string(kSmemBytes) + " bytes: " + cudaGetErrorString(status));
        }
    }
    const dim3 grid((params.seqlen_q + TileShape::kBlockM - 1) / TileShape::kBlockM, params.batch, params.heads);
    kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(params);
}

}  // namespace ring_attn
