// The two drivers of the ring step machines (RingForward, RingBackward): both run the same
// protocol, phase by phase: machine.exchange(p), the transport, machine.compute(p). Host code
// only enqueues work: nothing here waits for the GPU.
#pragma once

#include <c10/util/Exception.h>
#include "../check_message.h"

#include <memory>
#include <vector>

#include "ring/ring_communicator.h"
#include "ring/ring_transport.h"

namespace ring_attn {

// This process's rank of a real ring. `comm` may be null only for a ring of one rank, which
// exchanges nothing.
template <typename Machine>
void run_nccl_ring(Machine& machine, RingCommunicator* comm) {
    for (int phase = 0; phase < machine.num_phases(); ++phase) {
        const Exchange& exchange = machine.exchange(phase);
        if (!exchange.empty()) {
            RA_CHECK(comm != nullptr, "a ring of several ranks needs an NCCL communicator");
            nccl_exchange(*comm, exchange, machine.comm_stream());
        }
        machine.compute(phase);
    }
    if (comm != nullptr) comm->watch_transfers();
}

// All ranks of a ring in this process: machines[r] is virtual rank r. Every machine reaches a
// phase's exchange before the transport pairs their buffers, as NCCL ranks would.
template <typename Machine>
void run_loopback_ring(std::vector<std::unique_ptr<Machine>>& machines, LoopbackTransport& transport) {
    std::vector<const Exchange*> exchanges(machines.size());
    const int phases = machines.front()->num_phases();
    for (int phase = 0; phase < phases; ++phase) {
        for (size_t rank = 0; rank < machines.size(); ++rank) exchanges[rank] = &machines[rank]->exchange(phase);
        transport.exchange(exchanges);
        for (auto& machine : machines) machine->compute(phase);
    }
}

}  // namespace ring_attn
