// The Python module ring_attn_ext._C: thin bindings, tensors in and tensors out. Argument rules
// are enforced in flash_api.cpp (and again, with friendlier messages, in the Python layer).
#include <torch/extension.h>

#include "flash_api.h"
#include "ring/ring_bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "ring_attn_ext CUDA kernels";
    namespace py = pybind11;
    using namespace ring_attn;
    m.def("fwd", &flash_fwd, "Attention forward: returns (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("softmax_scale"), py::arg("key_offset_min"), py::arg("key_offset_max"));
    m.def("fwd_merge", &flash_fwd_merge,
          "Attention forward merged into a running fp32 (out, lse), in place; with out_final, the merged "
          "out is written there in q's dtype instead (emit mode, the last contribution to these rows)",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out_accum"), py::arg("lse_accum"),
          py::arg("softmax_scale"), py::arg("key_offset_min"), py::arg("key_offset_max"),
          py::arg("out_final") = py::none());
    m.def("bwd_delta", &flash_bwd_delta,
          "rowsum(dout * out) in fp32, (b, h, s_q); with dq_accum, also zero-fills that fp32 tensor",
          py::arg("dout"), py::arg("out"), py::arg("dq_accum") = py::none());
    m.def("bwd_accumulate", &flash_bwd_accumulate,
          "Attention backward added into fp32 accumulators; with dkv_overwrite (no GQA) dk_accum and "
          "dv_accum are written instead of added to",
          py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lse"), py::arg("delta"),
          py::arg("dq_accum"), py::arg("dk_accum"), py::arg("dv_accum"), py::arg("softmax_scale"),
          py::arg("key_offset_min"), py::arg("key_offset_max"), py::arg("dkv_overwrite") = false);
    m.def("bwd", &flash_bwd, "Attention backward: returns (dq, dk, dv)", py::arg("dout"), py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("softmax_scale"),
          py::arg("key_offset_min"), py::arg("key_offset_max"));
    m.def("varlen_fwd", &flash_varlen_fwd,
          "Forward of packed variable-length sequences in one launch, written into out and lse in place",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("sequences"),
          py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("softmax_scale"), py::arg("is_masked"));
    m.def("varlen_bwd_accumulate", &flash_varlen_bwd_accumulate,
          "Backward of packed variable-length sequences in one launch, added into fp32 accumulators",
          py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lse"), py::arg("delta"),
          py::arg("dq_accum"), py::arg("dk_accum"), py::arg("dv_accum"), py::arg("sequences"),
          py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("softmax_scale"), py::arg("is_masked"));
    m.def("supported_head_dims", &supported_head_dims, "Head dims compiled into this build");
    m.def("compiled_kernels", &compiled_kernel_list,
          "(direction, head_dim, dtype, is_masked) of every kernel compiled into this build");
    register_ring_bindings(m);
}
