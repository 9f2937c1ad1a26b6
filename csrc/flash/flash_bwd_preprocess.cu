// delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d], in fp32. One warp per (b, i, h) row:
// rows are at most 256 elements, so a warp covers one in a few 16-byte loads per lane.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash_bwd_preprocess.h"

namespace ring_attn {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Element>
__global__ void bwd_delta_kernel(const BwdParams params) {
    const int lane = threadIdx.x % 32;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
    const int64_t rows = static_cast<int64_t>(params.batch) * params.seqlen_q * params.heads;
    if (row >= rows) return;
    const int head = static_cast<int>(row % params.heads);
    const int64_t rest = row / params.heads;
    const int query = static_cast<int>(rest % params.seqlen_q);
    const int batch = static_cast<int>(rest / params.seqlen_q);
    const Element* out = static_cast<const Element*>(params.out) + batch * params.o_batch_stride +
                         query * params.o_row_stride + head * params.o_head_stride;
    const Element* dout = static_cast<const Element*>(params.dout) + batch * params.do_batch_stride +
                          query * params.do_row_stride + head * params.do_head_stride;
    float sum = 0.f;
    for (int col = lane; col < params.head_dim; col += 32) sum += to_float(out[col]) * to_float(dout[col]);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (lane == 0) {
        params.delta[batch * params.delta_batch_stride + head * params.delta_head_stride + query] = sum;
    }
}

}  // namespace

void launch_bwd_delta(const BwdParams& params, DType dtype, cudaStream_t stream) {
    const int64_t rows = static_cast<int64_t>(params.batch) * params.seqlen_q * params.heads;
    const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
    const dim3 block(kWarpsPerBlock * 32);
    if (dtype == DType::kFloat16) {
        bwd_delta_kernel<__half><<<grid, block, 0, stream>>>(params);
    } else {
        bwd_delta_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(params);
    }
}

}  // namespace ring_attn
