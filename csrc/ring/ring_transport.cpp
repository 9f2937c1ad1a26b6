#include "ring/ring_transport.h"
#include "../check_message.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace ring_attn {

void nccl_exchange(RingCommunicator& comm, const Exchange& exchange, cudaStream_t stream) {
    ncclComm_t handle = comm.handle();
    // Raw bytes: a transfer needs no reduction, so the element type does not matter.
    ncclResult_t result = ncclGroupStart();
    check_nccl(result, "ncclGroupStart", handle);
    for (const at::Tensor& t : exchange.sends) {
        if (result != ncclSuccess) break;
        result = ncclSend(t.data_ptr(), t.nbytes(), ncclUint8, comm.next_rank(), handle, stream);
    }
    for (const at::Tensor& t : exchange.recvs) {
        if (result != ncclSuccess) break;
        result = ncclRecv(t.data_ptr(), t.nbytes(), ncclUint8, comm.previous_rank(), handle, stream);
    }
    // The group is closed whatever happened inside it, so NCCL is left in a usable state.
    const ncclResult_t end_result = ncclGroupEnd();
    check_nccl(result, "ncclSend/ncclRecv", handle);
    // The communicator is non-blocking: the group may still be connecting or enqueueing. Later
    // work on `stream` (events the compute stream waits for) must follow the transfers.
    comm.wait_for_call(end_result, "the ring's block exchange (ncclSend/ncclRecv)");
}

namespace {

std::vector<CudaEvent> make_events(size_t count) {
    std::vector<CudaEvent> events;
    events.reserve(count);
    for (size_t i = 0; i < count; ++i) events.emplace_back();
    return events;
}

}  // namespace

LoopbackTransport::LoopbackTransport(std::vector<c10::cuda::CUDAStream> comm_streams)
    : comm_streams_(std::move(comm_streams)),
      reached_(make_events(comm_streams_.size())),
      received_(make_events(comm_streams_.size())) {}

void LoopbackTransport::exchange(const std::vector<const Exchange*>& per_rank) {
    const size_t world_size = comm_streams_.size();
    RA_CHECK(per_rank.size() == world_size, "loopback exchange: ", per_rank.size(), " exchanges for ",
                world_size, " ranks");
    const bool any = std::any_of(per_rank.begin(), per_rank.end(), [](const Exchange* e) { return !e->empty(); });
    if (!any) return;
    for (size_t rank = 0; rank < world_size; ++rank) {
        const Exchange& from = *per_rank[rank];
        const Exchange& to = *per_rank[(rank + 1) % world_size];
        RA_CHECK(from.sends.size() == to.recvs.size(), "loopback exchange: rank ", rank, " sends ",
                    from.sends.size(), " tensors but rank ", (rank + 1) % world_size, " receives ", to.recvs.size());
        for (size_t i = 0; i < from.sends.size(); ++i) {
            RA_CHECK(from.sends[i].nbytes() == to.recvs[i].nbytes() && from.sends[i].is_contiguous() &&
                            to.recvs[i].is_contiguous(),
                        "loopback exchange: send ", i, " of rank ", rank, " (", from.sends[i].nbytes(),
                        " bytes) does not match the receive buffer of the next rank (", to.recvs[i].nbytes(),
                        " bytes), or one of them is not contiguous");
        }
    }
    for (size_t rank = 0; rank < world_size; ++rank) reached_[rank].record(comm_streams_[rank]);
    // The receiver's comm stream does the copies once the sender has reached the exchange too.
    for (size_t rank = 0; rank < world_size; ++rank) {
        const size_t next = (rank + 1) % world_size;
        const cudaStream_t stream = comm_streams_[next];
        reached_[rank].block(stream);
        const Exchange& from = *per_rank[rank];
        const Exchange& to = *per_rank[next];
        for (size_t i = 0; i < from.sends.size(); ++i) {
            C10_CUDA_CHECK(cudaMemcpyAsync(to.recvs[i].data_ptr(), from.sends[i].data_ptr(), from.sends[i].nbytes(),
                                           cudaMemcpyDeviceToDevice, stream));
        }
        received_[next].record(stream);
    }
    // A sender may reuse its send buffers only once the next rank's copies have read them.
    for (size_t rank = 0; rank < world_size; ++rank) received_[(rank + 1) % world_size].block(comm_streams_[rank]);
}

}  // namespace ring_attn
