#include "ring/transfer_watchdog.h"

#include <c10/cuda/CUDAException.h>

#include <string>

namespace ring_attn {

TransferWatchdog::TransferWatchdog(int device, double timeout_s, std::function<std::string()> check_health,
                                   std::function<void(const std::string&)> on_failure)
    : device_(device),
      timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))),
      check_health_(std::move(check_health)),
      on_failure_(std::move(on_failure)),
      thread_([this] { run(); }) {}

TransferWatchdog::~TransferWatchdog() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
    for (const Mark& mark : pending_) cudaEventDestroy(mark.event);
    for (cudaEvent_t event : spare_) cudaEventDestroy(event);
}

void TransferWatchdog::watch(cudaStream_t stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
    cudaEvent_t event = nullptr;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!spare_.empty()) {
            event = spare_.back();
            spare_.pop_back();
        }
    }
    if (event == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event, stream));
    {
        std::lock_guard<std::mutex> lock(mutex_);
        pending_.push_back(Mark{event, Clock::now() + timeout_});
    }
}

std::string TransferWatchdog::check_pending() {
    // Marks of one stream complete in order: retire the completed ones from the front.
    while (!pending_.empty()) {
        const cudaError_t status = cudaEventQuery(pending_.front().event);
        if (status == cudaErrorNotReady) break;
        if (status != cudaSuccess) return std::string("CUDA error while waiting for the transfers: ") +
                                          cudaGetErrorString(status);
        spare_.push_back(pending_.front().event);
        pending_.pop_front();
    }
    if (pending_.empty()) return {};
    std::string health = check_health_();
    if (!health.empty()) return health;
    if (Clock::now() > pending_.front().deadline) return "the transfers made no progress within the timeout";
    return {};
}

void TransferWatchdog::run() {
    cudaSetDevice(device_);  // events are queried on the communicator's device
    // Queries from this thread must stay legal while another thread captures a CUDA graph (in the
    // default global mode, a capture forbids such calls on every thread that has not opted out).
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
        wake_.wait_for(lock, kPollInterval, [this] { return stopping_; });
        if (stopping_) return;
        const std::string failure = check_pending();
        if (!failure.empty()) {
            lock.unlock();
            on_failure_(failure);
            return;  // reported once; the owner decides what happens to the process
        }
    }
}

}  // namespace ring_attn
