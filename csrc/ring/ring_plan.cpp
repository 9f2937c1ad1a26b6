#include "ring/ring_plan.h"
#include "../check_message.h"

#include <c10/util/Exception.h>

namespace ring_attn {

RingPlan make_ring_plan(const PlanLists& lists, int64_t world_size, int64_t seqlen_q, int64_t seqlen_k,
                        const char* name) {
    RA_CHECK_VALUE(static_cast<int64_t>(lists.size()) == world_size, name, " must have one step per rank (",
                      world_size, "), got ", lists.size());
    RingPlan plan;
    plan.reserve(lists.size());
    for (size_t step = 0; step < lists.size(); ++step) {
        RingStep pieces;
        pieces.reserve(lists[step].size());
        for (size_t index = 0; index < lists[step].size(); ++index) {
            const auto& [q_start, q_len, k_start, k_len, key_offset_min, key_offset_max] = lists[step][index];
            RA_CHECK_VALUE(q_start >= 0 && q_len >= 0 && q_start + q_len <= seqlen_q, name, "[", step, "][",
                              index, "]: query rows [", q_start, ", ", q_start + q_len,
                              ") must lie inside the local shard's ", seqlen_q, " rows");
            RA_CHECK_VALUE(k_start >= 0 && k_len >= 0 && k_start + k_len <= seqlen_k, name, "[", step, "][",
                              index, "]: key rows [", k_start, ", ", k_start + k_len,
                              ") must lie inside the K/V block's ", seqlen_k, " rows");
            pieces.push_back(PlanPiece{q_start, q_len, k_start, k_len, key_offset_min, key_offset_max});
        }
        plan.push_back(std::move(pieces));
    }
    return plan;
}

}  // namespace ring_attn
