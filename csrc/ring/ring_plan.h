// The ring's per-step plan as the C++ scheduler sees it: plain kernel calls, no layout knowledge.
// ring_attn_ext/ring_plan.py builds it (see its docstring for the contract); step i lists the
// kernel calls a rank makes on the K/V block it holds at step i.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace ring_attn {

// Query rows [q_start, q_start + q_len) of the local shard against key rows
// [k_start, k_start + k_len) of the block held; within the piece key j is visible to query i iff
// key_offset_min <= j - i <= key_offset_max (nullopt = unbounded), as in flash_api.h.
struct PlanPiece {
    int64_t q_start, q_len, k_start, k_len;
    std::optional<int64_t> key_offset_min, key_offset_max;
};

using RingStep = std::vector<PlanPiece>;
using RingPlan = std::vector<RingStep>;

// What Python passes: one tuple per piece, in PlanPiece's field order.
using PieceTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, std::optional<int64_t>, std::optional<int64_t>>;
using PlanLists = std::vector<std::vector<PieceTuple>>;

// Converts and checks a plan for a ring of `world_size` ranks whose query shards have `seqlen_q`
// rows and whose K/V blocks have `seqlen_k` rows: one step per rank, every piece inside both.
// `name` names the argument in error messages.
RingPlan make_ring_plan(const PlanLists& lists, int64_t world_size, int64_t seqlen_q, int64_t seqlen_k,
                        const char* name);

}  // namespace ring_attn
