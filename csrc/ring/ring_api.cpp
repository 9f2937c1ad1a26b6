#include "ring/ring_api.h"
#include "../check_message.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <memory>
#include <tuple>
#include <vector>
#include <string>

#include "flash/kernel_registry.h"
#include "ring/cuda_event.h"
#include "ring/ring_backward.h"
#include "ring/ring_driver.h"
#include "ring/ring_forward.h"

namespace ring_attn {
namespace {

// The kernels read rows with 16-byte vector loads (flash_api.cpp checks the same per call; the
// ring checks up front, before any rank starts to transfer).
constexpr int64_t kAlignmentBytes = 16;

// "q" for this rank's argument, "q_shards[2]" for a loopback ring's virtual rank 2.
std::string shard_name(const char* name, std::optional<size_t> index) {
    return index ? std::string(name) + "_shards[" + std::to_string(*index) + "]" : std::string(name);
}

// A (b, s, heads, d) operand of the kernels, on `like`'s device with `like`'s dtype.
void check_operand(const at::Tensor& t, const std::string& name, const at::Tensor& like) {
    RA_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
    RA_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
    RA_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
    RA_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                     " must be float16 or bfloat16, got ", t.scalar_type());
    RA_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
                     t.scalar_type());
    RA_CHECK_VALUE(t.dim() == 4, name, " must have 4 dimensions (batch, seqlen, heads, head_dim), got shape ",
                      t.sizes());
    RA_CHECK_VALUE(t.stride(3) == 1, name, " must have a contiguous last dimension (stride 1), got stride ",
                      t.stride(3));
    RA_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlignmentBytes == 0, name,
                      " must start at a 16-byte aligned address");
    for (int dim = 0; dim < 3; ++dim) {
        RA_CHECK_VALUE(t.size(dim) == 1 || (t.stride(dim) * t.element_size()) % kAlignmentBytes == 0, name,
                          " stride ", t.stride(dim), " of dimension ", dim, " is not a multiple of 16 bytes");
    }
}

void check_shape(const at::Tensor& t, const std::string& name, at::IntArrayRef expected) {
    RA_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

// q (b, s_q, h, d), k and v (b, s_k, h_kv, d) with h % h_kv == 0.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<size_t> index) {
    const std::string q_name = shard_name("q", index), k_name = shard_name("k", index), v_name = shard_name("v", index);
    check_operand(q, q_name, q);
    check_operand(k, k_name, q);
    check_operand(v, v_name, q);
    RA_CHECK_VALUE(q.size(0) > 0 && q.size(2) > 0, q_name, " must have a positive batch size and head count, got ",
                      "shape ", q.sizes());
    RA_CHECK_VALUE(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "the number of heads of ", k_name, " and ", v_name,
                      " (", k.size(2), ") must divide the number of heads of ", q_name, " (", q.size(2), ")");
    check_shape(k, k_name, {q.size(0), k.size(1), k.size(2), q.size(3)});
    check_shape(v, v_name, k.sizes());
}

void check_backward_operands(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                             const at::Tensor& lse, std::optional<size_t> index) {
    const std::string dout_name = shard_name("dout", index), out_name = shard_name("out", index);
    const std::string lse_name = shard_name("lse", index);
    check_operand(dout, dout_name, q);
    check_operand(out, out_name, q);
    check_shape(dout, dout_name, q.sizes());
    check_shape(out, out_name, q.sizes());
    RA_CHECK_VALUE(lse.defined(), lse_name, " must be a tensor, got None");
    RA_CHECK_TYPE(lse.scalar_type() == at::kFloat, lse_name, " must be float32, got ", lse.scalar_type());
    RA_CHECK_VALUE(lse.device() == q.device(), lse_name, " must be on ", q.device(), ", got ", lse.device());
    check_shape(lse, lse_name, {q.size(0), q.size(2), q.size(1)});
    RA_CHECK_VALUE(lse.stride(2) == 1, lse_name, " must have a contiguous last dimension (stride 1)");
}

void check_scale(double softmax_scale) {
    RA_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0,
                      "softmax_scale must be a positive finite number, got ", softmax_scale);
}

