// torch glue for the EXL2 kernels: tensor checks, output allocation, the current stream.
// Python (cuda_ops.py) validates the user's tensors first and builds the chunk table; the
// checks here guard the raw pointers handed to the launchers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "exl2_launch.h"

namespace {

exl2::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return exl2::DType::kFloat16;
    case at::kBFloat16: return exl2::DType::kBFloat16;
    case at::kFloat: return exl2::DType::kFloat32;
    default: TORCH_CHECK(false, "exl2rs CUDA kernels: unsupported dtype ", t,
                         " (expected float16, bfloat16 or float32)");
  }
  return exl2::DType::kFloat32;
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim,
                  const at::Device& device) {
  TORCH_CHECK(t.device() == device, "exl2rs CUDA kernels: ", name, " is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "exl2rs CUDA kernels: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "exl2rs CUDA kernels: ", name, " must be ", dim, "-D, got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "exl2rs CUDA kernels: ", name, " must be contiguous");
}

struct Weights {
  const at::Tensor& q_weight;
  const at::Tensor& q_scale;
  const at::Tensor& q_scale_max;
  const at::Tensor& chunks;
  const at::Tensor& group_rows;
};

void check_weights(const Weights& w, int64_t out_features) {
  const auto dev = w.q_weight.device();
  TORCH_CHECK(dev.is_cuda(), "exl2rs CUDA kernels: q_weight must be a CUDA tensor");
  check_tensor(w.q_weight, "q_weight", at::kInt, 2, dev);
  check_tensor(w.q_scale, "q_scale", at::kInt, 2, dev);
  check_tensor(w.q_scale_max, "q_scale_max", at::kHalf, 1, dev);
  check_tensor(w.chunks, "chunks", at::kInt, 2, dev);
  check_tensor(w.group_rows, "group_rows", at::kInt, 1, dev);
  const int64_t np = w.q_weight.size(1);
  TORCH_CHECK(np % 32 == 0 && out_features > np - 32 && out_features <= np,
              "exl2rs CUDA kernels: out_features ", out_features, " does not match q_weight's ",
              np, " padded columns");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.q_weight.data_ptr()) % 16 == 0,
              "exl2rs CUDA kernels: q_weight must be 16-byte aligned for 128-bit loads");
  TORCH_CHECK(w.q_scale.size(1) == np / 8 && w.q_scale.size(0) == w.q_scale_max.size(0),
              "exl2rs CUDA kernels: q_scale ", w.q_scale.sizes(), " does not match q_weight ",
              w.q_weight.sizes(), " and q_scale_max ", w.q_scale_max.sizes());
  TORCH_CHECK(w.chunks.size(1) == 4, "exl2rs CUDA kernels: chunks must be [C, 4]");
  TORCH_CHECK(w.group_rows.size(0) == w.q_scale_max.size(0) + 1,
              "exl2rs CUDA kernels: group_rows must have one entry per group plus one");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "exl2rs CUDA kernels: ", what, " failed: ",
              cudaGetErrorString(err));
}

// W rows of chunks [chunk_begin, chunk_begin + num_chunks): into the original row order via perm
// (then the output has perm's K rows), or in storage order (then `rows` rows from row_base).
at::Tensor dequantize(const at::Tensor& q_weight, const at::Tensor& q_scale,
                      const at::Tensor& q_scale_max, const at::Tensor& chunks,
                      const at::Tensor& group_rows, int64_t chunk_begin, int64_t num_chunks,
                      const c10::optional<at::Tensor>& perm, int64_t row_base, int64_t rows,
                      int64_t out_features, at::ScalarType dtype) {
  const Weights w{q_weight, q_scale, q_scale_max, chunks, group_rows};
  check_weights(w, out_features);
  TORCH_CHECK(chunk_begin >= 0 && num_chunks >= 0 && chunk_begin + num_chunks <= chunks.size(0),
              "exl2rs CUDA kernels: chunk range out of bounds");
  const c10::cuda::CUDAGuard guard(q_weight.device());
  const int32_t* perm_ptr = nullptr;
  if (perm.has_value()) {
    check_tensor(*perm, "q_perm", at::kInt, 1, q_weight.device());
    TORCH_CHECK(perm->size(0) == rows, "exl2rs CUDA kernels: q_perm has ", perm->size(0),
                " rows, expected ", rows);
    perm_ptr = perm->data_ptr<int32_t>();
  }
  auto out = at::empty({rows, out_features}, q_weight.options().dtype(dtype));
  check_cuda(exl2::launch_dequant(kernel_dtype(dtype),
                                  reinterpret_cast<const uint32_t*>(q_weight.data_ptr<int32_t>()),
                                  reinterpret_cast<const uint32_t*>(q_scale.data_ptr<int32_t>()),
                                  q_scale_max.data_ptr(), chunks.data_ptr<int32_t>(),
                                  (int)chunk_begin, (int)num_chunks,
                                  group_rows.data_ptr<int32_t>(), perm_ptr, (int)row_base,
                                  (int)q_weight.size(1), (int)out_features, out.data_ptr(),
                                  at::cuda::getCurrentCUDAStream()),
             "dequantize launch");
  return out;
}

