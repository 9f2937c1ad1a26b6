// Backward launcher: tile policy per head dim, grid, shared-memory opt-in. Included by the generated
// instantiations/flash_bwd_hdim*_*.cu files, one (dtype, head dim, masked) per translation unit.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "bwd_cta_order.h"
#include "bwd_traits.h"
#include "dq_tensor_map.h"
#include "flash_bwd_kernel.h"
#include "flash_params.h"
#include "kernel_registry.h"

namespace ring_attn {

// Tiles follow FlashAttention-2's choices for H100/A100 backward (8 warps; Q and dO double-buffered
// so the next query block loads during this one). On Hopper, d 64 and 128 run these tiles through
// the wgmma body (bwd_gmma_traits.h): on H100, bf16 and fp16, s 1k-16k, 1.16-1.48x FlashAttention-2's
// backward, where the mma.sync body of the same tiles was level with it (0.99-1.07x).
// Shared memory for the operands: d32 112 KB, d64 160 KB, d96 128 KB, d128 160 KB, d256 208 KB; A100 allows 163 KB per block, so d256 there
// keeps a single Q/dO buffer (144 KB).
// dQ staging (the "stage dQ" BwdTraits argument) is on for d32-d128 on Hopper, where it adds an fp32
// kBlockM x d tile (16-32 KB; none fits beside d256's operands). Measured on H100 (s 1k-16k) against
// per-thread atomics, whose requests throttle the warps' load/store path: 4-9% faster at d128 and
// 6-13% at d64 with 32-column swizzled slices, then another 1-2% (d128) and 2-7% (d64) with the
// bank-conflict-free 8-column slices now used. Ampere keeps the atomics (no TMA). At d32 and d96 the
// staging was measured against atomics on H200 (bf16, s 2k-16k): atomics 2-6% slower at d32 and
// 6-9% at d96.
// V in registers (the last BwdTraits argument; FlashAttention-2 does it at d32 and d96) is on at
// d32 on Hopper: on H200 bf16 s 2k-16k, causal +1.4-2.8%, non-causal within 0.5%. At d96 it spills
// (56 bytes) and measured causal +1.6-2.9% but non-causal -1.4% at s 8k/16k, so d96 keeps V in
// shared memory.
//                                               Element, d, kBlockM, kBlockN, warps, MSdP, NdKV, MdQ, stages,
//                                               stage dQ, V in registers
template <typename Element, int kHeadDim>
struct BwdConfig;
template <typename Element>
struct BwdConfig<Element, 32> {
    using Sm90 = BwdTraits<Element, 32, 128, 128, 8, 4, 4, 4, 2, true, true>;
    using Sm80 = BwdTraits<Element, 32, 128, 128, 8, 4, 4, 4, 2>;
};
template <typename Element>
struct BwdConfig<Element, 64> {
    using Sm90 = BwdTraits<Element, 64, 128, 128, 8, 4, 4, 4, 2, true>;
    using Sm80 = BwdTraits<Element, 64, 128, 128, 8, 4, 4, 4, 2>;
};
template <typename Element>
struct BwdConfig<Element, 96> {
    using Sm90 = BwdTraits<Element, 96, 64, 128, 8, 2, 4, 4, 2, true>;
    using Sm80 = BwdTraits<Element, 96, 64, 128, 8, 2, 4, 4, 2>;
};
template <typename Element>
struct BwdConfig<Element, 128> {
    using Sm90 = BwdTraits<Element, 128, 64, 128, 8, 2, 4, 2, 2, true>;
    using Sm80 = BwdTraits<Element, 128, 64, 128, 8, 2, 4, 2, 2>;
};
template <typename Element>
struct BwdConfig<Element, 256> {
    using Sm90 = BwdTraits<Element, 256, 64, 64, 8, 4, 2, 2, 2>;
    using Sm80 = BwdTraits<Element, 256, 64, 64, 8, 4, 2, 2, 1>;
};

namespace bwd {

inline void check_cuda(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
        throw std::runtime_error(std::string("ring_attn backward: ") + what + ": " + cudaGetErrorString(status));
    }
}

}  // namespace bwd

template <typename Element, int kHeadDim, bool kIsMasked>
void launch_flash_bwd(const BwdParams& params, cudaStream_t stream) {
    using Config = BwdConfig<Element, kHeadDim>;
    using Sm90 = typename Config::Sm90;
    using Sm80 = typename Config::Sm80;

    int device = 0, major = 0, max_smem = 0, num_sms = 0;
    bwd::check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    bwd::check_cuda(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device),
                    "cudaDeviceGetAttribute(multiprocessor count)");
    bwd::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                    "cudaDeviceGetAttribute(compute capability)");
    bwd::check_cuda(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                    "cudaDeviceGetAttribute(max shared memory per block)");
    // The kernel body runs Sm90 traits in the sm_90a build and Sm80 traits in the sm_80 build; a
    // device of compute capability 9.x runs the former.
    const int smem_bytes = major >= 9 ? Sm90::kSmemBytes : Sm80::kSmemBytes;
    if (smem_bytes > max_smem) {
        throw std::runtime_error("ring_attn backward for head_dim " + std::to_string(kHeadDim) + " needs " +
                                 std::to_string(smem_bytes) + " bytes of shared memory per block; this GPU allows " +
                                 std::to_string(max_smem));
    }
    const bool packed = params.sequences != nullptr;
    if (packed && (params.dk_out != nullptr || params.dkv_overwrite)) {
        throw std::invalid_argument("launch_flash_bwd: a varlen launch adds dK/dV (no dk_out, no overwrite)");
    }
    // The Hopper kernel adds dQ through the TMA when its traits stage dQ; otherwise the descriptor
    // stays unused (zeros).
    CUtensorMap dq_map{};
    if (major >= 9 && Sm90::kStageDq) {
        // A varlen launch's descriptor spans every packed query row, as a batch of one.
        BwdParams extent = params;
        if (packed) extent.batch = 1, extent.seqlen_q = params.packed_rows_q;
        dq_map = make_dq_tensor_map(extent, Sm90::kBlockM);
    }
    const bwd::CtaOrder order =
        packed ? bwd::CtaOrder::kPlain : bwd::choose_cta_order<Sm90::kBlockN, kIsMasked>(params, num_sms);
    const dim3 grid = bwd::cta_grid<Sm90::kBlockN>(order, params);
    auto launch = [&](auto kernel) {
        bwd::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
                        "cudaFuncSetAttribute(max dynamic shared memory)");
        kernel<<<grid, Sm90::kThreads, smem_bytes, stream>>>(params, dq_map);
    };
    if (packed) return launch(&flash_bwd_packed_kernel<Sm90, Sm80, kIsMasked>);
    // Only banded kernels are instantiated in the key-block-major orders (the others never use them).
    using bwd::CtaOrder;
    if constexpr (kIsMasked) {
        if (order == CtaOrder::kBatchesByKeyBlock) {
            return launch(&flash_bwd_kernel<Sm90, Sm80, true, CtaOrder::kBatchesByKeyBlock>);
        }
        if (order == CtaOrder::kHeadsByKeyBlock) {
            return launch(&flash_bwd_kernel<Sm90, Sm80, true, CtaOrder::kHeadsByKeyBlock>);
        }
    }
    launch(&flash_bwd_kernel<Sm90, Sm80, kIsMasked, CtaOrder::kPlain>);
}

}  // namespace ring_attn
