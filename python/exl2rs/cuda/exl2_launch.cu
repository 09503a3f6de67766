// Grid shapes and dtype/batch-tile dispatch for the kernels in exl2_kernels.cuh.
#include "exl2_kernels.cuh"
#include "exl2_launch.h"

namespace exl2 {

int chunk_rows(int bits) {
  switch (bits) {
    case 2: return Width<2>::kChunkRows;
    case 3: return Width<3>::kChunkRows;
    case 4: return Width<4>::kChunkRows;
    case 5: return Width<5>::kChunkRows;
    case 6: return Width<6>::kChunkRows;
    case 8: return Width<8>::kChunkRows;
    default: return 0;
  }
}

int gemv_batch_tile(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : kMaxBatchTile; }

int tile_cols() { return kTileCols; }

namespace {

template <typename T>
cudaError_t dequant_typed(const uint32_t* q_weight, const uint32_t* q_scale,
                          const __half* q_scale_max, const int4* chunks, int chunk_begin,
                          int num_chunks, const int32_t* group_rows, const int32_t* perm,
                          int row_base, int np, int n, T* out, cudaStream_t stream) {
  if (num_chunks <= 0) return cudaSuccess;
  const dim3 grid((np + kTileCols - 1) / kTileCols, num_chunks);
  dequant_kernel<T><<<grid, kThreads, 0, stream>>>(q_weight, q_scale, q_scale_max, chunks,
                                                   group_rows, perm, chunk_begin, row_base, np,
                                                   n, out);
  return cudaGetLastError();
}

template <typename T, int MT>
void gemv_tiled(const T* x, int m, int k, const uint32_t* q_weight, const uint32_t* q_scale,
                const __half* q_scale_max, const int32_t* perm, const int4* chunks,
                int num_chunks, const int32_t* group_rows, int np, int n, int splits, T* y,
                float* workspace, cudaStream_t stream) {
  const int m_tiles = (m + MT - 1) / MT;
  const int n_tiles = (np + kTileCols - 1) / kTileCols;
  const dim3 grid(n_tiles * m_tiles, splits);
  gemv_kernel<T, MT><<<grid, kThreads, 0, stream>>>(x, m, k, q_weight, q_scale, q_scale_max,
                                                    perm, chunks, num_chunks, group_rows, np, n,
                                                    m_tiles, y, workspace);
}

template <typename T>
cudaError_t gemv_typed(const T* x, int m, int k, const uint32_t* q_weight,
                       const uint32_t* q_scale, const __half* q_scale_max, const int32_t* perm,
                       const int4* chunks, int num_chunks, const int32_t* group_rows, int np,
                       int n, int splits, T* y, float* workspace, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  switch (gemv_batch_tile(m)) {
    case 1: gemv_tiled<T, 1>(x, m, k, q_weight, q_scale, q_scale_max, perm, chunks, num_chunks, group_rows, np, n, splits, y, workspace, stream); break;
    case 2: gemv_tiled<T, 2>(x, m, k, q_weight, q_scale, q_scale_max, perm, chunks, num_chunks, group_rows, np, n, splits, y, workspace, stream); break;
    case 4: gemv_tiled<T, 4>(x, m, k, q_weight, q_scale, q_scale_max, perm, chunks, num_chunks, group_rows, np, n, splits, y, workspace, stream); break;
    default: gemv_tiled<T, kMaxBatchTile>(x, m, k, q_weight, q_scale, q_scale_max, perm, chunks, num_chunks, group_rows, np, n, splits, y, workspace, stream); break;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits <= 1) return err;
  const size_t total = (size_t)m * n;
  const int threads = 256;
  const int blocks = (int)((total + threads - 1) / threads < 65535 ? (total + threads - 1) / threads : 65535);
  splitk_reduce_kernel<T><<<blocks, threads, 0, stream>>>(workspace, splits, m, np, n, y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequant(DType dtype, const uint32_t* q_weight, const uint32_t* q_scale,
                           const void* q_scale_max, const int32_t* chunks, int chunk_begin,
                           int num_chunks, const int32_t* group_rows, const int32_t* perm,
                           int row_base, int np, int n, void* out, cudaStream_t stream) {
  const auto* smax = static_cast<const __half*>(q_scale_max);
  const auto* ch = reinterpret_cast<const int4*>(chunks);
  switch (dtype) {
    case DType::kFloat16:
      return dequant_typed(q_weight, q_scale, smax, ch, chunk_begin, num_chunks, group_rows, perm,
                           row_base, np, n, static_cast<__half*>(out), stream);
    case DType::kBFloat16:
      return dequant_typed(q_weight, q_scale, smax, ch, chunk_begin, num_chunks, group_rows, perm,
                           row_base, np, n, static_cast<__nv_bfloat16*>(out), stream);
    case DType::kFloat32:
      return dequant_typed(q_weight, q_scale, smax, ch, chunk_begin, num_chunks, group_rows, perm,
                           row_base, np, n, static_cast<float*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gemv(DType dtype, const void* x, int m, int k, const uint32_t* q_weight,
                        const uint32_t* q_scale, const void* q_scale_max, const int32_t* perm,
                        const int32_t* chunks, int num_chunks, const int32_t* group_rows, int np,
                        int n, int splits, void* y, float* workspace, cudaStream_t stream) {
  const auto* smax = static_cast<const __half*>(q_scale_max);
  const auto* ch = reinterpret_cast<const int4*>(chunks);
  switch (dtype) {
    case DType::kFloat16:
      return gemv_typed(static_cast<const __half*>(x), m, k, q_weight, q_scale, smax, perm, ch,
                        num_chunks, group_rows, np, n, splits, static_cast<__half*>(y), workspace,
                        stream);
    case DType::kBFloat16:
      return gemv_typed(static_cast<const __nv_bfloat16*>(x), m, k, q_weight, q_scale, smax, perm,
                        ch, num_chunks, group_rows, np, n, splits,
                        static_cast<__nv_bfloat16*>(y), workspace, stream);
    case DType::kFloat32:
      return gemv_typed(static_cast<const float*>(x), m, k, q_weight, q_scale, smax, perm, ch,
                        num_chunks, group_rows, np, n, splits, static_cast<float*>(y), workspace,
                        stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace exl2
