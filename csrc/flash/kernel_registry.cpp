#include "kernel_registry.h"

#include <algorithm>
#include <map>
#include <tuple>

namespace ring_attn {
namespace {

using Key = std::tuple<int, int, bool>;

Key as_tuple(KernelKey key) { return {key.head_dim, static_cast<int>(key.dtype), key.is_masked}; }

// Function-local statics: registration runs during static initialisation of other translation
// units, whose order relative to this one is unspecified.
std::map<Key, FwdLauncher>& fwd_table() {
    static std::map<Key, FwdLauncher> table;
    return table;
}
std::map<Key, BwdLauncher>& bwd_table() {
    static std::map<Key, BwdLauncher> table;
    return table;
}

}  // namespace

void register_fwd_launcher(KernelKey key, FwdLauncher launcher) { fwd_table()[as_tuple(key)] = launcher; }
void register_bwd_launcher(KernelKey key, BwdLauncher launcher) { bwd_table()[as_tuple(key)] = launcher; }

FwdLauncher find_fwd_launcher(KernelKey key) {
    auto it = fwd_table().find(as_tuple(key));
    return it == fwd_table().end() ? nullptr : it->second;
}

BwdLauncher find_bwd_launcher(KernelKey key) {
    auto it = bwd_table().find(as_tuple(key));
    return it == bwd_table().end() ? nullptr : it->second;
}

std::vector<int> compiled_head_dims() {
    std::vector<int> dims;
    for (const auto& entry : fwd_table()) {
        int d = std::get<0>(entry.first);
        if (std::find(dims.begin(), dims.end(), d) == dims.end()) dims.push_back(d);
    }
    std::sort(dims.begin(), dims.end());
    return dims;
}

std::vector<CompiledKernel> compiled_kernels() {
    std::vector<CompiledKernel> kernels;
    auto add = [&kernels](const char* direction, const Key& key) {
        kernels.push_back({direction, std::get<0>(key), dtype_name(static_cast<DType>(std::get<1>(key))),
                           std::get<2>(key)});
    };
    for (const auto& entry : fwd_table()) add("fwd", entry.first);
    for (const auto& entry : bwd_table()) add("bwd", entry.first);
    return kernels;
}

std::string dtype_name(DType dtype) { return dtype == DType::kFloat16 ? "float16" : "bfloat16"; }

}  // namespace ring_attn
