// The TMA descriptor through which the Hopper backward adds each query block's dQ tile into the
// caller's fp32 dq_accum (b, s_q, h, d): one bulk tensor reduction per 8-column slice of the tile,
// instead of per-thread atomics. Built on the host for each launch (cheap: a driver call that only
// fills 128 bytes) and passed to the kernel as a __grid_constant__ parameter.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "flash_params.h"

namespace ring_attn {

// Columns per reduction: 8 floats, one 32-byte sector per row. Narrow slices let the kernel stage dQ
// without shared-memory bank conflicts (see BwdTraits::SmemLayoutDq); measured on H100 they were
// faster than 32-column slices with the 128-byte swizzle although L2 then sees one reduction request
// per sector instead of per line.
constexpr int kDqSliceCols = 8;

// Whether dq_accum's rows meet the TMA's alignment rules: a 16-byte aligned start and strides that
// are multiples of 16 bytes (dimensions of size 1 have no meaningful stride and are exempt).
inline bool dq_accum_tma_aligned(const BwdParams& p) {
    auto aligned = [](int64_t stride_floats, int size) { return size == 1 || (stride_floats * 4) % 16 == 0; };
    return reinterpret_cast<uintptr_t>(p.dq_accum) % 16 == 0 && aligned(p.dq_row_stride, p.seqlen_q) &&
           aligned(p.dq_head_stride, p.heads) && aligned(p.dq_batch_stride, p.batch);
}

// The descriptor of dq_accum viewed as a 4-d tensor (d, s_q, h, b), innermost first, read in boxes
// of (kDqSliceCols, block_rows, 1, 1), dense and unswizzled in shared memory.
inline CUtensorMap make_dq_tensor_map(const BwdParams& p, int block_rows) {
    using EncodeTiled = decltype(&cuTensorMapEncodeTiled);
    static EncodeTiled encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
        const cudaError_t status =
            cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
        if (status != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
            throw std::runtime_error("ring_attn backward: the CUDA driver has no cuTensorMapEncodeTiled");
        }
        return reinterpret_cast<EncodeTiled>(fn);
    }();
    if (!dq_accum_tma_aligned(p)) {
        throw std::invalid_argument(
            "ring_attn backward: dq_accum rows must start 16-byte aligned (fp32 strides multiples of 4)");
    }
    // A dimension of size 1 takes the stride of the dimensions inside it, so that every stride the
    // driver sees is valid whatever the tensor reported for it.
    const cuuint64_t row_bytes = p.seqlen_q == 1 ? cuuint64_t(p.head_dim) * 4 : cuuint64_t(p.dq_row_stride) * 4;
    const cuuint64_t head_bytes = p.heads == 1 ? row_bytes * p.seqlen_q : cuuint64_t(p.dq_head_stride) * 4;
    const cuuint64_t batch_bytes = p.batch == 1 ? head_bytes * p.heads : cuuint64_t(p.dq_batch_stride) * 4;
    const cuuint64_t dims[4] = {cuuint64_t(p.head_dim), cuuint64_t(p.seqlen_q), cuuint64_t(p.heads),
                                cuuint64_t(p.batch)};
    const cuuint64_t strides[3] = {row_bytes, head_bytes, batch_bytes};
    const cuuint32_t box[4] = {cuuint32_t(kDqSliceCols), cuuint32_t(block_rows), 1, 1};
    const cuuint32_t element_strides[4] = {1, 1, 1, 1};
    CUtensorMap map;
    const CUresult result = encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, p.dq_accum, dims, strides, box,
                                   element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (result != CUDA_SUCCESS) {
        throw std::runtime_error("ring_attn backward: cuTensorMapEncodeTiled failed for dq_accum (CUresult " +
                                 std::to_string(int(result)) + ")");
    }
    return map;
}

}  // namespace ring_attn
