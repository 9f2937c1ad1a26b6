// Torch-facing entry points of the ring: argument checks (all of them before any transfer, so a
// bad argument raises instead of leaving the other ranks waiting), stream set-up, and the drivers.
//
// q, k, v, dout, out: this rank's shards (b, s, h, d) / (b, s_k, h_kv, d), CUDA, float16 or
// bfloat16; lse: fp32 (b, h, s) of the GLOBAL forward. plan: ring_attn_ext.ring_plan.build_plan's
// steps as lists of piece tuples. The ring runs on the caller's current stream (attention kernels)
// and the communicator's stream (transfers, and the backward's dK/dV adds); results are ordered on
// the caller's stream.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "ring/ring_communicator.h"
#include "ring/ring_plan.h"

namespace ring_attn {

// comm: the ring's communicator; null allowed for a ring of one rank. Collective over the ring.
std::tuple<at::Tensor, at::Tensor> ring_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const PlanLists& plan, RingCommunicator* comm,
                                            double softmax_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        const PlanLists& plan, RingCommunicator* comm,
                                                        double softmax_scale);

// A whole ring on one GPU: entry r of each list belongs to virtual rank r (plans[r] is its plan).
// Each virtual rank gets its own compute and comm streams; results are ordered on the caller's.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> ring_fwd_loopback(
    const std::vector<at::Tensor>& q_shards, const std::vector<at::Tensor>& k_shards,
    const std::vector<at::Tensor>& v_shards, const std::vector<PlanLists>& plans, double softmax_scale);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> ring_bwd_loopback(
    const std::vector<at::Tensor>& dout_shards, const std::vector<at::Tensor>& q_shards,
    const std::vector<at::Tensor>& k_shards, const std::vector<at::Tensor>& v_shards,
    const std::vector<at::Tensor>& out_shards, const std::vector<at::Tensor>& lse_shards,
    const std::vector<PlanLists>& plans, double softmax_scale);

}  // namespace ring_attn
