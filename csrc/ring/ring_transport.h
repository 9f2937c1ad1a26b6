// How a ring step's blocks move between neighbours. A step machine (ring_forward.h,
// ring_backward.h) describes each transfer as an Exchange; a transport carries it out:
//   - nccl_exchange: this process's rank, through NCCL send/recv on the communicator's stream;
//   - LoopbackTransport: all ranks of a ring simulated in one process on one GPU, with device
//     copies between the virtual ranks' buffers, so the same step machines can be tested at any
//     ring size on a single GPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "ring/cuda_event.h"
#include "ring/ring_communicator.h"

namespace ring_attn {

// One exchange of one rank: every tensor of `sends` goes to the next rank, every tensor of
// `recvs` comes from the previous rank, and the i-th send of a rank lands in the i-th recv of the
// next rank (same number of bytes; all contiguous). An exchange with neither is no transfer.
struct Exchange {
    std::vector<at::Tensor> sends;
    std::vector<at::Tensor> recvs;
    bool empty() const { return sends.empty() && recvs.empty(); }
};

// Enqueues `exchange` on `stream` as one NCCL group (sends and receives progress together, as a
// ring needs: every rank sends and receives at once).
void nccl_exchange(RingCommunicator& comm, const Exchange& exchange, cudaStream_t stream);

// Virtual ranks 0..N-1 of one process; rank r's transfers run on comm_streams[r]. Like an NCCL
// send/recv, an exchange starts once each side has reached it on its comm stream and completes
// for each side once its data has moved both ways.
class LoopbackTransport {
  public:
    explicit LoopbackTransport(std::vector<c10::cuda::CUDAStream> comm_streams);

    // per_rank[r] is rank r's exchange; the sends of each rank must match the receives of the next.
    void exchange(const std::vector<const Exchange*>& per_rank);

  private:
    std::vector<c10::cuda::CUDAStream> comm_streams_;
    std::vector<CudaEvent> reached_;   // rank r's comm stream has reached the exchange
    std::vector<CudaEvent> received_;  // the copies into rank r's receive buffers are done
};

}  // namespace ring_attn