// y [M, out_features] = x [M, K] @ W with `splits` K-splits.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& q_weight, const at::Tensor& q_scale,
                const at::Tensor& q_scale_max, const at::Tensor& perm, const at::Tensor& chunks,
                const at::Tensor& group_rows, int64_t out_features, int64_t splits) {
  const Weights w{q_weight, q_scale, q_scale_max, chunks, group_rows};
  check_weights(w, out_features);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device() == q_weight.device(),
              "exl2rs CUDA kernels: x must be a contiguous [M, K] tensor on ", q_weight.device());
  check_tensor(perm, "q_perm", at::kInt, 1, q_weight.device());
  TORCH_CHECK(x.size(1) == perm.size(0), "exl2rs CUDA kernels: x has ", x.size(1),
              " features, q_perm ", perm.size(0));
  TORCH_CHECK(splits >= 1 && splits <= std::max<int64_t>(chunks.size(0), 1),
              "exl2rs CUDA kernels: splits must lie in 1..", chunks.size(0), ", got ", splits);
  TORCH_CHECK(x.size(0) <= 65535LL * exl2::gemv_batch_tile((int)x.size(0)),
              "exl2rs CUDA kernels: batch too large for the GEMV kernel");
  const c10::cuda::CUDAGuard guard(q_weight.device());
  const int64_t m = x.size(0);
  const int64_t np = q_weight.size(1);
  auto y = at::empty({m, out_features}, x.options());
  at::Tensor workspace;
  if (splits > 1) workspace = at::empty({splits, m, np}, x.options().dtype(at::kFloat));
  check_cuda(exl2::launch_gemv(kernel_dtype(x.scalar_type()), x.data_ptr(), (int)m,
                               (int)x.size(1),
                               reinterpret_cast<const uint32_t*>(q_weight.data_ptr<int32_t>()),
                               reinterpret_cast<const uint32_t*>(q_scale.data_ptr<int32_t>()),
                               q_scale_max.data_ptr(), perm.data_ptr<int32_t>(),
                               chunks.data_ptr<int32_t>(), (int)chunks.size(0),
                               group_rows.data_ptr<int32_t>(), (int)np, (int)out_features,
                               (int)splits, y.data_ptr(),
                               splits > 1 ? workspace.data_ptr<float>() : nullptr,
                               at::cuda::getCurrentCUDAStream()),
             "gemv launch");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "exl2rs EXL2 CUDA kernels (dequantize, GEMV); use exl2rs.ops, not this module";
  m.def("dequantize", &dequantize, "EXL2 dequantize", py::arg("q_weight"), py::arg("q_scale"),
        py::arg("q_scale_max"), py::arg("chunks"), py::arg("group_rows"),
        py::arg("chunk_begin"), py::arg("num_chunks"), py::arg("perm"), py::arg("row_base"),
        py::arg("rows"), py::arg("out_features"), py::arg("dtype"));
  m.def("gemv", &gemv, "EXL2 small-batch matmul", py::arg("x"), py::arg("q_weight"),
        py::arg("q_scale"), py::arg("q_scale_max"), py::arg("perm"), py::arg("chunks"),
        py::arg("group_rows"), py::arg("out_features"), py::arg("splits"));
  m.def("chunk_rows", &exl2::chunk_rows, "rows of one chunk at a width", py::arg("bits"));
  m.def("gemv_batch_tile", &exl2::gemv_batch_tile, "activation rows per GEMV block",
        py::arg("m"));
  m.def("tile_cols", &exl2::tile_cols, "output columns per block");
}