// Both mask variants of (head_dim, dtype) must be compiled; a missing one would otherwise only
// surface at the first step that needs it, in the middle of the ring.
void check_kernels(const at::Tensor& q, bool backward) {
    const int head_dim = static_cast<int>(q.size(3));
    const DType dtype = q.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
    for (bool masked : {false, true}) {
        const KernelKey key{head_dim, dtype, masked};
        const bool found = backward ? find_bwd_launcher(key) != nullptr : find_fwd_launcher(key) != nullptr;
        RA_CHECK_VALUE(found, backward ? "backward " : "forward ", "kernels for head_dim ", head_dim,
                          " with dtype ", q.scalar_type(), " are not compiled into this build (see ",
                          "RING_ATTN_HEAD_DIMS, RING_ATTN_DTYPES and RING_ATTN_DISABLE_BACKWARD)");
    }
}

RingPlan checked_plan(const PlanLists& plan, const RingCommunicator* comm, const at::Tensor& q,
                      const at::Tensor& k) {
    RA_CHECK_VALUE(comm != nullptr || plan.size() <= 1, "a plan of ", plan.size(),
                      " steps is a ring of as many ranks and needs comm (a RingCommunicator)");
    if (comm != nullptr) {
        RA_CHECK_VALUE(comm->device() == q.device().index(), "comm is bound to cuda:", comm->device(),
                          " but the tensors are on ", q.device());
    }
    return make_ring_plan(plan, comm != nullptr ? comm->world_size() : 1, q.size(1), k.size(1), "plan");
}

// Loopback: the lists have one entry per virtual rank.
void check_loopback_lists(std::initializer_list<std::pair<const char*, size_t>> sizes, size_t plans) {
    const size_t world_size = sizes.begin()->second;
    RA_CHECK_VALUE(world_size >= 1, sizes.begin()->first, " must hold at least one shard");
    for (const auto& [name, size] : sizes) {
        RA_CHECK_VALUE(size == world_size, name, " must hold one entry per virtual rank (", world_size, "), got ",
                          size);
    }
    RA_CHECK_VALUE(plans == world_size, "plans must hold one plan per virtual rank (", world_size, "), got ",
                      plans);
}

void check_same_shape_as_rank0(const std::vector<at::Tensor>& shards, const char* name) {
    for (size_t rank = 1; rank < shards.size(); ++rank) {
        check_shape(shards[rank], shard_name(name, rank), shards[0].sizes());
    }
}

// Checks every virtual rank's q/k/v shard (each rank's shards must have rank 0's shapes: the
// transfers between virtual ranks need equal block sizes, as NCCL ranks would), the scale and the
// kernels, and converts the plans.
std::vector<RingPlan> checked_loopback_shards(const std::vector<at::Tensor>& q_shards,
                                              const std::vector<at::Tensor>& k_shards,
                                              const std::vector<at::Tensor>& v_shards,
                                              const std::vector<PlanLists>& plans, double softmax_scale,
                                              bool backward) {
    const size_t world_size = q_shards.size();
    std::vector<RingPlan> ring_plans;
    for (size_t rank = 0; rank < world_size; ++rank) {
        check_qkv(q_shards[rank], k_shards[rank], v_shards[rank], rank);
        check_operand(q_shards[rank], shard_name("q", rank), q_shards[0]);
        const std::string plan_name = "plans[" + std::to_string(rank) + "]";
        ring_plans.push_back(make_ring_plan(plans[rank], static_cast<int64_t>(world_size), q_shards[rank].size(1),
                                            k_shards[rank].size(1), plan_name.c_str()));
    }
    check_same_shape_as_rank0(q_shards, "q");
    check_same_shape_as_rank0(k_shards, "k");
    check_scale(softmax_scale);
    check_kernels(q_shards[0], backward);
    return ring_plans;
}

