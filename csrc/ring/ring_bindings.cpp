#include "ring/ring_bindings.h"

#include <torch/extension.h>

#include <memory>
#include <string>

#include "ring/ring_api.h"
#include "ring/ring_communicator.h"

namespace ring_attn {

void register_ring_bindings(pybind11::module_& m) {
    namespace py = pybind11;
    // The ring functions enqueue GPU work only; they hold no Python object, so the GIL is released
    // (ring_attn_ext._ring_cuda converts the plan to plain lists first).
    using release_gil = py::call_guard<py::gil_scoped_release>;

    py::class_<RingCommunicator, std::shared_ptr<RingCommunicator>>(
        m, "RingCommunicator", "The NCCL communicator of one ring, bound to one CUDA device, with its transfer stream")
        .def(py::init([](const py::bytes& unique_id, int rank, int world_size, int device, double timeout_s) {
                 std::string id = unique_id;
                 py::gil_scoped_release release;  // waits (up to timeout_s) until every rank has joined
                 return std::make_shared<RingCommunicator>(id, rank, world_size, device, timeout_s);
             }),
             "Collective: every rank calls it with the unique id from nccl_unique_id() that rank 0 made. "
             "Waits, joins and transfers that make no progress for timeout_s seconds abort the ring",
             py::arg("unique_id"), py::arg("rank"), py::arg("world_size"), py::arg("device"), py::arg("timeout_s"))
        .def_property_readonly("rank", &RingCommunicator::rank)
        .def_property_readonly("world_size", &RingCommunicator::world_size)
        .def_property_readonly("device", &RingCommunicator::device)
        .def_property_readonly("timeout_s", &RingCommunicator::timeout_s)
        .def("destroy", &RingCommunicator::destroy, "Releases the NCCL communicator (idempotent)", release_gil());

    m.def(
        "nccl_unique_id", []() { return py::bytes(nccl_unique_id()); },
        "A fresh ncclUniqueId as bytes, for RingCommunicator");
    m.def("ring_fwd", &ring_fwd, "Ring attention forward of this rank: returns (out, lse)", py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("plan"), py::arg("comm").none(true), py::arg("softmax_scale"),
          release_gil());
    m.def("ring_bwd", &ring_bwd, "Ring attention backward of this rank: returns (dq, dk, dv)", py::arg("dout"),
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("plan"),
          py::arg("comm").none(true), py::arg("softmax_scale"), release_gil());
    m.def("ring_fwd_loopback", &ring_fwd_loopback,
          "A whole ring simulated on one GPU (virtual rank r = list entry r): returns (outs, lses)",
          py::arg("q_shards"), py::arg("k_shards"), py::arg("v_shards"), py::arg("plans"), py::arg("softmax_scale"),
          release_gil());
    m.def("ring_bwd_loopback", &ring_bwd_loopback,
          "The backward of a whole ring simulated on one GPU: returns (dqs, dks, dvs)", py::arg("dout_shards"),
          py::arg("q_shards"), py::arg("k_shards"), py::arg("v_shards"), py::arg("out_shards"),
          py::arg("lse_shards"), py::arg("plans"), py::arg("softmax_scale"), release_gil());
}

}  // namespace ring_attn
