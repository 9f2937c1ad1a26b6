#include "ring/ring_communicator.h"
#include "../check_message.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <cstring>

namespace ring_attn {

void check_nccl(ncclResult_t result, const char* what, ncclComm_t comm) {
    if (result == ncclSuccess) return;
    const char* detail = ncclGetLastError(comm);
    RA_CHECK(false, "NCCL error in ", what, ": ", ncclGetErrorString(result),
                (detail != nullptr && detail[0] != '\0') ? std::string(" (") + detail + ")" : std::string(),
                ". Set NCCL_DEBUG=WARN for NCCL's own log.");
}

std::string nccl_unique_id() {
    ncclUniqueId id;
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", nullptr);
    return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

namespace {

c10::cuda::CUDAStream checked_stream(int rank, int world_size, int device) {
    RA_CHECK_VALUE(world_size >= 1, "world_size must be positive, got ", world_size);
    RA_CHECK_VALUE(rank >= 0 && rank < world_size, "rank must lie in [0, world_size=", world_size, "), got ",
                      rank);
    RA_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "device must be a CUDA device index in [0, ",
                      static_cast<int>(c10::cuda::device_count()), "), got ", device);
    // High priority: the block transfers gate the next steps' kernels, so they should get SMs first.
    return c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device));
}

}  // namespace

RingCommunicator::RingCommunicator(const std::string& unique_id, int rank, int world_size, int device)
    : rank_(rank), world_size_(world_size), device_(device), stream_(checked_stream(rank, world_size, device)) {
    RA_CHECK_VALUE(unique_id.size() == NCCL_UNIQUE_ID_BYTES, "unique_id must be the ", NCCL_UNIQUE_ID_BYTES,
                      " bytes of an ncclUniqueId (from nccl_unique_id()), got ", unique_id.size(), " bytes");
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    check_nccl(ncclCommInitRank(&comm_, world_size, id, rank), "ncclCommInitRank", nullptr);
}

RingCommunicator::~RingCommunicator() {
    if (comm_ != nullptr) ncclCommAbort(comm_);
}

void RingCommunicator::destroy() {
    if (comm_ == nullptr) return;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    ncclComm_t comm = comm_;
    comm_ = nullptr;
    check_nccl(ncclCommDestroy(comm), "ncclCommDestroy", nullptr);
}

ncclComm_t RingCommunicator::handle() const {
    RA_CHECK(comm_ != nullptr, "this RingCommunicator was destroyed");
    return comm_;
}

}  // namespace ring_attn
