// The shared-memory matrix products of both attention kernels: acc += A * B over the whole K extent of
// two register fragments, each loaded from shared memory through its ldmatrix copy (gemm_smem), or
// with B already held in registers (gemm_smem_a).
#pragma once

#include <cute/tensor.hpp>

namespace ring_attn {

// acc += A * B (B given as the MMA's B operand, i.e. A * B^T for row-major tiles) over the whole K
// extent of the fragments. The ldmatrix loads of k-slice i + 1 are issued before the MMAs of slice i,
// so shared-memory latency hides behind tensor-core work.
//   tCrA, tCrB:     register fragments (partition_fragment_A/B of the MMA)
//   tCsA, tCsB:     the shared-memory tiles partitioned by the ldmatrix copies (CPY, CPY_M|N, CPY_K)
//   copy_a, copy_b: the ldmatrix TiledCopy objects (make_tiled_copy_A/B)
template <typename TiledMma, typename Acc, typename FragA, typename FragB, typename SmemA, typename SmemB,
          typename CopyA, typename CopyB>
__device__ __forceinline__ void gemm_smem(const TiledMma& mma, Acc& acc, FragA& tCrA, FragB& tCrB, const SmemA& tCsA,
                                          const SmemB& tCsB, const CopyA& copy_a, const CopyB& copy_b) {
    using namespace cute;
    // The register fragments re-viewed in the copies' (value, rows, k) order.
    Tensor tCrA_view = make_tensor(tCrA.data(), CopyA::retile(tCrA.layout()));
    Tensor tCrB_view = make_tensor(tCrB.data(), CopyB::retile(tCrB.layout()));
    CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(tCrA_view));
    CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<1>(tCrB_view));
    CUTE_STATIC_ASSERT_V(size<2>(tCrA) == size<2>(tCrB));
    copy(copy_a, tCsA(_, _, 0), tCrA_view(_, _, 0));
    copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tCrA); ++k) {
        if (k + 1 < size<2>(tCrA)) {
            copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
            copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
        }
        cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
    }
}

// acc += A * B as above, with B already held in registers for the whole K extent (loaded once by the
// caller), so only A comes from shared memory.
template <typename TiledMma, typename Acc, typename FragA, typename FragB, typename SmemA, typename CopyA>
__device__ __forceinline__ void gemm_smem_a(const TiledMma& mma, Acc& acc, FragA& tCrA, const FragB& tCrB,
                                            const SmemA& tCsA, const CopyA& copy_a) {
    using namespace cute;
    Tensor tCrA_view = make_tensor(tCrA.data(), CopyA::retile(tCrA.layout()));
    CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(tCrA_view));
    CUTE_STATIC_ASSERT_V(size<2>(tCrA) == size<2>(tCrB));
    copy(copy_a, tCsA(_, _, 0), tCrA_view(_, _, 0));
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tCrA); ++k) {
        if (k + 1 < size<2>(tCrA)) copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
        cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
    }
}

}  // namespace ring_attn
