// delta = rowsum(dout * out) over the head dim, in fp32: the term every backward block needs.
#pragma once

#include <cuda_runtime.h>

#include "flash_params.h"
#include "kernel_registry.h"

namespace ring_attn {

// Reads params.out and params.dout (dtype `dtype`), writes params.delta; when params.dq_accum is set
// (the plain backward's own buffer, laid out like out), also zero-fills it in the same pass.
void launch_bwd_delta(const BwdParams& params, DType dtype, cudaStream_t stream);

}  // namespace ring_attn
