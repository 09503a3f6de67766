// Host launchers of the EXL2 kernels: plain pointers and a stream, no torch types, so this
// header and exl2_launch.cu compile with nvcc alone (make cuda-check does exactly that).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace exl2 {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Rows of one chunk at a width (what the host's chunk table must use); 0 for a bad width.
int chunk_rows(int bits);

// Activation rows one GEMV block handles for a batch of m rows (1, 2, 4 or 8).
int gemv_batch_tile(int m);

// Output columns per block.
int tile_cols();

// W rows of chunks [chunk_begin, chunk_begin + num_chunks) into out ([*, n], row-major):
// storage row i goes to row perm[i] when perm is not null, else to row i - row_base.
cudaError_t launch_dequant(DType dtype, const uint32_t* q_weight, const uint32_t* q_scale,
                           const void* q_scale_max, const int32_t* chunks, int chunk_begin,
                           int num_chunks, const int32_t* group_rows, const int32_t* perm,
                           int row_base, int np, int n, void* out, cudaStream_t stream);

// y [m, n] = x [m, k] @ W. With splits > 1, workspace holds splits * m * np floats.
cudaError_t launch_gemv(DType dtype, const void* x, int m, int k, const uint32_t* q_weight,
                        const uint32_t* q_scale, const void* q_scale_max, const int32_t* perm,
                        const int32_t* chunks, int num_chunks, const int32_t* group_rows, int np,
                        int n, int splits, void* y, float* workspace, cudaStream_t stream);

}  // namespace exl2
