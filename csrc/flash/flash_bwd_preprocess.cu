// delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d], in fp32, and optionally zeroes the
// matching row of an fp32 dq_accum in the same pass (the plain backward's dQ accumulator: one launch
// and no separate fill). A group of kLanes lanes handles one (b, i, h) row, each lane 8 elements
// (16 bytes) at a time, so a warp covers 32 / kLanes rows with wide loads; the group size is the
// smallest power of two that covers the row in one step (d = 32: 4 lanes, d = 128: 16, d >= 256: 32).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "flash_bwd_preprocess.h"

namespace ring_attn {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kElementsPerChunk = 8;  // 16 bytes of fp16/bf16

__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Element, typename Element2, int kLanes>
__global__ void __launch_bounds__(kThreadsPerBlock) bwd_delta_kernel(const BwdParams params) {
    constexpr int kRowsPerBlock = kThreadsPerBlock / kLanes;
    const int lane = threadIdx.x % kLanes;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
    const int64_t rows = static_cast<int64_t>(params.batch) * params.seqlen_q * params.heads;
    // No early return: the shuffles below need every lane of the group (and the warp) present.
    const bool active = row < rows;
    const int head = active ? static_cast<int>(row % params.heads) : 0;
    const int64_t rest = active ? row / params.heads : 0;
    const int query = static_cast<int>(rest % params.seqlen_q);
    const int batch = static_cast<int>(rest / params.seqlen_q);
    const int head_dim = params.head_dim;

    float sum = 0.f;
    if (active) {
        const Element* out = static_cast<const Element*>(params.out) + batch * params.o_batch_stride +
                             query * params.o_row_stride + head * params.o_head_stride;
        const Element* dout = static_cast<const Element*>(params.dout) + batch * params.do_batch_stride +
                              query * params.do_row_stride + head * params.do_head_stride;
        // Rows start on 16-byte boundaries (the host checks pointers and strides), so whole chunks
        // load as uint4; a head dim that is not a multiple of 8 leaves a scalar tail.
        const int chunks = head_dim / kElementsPerChunk;
        for (int chunk = lane; chunk < chunks; chunk += kLanes) {
            const uint4 o = reinterpret_cast<const uint4*>(out)[chunk];
            const uint4 g = reinterpret_cast<const uint4*>(dout)[chunk];
            const Element2* o2 = reinterpret_cast<const Element2*>(&o);
            const Element2* g2 = reinterpret_cast<const Element2*>(&g);
#pragma unroll
            for (int i = 0; i < kElementsPerChunk / 2; ++i) {
                const float2 a = to_float2(o2[i]), b = to_float2(g2[i]);
                sum += a.x * b.x + a.y * b.y;
            }
        }
        for (int col = chunks * kElementsPerChunk + lane; col < head_dim; col += kLanes) {
            sum += to_float(out[col]) * to_float(dout[col]);
        }
    }
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (!active) return;
    if (lane == 0) {
        params.delta[batch * params.delta_batch_stride + head * params.delta_head_stride + query] = sum;
    }
    if (params.dq_accum != nullptr) {
        float* dq = params.dq_accum + batch * params.dq_batch_stride + query * params.dq_row_stride +
                    head * params.dq_head_stride;
        if (reinterpret_cast<uintptr_t>(dq) % 16 == 0) {
            const int quads = head_dim / 4;
            for (int quad = lane; quad < quads; quad += kLanes) {
                reinterpret_cast<float4*>(dq)[quad] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
            for (int col = quads * 4 + lane; col < head_dim; col += kLanes) dq[col] = 0.f;
        } else {
            for (int col = lane; col < head_dim; col += kLanes) dq[col] = 0.f;
        }
    }
}

template <typename Element, typename Element2, int kLanes>
void launch(const BwdParams& params, int64_t rows, cudaStream_t stream) {
    constexpr int kRowsPerBlock = kThreadsPerBlock / kLanes;
    const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
    bwd_delta_kernel<Element, Element2, kLanes><<<grid, kThreadsPerBlock, 0, stream>>>(params);
}

template <typename Element, typename Element2>
void launch_for_head_dim(const BwdParams& params, int64_t rows, cudaStream_t stream) {
    const int chunks = (params.head_dim + kElementsPerChunk - 1) / kElementsPerChunk;
    if (chunks <= 4) {
        launch<Element, Element2, 4>(params, rows, stream);
    } else if (chunks <= 8) {
        launch<Element, Element2, 8>(params, rows, stream);
    } else if (chunks <= 16) {
        launch<Element, Element2, 16>(params, rows, stream);
    } else {
        launch<Element, Element2, 32>(params, rows, stream);
    }
}

}  // namespace

void launch_bwd_delta(const BwdParams& params, DType dtype, cudaStream_t stream) {
    const int64_t rows = static_cast<int64_t>(params.batch) * params.seqlen_q * params.heads;
    if (dtype == DType::kFloat16) {
        launch_for_head_dim<__half, __half2>(params, rows, stream);
    } else {
        launch_for_head_dim<__nv_bfloat16, __nv_bfloat162>(params, rows, stream);
    }
}

}  // namespace ring_attn