// Runs a whole ring of `world_size` virtual ranks on `like`'s GPU: make_machine(rank, compute
// stream, comm stream) builds rank r's step machine; each rank computes on its own pool stream,
// which starts after the caller's work. Returns, per result of Machine::finish(), the list over
// ranks, ordered on the caller's stream (and recorded as used by it, for the caching allocator).
template <typename Machine, typename MakeMachine>
auto run_virtual_ring(size_t world_size, const at::Tensor& like, MakeMachine make_machine) {
    c10::cuda::CUDAGuard guard(like.device());
    const c10::DeviceIndex device = like.device().index();
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device);
    CudaEvent inputs_ready;
    inputs_ready.record(caller);
    std::vector<c10::cuda::CUDAStream> compute, comm;
    std::vector<std::unique_ptr<Machine>> machines;
    for (size_t rank = 0; rank < world_size; ++rank) {
        compute.push_back(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device));
        comm.push_back(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device));
        inputs_ready.block(compute.back());
        machines.push_back(make_machine(rank, compute.back(), comm.back()));
    }
    LoopbackTransport transport(comm);
    run_loopback_ring(machines, transport);

    using Results = decltype(machines[0]->finish());  // a tuple of tensors
    auto per_result = std::apply(
        [](const auto&... result) { return std::make_tuple(std::vector<std::decay_t<decltype(result)>>{}...); },
        Results{});
    for (size_t rank = 0; rank < world_size; ++rank) {
        Results results = machines[rank]->finish();
        CudaEvent done;
        done.record(compute[rank]);
        done.block(caller);
        std::apply([&](auto&... lists) {
            std::apply([&](auto&... tensors) {
                (tensors.record_stream(caller), ...);
                (lists.push_back(tensors), ...);
            }, results);
        }, per_result);
    }
    return per_result;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ring_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const PlanLists& plan, RingCommunicator* comm,
                                            double softmax_scale) {
    check_qkv(q, k, v, std::nullopt);
    check_scale(softmax_scale);
    check_kernels(q, /*backward=*/false);
    const RingPlan ring_plan = checked_plan(plan, comm, q, k);
    c10::cuda::CUDAGuard guard(q.device());
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream();
    const c10::cuda::CUDAStream transfers = comm != nullptr ? comm->stream() : compute;
    return run_nccl_ring(
        [&] { return std::make_unique<RingForward>(q, k, v, ring_plan, softmax_scale, compute, transfers); }, comm,
        compute);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        const PlanLists& plan, RingCommunicator* comm,
                                                        double softmax_scale) {
    check_qkv(q, k, v, std::nullopt);
    check_backward_operands(dout, q, out, lse, std::nullopt);
    check_scale(softmax_scale);
    check_kernels(q, /*backward=*/true);
    const RingPlan ring_plan = checked_plan(plan, comm, q, k);
    c10::cuda::CUDAGuard guard(q.device());
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream();
    const c10::cuda::CUDAStream transfers = comm != nullptr ? comm->stream() : compute;
    return run_nccl_ring(
        [&] {
            return std::make_unique<RingBackward>(dout, q, k, v, out, lse, ring_plan, softmax_scale, compute,
                                                  transfers);
        },
        comm, compute);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> ring_fwd_loopback(
    const std::vector<at::Tensor>& q_shards, const std::vector<at::Tensor>& k_shards,
    const std::vector<at::Tensor>& v_shards, const std::vector<PlanLists>& plans, double softmax_scale) {
    check_loopback_lists({{"q_shards", q_shards.size()}, {"k_shards", k_shards.size()}, {"v_shards", v_shards.size()}},
                         plans.size());
    const std::vector<RingPlan> ring_plans =
        checked_loopback_shards(q_shards, k_shards, v_shards, plans, softmax_scale, /*backward=*/false);
    return run_virtual_ring<RingForward>(q_shards.size(), q_shards[0], [&](size_t rank, auto compute, auto comm) {
        return std::make_unique<RingForward>(q_shards[rank], k_shards[rank], v_shards[rank], ring_plans[rank],
                                             softmax_scale, compute, comm);
    });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> ring_bwd_loopback(
    const std::vector<at::Tensor>& dout_shards, const std::vector<at::Tensor>& q_shards,
    const std::vector<at::Tensor>& k_shards, const std::vector<at::Tensor>& v_shards,
    const std::vector<at::Tensor>& out_shards, const std::vector<at::Tensor>& lse_shards,
    const std::vector<PlanLists>& plans, double softmax_scale) {
    check_loopback_lists({{"q_shards", q_shards.size()}, {"dout_shards", dout_shards.size()},
                          {"k_shards", k_shards.size()}, {"v_shards", v_shards.size()},
                          {"out_shards", out_shards.size()}, {"lse_shards", lse_shards.size()}},
                         plans.size());
    const std::vector<RingPlan> ring_plans =
        checked_loopback_shards(q_shards, k_shards, v_shards, plans, softmax_scale, /*backward=*/true);
    for (size_t rank = 0; rank < q_shards.size(); ++rank) {
        check_backward_operands(dout_shards[rank], q_shards[rank], out_shards[rank], lse_shards[rank], rank);
    }
    return run_virtual_ring<RingBackward>(q_shards.size(), q_shards[0], [&](size_t rank, auto compute, auto comm) {
        return std::make_unique<RingBackward>(dout_shards[rank], q_shards[rank], k_shards[rank], v_shards[rank],
                                              out_shards[rank], lse_shards[rank], ring_plans[rank], softmax_scale,
                                              compute, comm);
    });
}

}  // namespace ring_attn
