#include "ring/ring_communicator.h"
#include "../check_message.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace ring_attn {

namespace {

// "NCCL error in <what>: <NCCL's name for result> (<NCCL's last error message, if any>)".
std::string nccl_error_text(ncclResult_t result, const char* what, ncclComm_t comm) {
    const char* detail = ncclGetLastError(comm);
    return std::string("NCCL error in ") + what + ": " + ncclGetErrorString(result) +
           (detail != nullptr && detail[0] != '\0' ? std::string(" (") + detail + ")" : std::string());
}

}  // namespace

void check_nccl(ncclResult_t result, const char* what, ncclComm_t comm) {
    if (result == ncclSuccess) return;
    RA_CHECK(false, nccl_error_text(result, what, comm), ". Set NCCL_DEBUG=WARN for NCCL's own log.");
}

std::string nccl_unique_id() {
    ncclUniqueId id;
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", nullptr);
    return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

namespace {

c10::cuda::CUDAStream checked_stream(int rank, int world_size, int device, double timeout_s) {
    RA_CHECK_VALUE(world_size >= 1, "world_size must be positive, got ", world_size);
    RA_CHECK_VALUE(rank >= 0 && rank < world_size, "rank must lie in [0, world_size=", world_size, "), got ",
                      rank);
    RA_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "device must be a CUDA device index in [0, ",
                      static_cast<int>(c10::cuda::device_count()), "), got ", device);
    RA_CHECK_VALUE(std::isfinite(timeout_s) && timeout_s > 0, "timeout_s must be a positive number of seconds, got ",
                      timeout_s);
    // High priority: the block transfers gate the next steps' kernels, so they should get SMs first.
    return c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device));
}

// "600 s", "2.5 s" (snprintf: never an ostream inside the extension, see check_message.h).
std::string seconds_text(double seconds) {
    char text[32];
    std::snprintf(text, sizeof(text), "%g s", seconds);
    return text;
}

// What ncclCommGetAsyncError reports for `comm`: ncclSuccess, ncclInProgress or an error.
ncclResult_t async_state(ncclComm_t comm) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t result = ncclCommGetAsyncError(comm, &state);
    return result != ncclSuccess ? result : state;
}

}  // namespace

RingCommunicator::RingCommunicator(const std::string& unique_id, int rank, int world_size, int device,
                                   double timeout_s)
    : rank_(rank),
      world_size_(world_size),
      device_(device),
      timeout_s_(timeout_s),
      stream_(checked_stream(rank, world_size, device, timeout_s)) {
    RA_CHECK_VALUE(unique_id.size() == NCCL_UNIQUE_ID_BYTES, "unique_id must be the ", NCCL_UNIQUE_ID_BYTES,
                      " bytes of an ncclUniqueId (from nccl_unique_id()), got ", unique_id.size(), " bytes");
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    wait_for_call(ncclCommInitRankConfig(&comm_, world_size, id, rank, &config),
                  "joining the ring (ncclCommInitRankConfig)");

    watchdog_ = std::make_unique<TransferWatchdog>(
        device, timeout_s,
        [this] {
            const ncclResult_t state = async_state(comm_);
            if (state == ncclSuccess || state == ncclInProgress) return std::string();
            return std::string("NCCL reported ") + ncclGetErrorString(state);
        },
        [this](const std::string& reason) {
            const std::string message = "ring_attn_ext: rank " + std::to_string(rank_) + " of a ring of " +
                                        std::to_string(world_size_) + ": " + reason + " (timeout " +
                                        seconds_text(timeout_s_) +
                                        ", RING_ATTN_TIMEOUT_S). Did a rank die, or stop calling the ring? "
                                        "Ending this process: the unfinished ring's results would be wrong.\n";
            std::fputs(message.c_str(), stderr);
            std::fflush(stderr);
            // Abort at once, without ncclCommAbort first: aborting the communicator lets the stuck
            // kernels finish, and the caller's thread would go on with the unfinished results
            // before this thread got to end the process (seen on two H200s). Ending the process
            // tears down its CUDA context, stuck kernels included.
            std::abort();
        });
}

RingCommunicator::~RingCommunicator() {
    watchdog_.reset();
    if (comm_ != nullptr) ncclCommAbort(comm_);
}

void RingCommunicator::destroy() {
    if (comm_ == nullptr) return;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    watchdog_.reset();
    // Finalize waits (within the timeout) for this communicator's unfinished operations.
    wait_for_call(ncclCommFinalize(comm_), "ncclCommFinalize");
    ncclComm_t comm = comm_;
    comm_ = nullptr;
    check_nccl(ncclCommDestroy(comm), "ncclCommDestroy", nullptr);
}

ncclComm_t RingCommunicator::handle() const {
    if (comm_ == nullptr && !abort_reason_.empty()) {
        TORCH_CHECK_WITH(DistBackendError, false, "ring_attn_ext: this process group's ring communicator was "
                         "aborted: ", abort_reason_, ". Its ranks cannot run another ring together: restart the "
                         "processes (from a checkpoint).");
    }
    RA_CHECK(comm_ != nullptr, "this RingCommunicator was destroyed");
    return comm_;
}

void RingCommunicator::wait_for_call(ncclResult_t result, const char* what) {
    if (result != ncclSuccess && result != ncclInProgress) abort_and_raise(nccl_error_text(result, what, comm_));
    using Clock = std::chrono::steady_clock;
    const Clock::time_point start = Clock::now();
    const Clock::time_point deadline =
        start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
    while (true) {
        const ncclResult_t state = async_state(comm_);
        if (state == ncclSuccess) return;
        if (state != ncclInProgress) abort_and_raise(nccl_error_text(state, what, comm_));
        if (Clock::now() > deadline) {
            abort_and_raise(std::string("timed out after ") + seconds_text(timeout_s_) + " in " + what +
                            " (rank " + std::to_string(rank_) + " of " + std::to_string(world_size_) +
                            "; RING_ATTN_TIMEOUT_S sets the limit). Did a rank die, or stop calling the ring?");
        }
        // Spin briefly (an exchange is usually enqueued within microseconds), then stop burning a
        // core while, say, the other ranks are still on their way to joining.
        if (Clock::now() - start < std::chrono::milliseconds(2)) {
            std::this_thread::yield();
        } else {
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
    }
}

void RingCommunicator::watch_transfers() {
    if (watchdog_ != nullptr) watchdog_->watch(stream_);
}

void RingCommunicator::abort(const std::string& reason) noexcept {
    watchdog_.reset();
    if (comm_ != nullptr) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        abort_reason_ = reason;
    }
}

void RingCommunicator::abort_and_raise(const std::string& message) {
    abort(message);
    TORCH_CHECK_WITH(DistBackendError, false, message + ". The ring's communicator was aborted.");
}

}  // namespace ring_attn
