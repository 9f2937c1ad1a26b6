// A registry of compiled kernel instantiations. Each instantiation file (instantiations/*.cu)
// registers its launcher at load time, so the host API can ask for (head dim, dtype, masked) at run
// time and give a clear error for a combination this build left out (RING_ATTN_HEAD_DIMS,
// RING_ATTN_DTYPES), without a hand-kept dispatch table that must match the build.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "flash_params.h"

namespace ring_attn {

enum class DType { kFloat16 = 0, kBFloat16 = 1 };

struct KernelKey {
    int head_dim;
    DType dtype;
    bool is_masked;
};

using FwdLauncher = void (*)(const FwdParams&, cudaStream_t);
using BwdLauncher = void (*)(const BwdParams&, cudaStream_t);

void register_fwd_launcher(KernelKey key, FwdLauncher launcher);
void register_bwd_launcher(KernelKey key, BwdLauncher launcher);

// nullptr when this build has no such instantiation.
FwdLauncher find_fwd_launcher(KernelKey key);
BwdLauncher find_bwd_launcher(KernelKey key);

// Head dims with at least one forward instantiation, ascending (for error messages).
std::vector<int> compiled_head_dims();

struct CompiledKernel {
    std::string direction;  // "fwd" or "bwd"
    int head_dim;
    std::string dtype;      // dtype_name()
    bool is_masked;
};
// Every instantiation in this build, so callers can check availability without calling a kernel.
std::vector<CompiledKernel> compiled_kernels();
std::string dtype_name(DType dtype);

// Registers a launcher from a file-scope static initializer.
struct FwdRegistration {
    FwdRegistration(KernelKey key, FwdLauncher launcher) { register_fwd_launcher(key, launcher); }
};
struct BwdRegistration {
    BwdRegistration(KernelKey key, BwdLauncher launcher) { register_bwd_launcher(key, launcher); }
};

}  // namespace ring_attn
