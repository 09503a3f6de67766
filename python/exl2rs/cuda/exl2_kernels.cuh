// EXL2 device kernels: dequantize, small-batch matmul (GEMV) and its split-K reduction.
//
// The kernels read the tensors exactly as exl2rs writes them (see ops.py for the formula):
//   q_weight int32 [Q, Np]   codes packed LSB-first along K, per group width, rows in act-order
//   q_scale  int32 [G, Np/8] 4-bit column scales (stored value + 1, squared), LSB first
//   q_scale_max fp16 [G]     per-group max scale
//   q_perm   int32 [K]       storage row i holds input row q_perm[i]
// The host turns q_groups into a chunk table once (cuda_ops.py caches it): a chunk is a run of
// at most kWarps "super-blocks" of one width, so each warp of a block decodes one super-block of
// whole 32-bit words per chunk. No float atomics anywhere: split-K partial sums go to a
// workspace that a second kernel reduces in split order, so results are bit-reproducible.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace exl2 {

constexpr int kWarps = 4;                  // warps per block
constexpr int kThreads = kWarps * 32;      // threads per block
constexpr int kColsPerThread = 4;          // one 128-bit load of q_weight covers 4 columns
constexpr int kTileCols = 32 * kColsPerThread;  // 128 output columns per block
constexpr int kMaxChunkRows = 256;         // largest chunk (2- and 3-bit); sizes the x slice
constexpr int kMaxBatchTile = 8;           // most activation rows one block keeps in registers

// Geometry of one width: a block is the fewest rows that fill whole words; a super-block is
// what one warp decodes per step (4-6 128-bit loads in flight per thread).
template <int BITS>
struct Width {
  static constexpr int kGcd = BITS == 2 ? 2 : BITS == 4 ? 4 : BITS == 6 ? 2 : BITS == 8 ? 8 : 1;
  static constexpr int kRows = 32 / kGcd;   // rows per block
  static constexpr int kWords = BITS / kGcd;  // q_weight rows per block
  static constexpr int kUnroll = kWords == 1 ? 4 : kWords == 3 ? 2 : 1;  // blocks per step
  static constexpr int kSuperRows = kRows * kUnroll;
  static constexpr int kChunkRows = kSuperRows * kWarps;
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
  // 2^23 + zero point: subtracting it from the float whose mantissa holds the code gives
  // (code - zero) exactly, without an int-to-float conversion (quarter rate on the SM).
  static constexpr float kBias = 8388608.0f + float(1 << (BITS - 1));
  static_assert(kChunkRows <= kMaxChunkRows, "chunk larger than the shared x slice");
};

// Chunk descriptor (int4): storage row of the first row, rows, q_weight row of the first row,
// and (group of the first row) << 4 | bits.
struct Chunk {
  int row;
  int rows;
  int qrow;
  int group;
  int bits;
};

__device__ __forceinline__ Chunk load_chunk(const int4* chunks, int c) {
  const int4 v = chunks[c];
  return Chunk{v.x, v.y, v.z, v.w >> 4, v.w & 15};
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Four consecutive outputs in one vector store (dst is aligned to 4 elements).
__device__ __forceinline__ void store4(float* dst, const float (&v)[4]) {
  *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__half* dst, const float (&v)[4]) {
  __half2* d = reinterpret_cast<__half2*>(dst);
  d[0] = __floats2half2_rn(v[0], v[1]);
  d[1] = __floats2half2_rn(v[2], v[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16* dst, const float (&v)[4]) {
  __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst);
  d[0] = __floats2bfloat162_rn(v[0], v[1]);
  d[1] = __floats2bfloat162_rn(v[2], v[3]);
}

// Code r of a block (compile-time r after unrolling, so every shift is a constant).
template <int BITS>
__device__ __forceinline__ float code_minus_zero(const uint32_t (&w)[Width<BITS>::kWords], int r) {
  const int bit = r * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  uint32_t v = w[wi] >> sh;
  if (sh + BITS > 32) v |= w[wi + 1] << (32 - sh);  // a code straddling two words
  return __uint_as_float((v & Width<BITS>::kMask) | 0x4B000000u) - Width<BITS>::kBias;
}

// Column scales of group g for columns n0..n0+3: (qs + 1)^2 and max / 256 (exact: a power of
// two), kept apart so the dequantized value is (q - z)·(qs+1)² (an exact integer) · max/256,
// the same single rounding as the CPU reference.
__device__ __forceinline__ void group_scales(const uint32_t* __restrict__ q_scale,
                                             const __half* __restrict__ q_scale_max, int g,
                                             int np, int n0, float (&sq)[kColsPerThread],
                                             float& smax) {
  const uint32_t word = q_scale[(size_t)g * (np / 8) + n0 / 8];
  const int base = (n0 & 7) * 4;
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    const int qs1 = int((word >> (base + 4 * c)) & 15u) + 1;
    sq[c] = float(qs1 * qs1);
  }
  smax = __half2float(q_scale_max[g]) * (1.0f / 256.0f);
}

// ---------------------------------------------------------------------------------------------
// Dequantize: one block = 128 columns of one chunk; warp w decodes super-block w.
// Output row of storage row i: perm[i] when perm is given (original order), else i - row_base.

template <int BITS, typename T>
__device__ __forceinline__ void dequant_chunk(const Chunk& ch, const uint32_t* __restrict__ q_weight,
                                              const uint32_t* __restrict__ q_scale,
                                              const __half* __restrict__ q_scale_max,
                                              const int* __restrict__ group_rows,
                                              const int* __restrict__ perm, int row_base, int np,
                                              int n, int n0, T* __restrict__ out) {
  using Wd = Width<BITS>;
  const int warp = threadIdx.x >> 5;
  const int r_sb = warp * Wd::kSuperRows;  // this warp's first row in the chunk
  if (r_sb >= ch.rows || n0 >= np) return;
  int g = ch.group;
  int sg = -1;
  float sq[kColsPerThread];
  float smax = 0.0f;
  // Not unrolled: the fp32 instance spilled when it was, and each block's loads are grouped.
#pragma unroll 1
  for (int u = 0; u < Wd::kUnroll; ++u) {
    const int r_blk = r_sb + u * Wd::kRows;
    if (r_blk >= ch.rows) break;
    const int row = ch.row + r_blk;
    while (row >= group_rows[g + 1]) ++g;
    if (g != sg) {
      group_scales(q_scale, q_scale_max, g, np, n0, sq, smax);
      sg = g;
    }
    uint32_t w[kColsPerThread][Wd::kWords];
    const int q0 = ch.qrow + (r_blk / Wd::kRows) * Wd::kWords;
#pragma unroll
    for (int k = 0; k < Wd::kWords; ++k) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(q_weight + (size_t)(q0 + k) * np + n0));
      w[0][k] = v.x;
      w[1][k] = v.y;
      w[2][k] = v.z;
      w[3][k] = v.w;
    }
    const bool whole = (n & 3) == 0 && n0 + kColsPerThread <= n;  // 4 aligned columns
#pragma unroll
    for (int r = 0; r < Wd::kRows; ++r) {
      const int i = row + r;
      const size_t orow = perm != nullptr ? (size_t)perm[i] : (size_t)(i - row_base);
      T* dst = out + orow * n + n0;
      float v[kColsPerThread];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) v[c] = code_minus_zero<BITS>(w[c], r) * sq[c] * smax;
      if (whole) {
        store4(dst, v);
      } else {
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c)
          if (n0 + c < n) dst[c] = from_float<T>(v[c]);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequant_kernel(const uint32_t* __restrict__ q_weight, const uint32_t* __restrict__ q_scale,
                   const __half* __restrict__ q_scale_max, const int4* __restrict__ chunks,
                   const int* __restrict__ group_rows, const int* __restrict__ perm,
                   int chunk_begin, int row_base, int np, int n, T* __restrict__ out) {
  const Chunk ch = load_chunk(chunks, chunk_begin + blockIdx.y);
  const int n0 = blockIdx.x * kTileCols + (threadIdx.x & 31) * kColsPerThread;
  switch (ch.bits) {
    case 2: dequant_chunk<2, T>(ch, q_weight, q_scale, q_scale_max, group_rows, perm, row_base, np, n, n0, out); break;
    case 3: dequant_chunk<3, T>(ch, q_weight, q_scale, q_scale_max, group_rows, perm, row_base, np, n, n0, out); break;
    case 4: dequant_chunk<4, T>(ch, q_weight, q_scale, q_scale_max, group_rows, perm, row_base, np, n, n0, out); break;
    case 5: dequant_chunk<5, T>(ch, q_weight, q_scale, q_scale_max, group_rows, perm, row_base, np, n, n0, out); break;
    case 6: dequant_chunk<6, T>(ch, q_weight, q_scale, q_scale_max, group_rows, perm, row_base, np, n, n0, out); break;
    case 8: dequant_chunk<8, T>(ch, q_weight, q_scale, q_scale_max, group_rows, perm, row_base, np, n, n0, out); break;
    default: break;  // the host validated the widths
  }
}

// ---------------------------------------------------------------------------------------------
// GEMV / small batch: y[m, n] = sum_i x[m, perm[i]] · w(i, n) for MT activation rows at once.
// grid.x = column tiles × batch tiles (batch tile fastest, so blocks reading the same weights
// run together and share them through L2), grid.y = K splits (ranges of chunks).

template <int BITS, int MT>
__device__ __forceinline__ void gemv_chunk(const Chunk& ch, const uint32_t* __restrict__ q_weight,
                                           const uint32_t* __restrict__ q_scale,
                                           const __half* __restrict__ q_scale_max,
                                           const int* __restrict__ group_rows, int np, int n0,
                                           const float* __restrict__ xs,
                                           float (&acc)[MT][kColsPerThread]) {
  using Wd = Width<BITS>;
  const int warp = threadIdx.x >> 5;
  const int r_sb = warp * Wd::kSuperRows;
  if (r_sb >= ch.rows || n0 >= np) return;

  // All loads of the super-block first, then the arithmetic.
  uint32_t w[Wd::kUnroll][kColsPerThread][Wd::kWords];
  const int q_sb = ch.qrow + (r_sb / Wd::kRows) * Wd::kWords;
#pragma unroll
  for (int u = 0; u < Wd::kUnroll; ++u) {
    if (r_sb + u * Wd::kRows < ch.rows) {
#pragma unroll
      for (int k = 0; k < Wd::kWords; ++k) {
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(
            q_weight + (size_t)(q_sb + u * Wd::kWords + k) * np + n0));
        w[u][0][k] = v.x;
        w[u][1][k] = v.y;
        w[u][2][k] = v.z;
        w[u][3][k] = v.w;
      }
    }
  }

  int g = ch.group;
  int sg = -1;
  float sq[kColsPerThread];
  float smax = 0.0f;
#pragma unroll
  for (int u = 0; u < Wd::kUnroll; ++u) {
    const int r_blk = r_sb + u * Wd::kRows;
    if (r_blk >= ch.rows) break;
    const int row = ch.row + r_blk;
    while (row >= group_rows[g + 1]) ++g;
    if (g != sg) {
      group_scales(q_scale, q_scale_max, g, np, n0, sq, smax);
      sg = g;
    }
    // Sum of (q - z)·x over the block, then one multiply by the group's column scale.
    float part[MT][kColsPerThread];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) part[m][c] = 0.0f;
#pragma unroll
    for (int r = 0; r < Wd::kRows; r += 4) {
      float q[4][kColsPerThread];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) q[j][c] = code_minus_zero<BITS>(w[u][c], r + j);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float4 xv = *reinterpret_cast<const float4*>(xs + m * kMaxChunkRows + r_blk + r);
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          part[m][c] = fmaf(q[0][c], xv.x, part[m][c]);
          part[m][c] = fmaf(q[1][c], xv.y, part[m][c]);
          part[m][c] = fmaf(q[2][c], xv.z, part[m][c]);
          part[m][c] = fmaf(q[3][c], xv.w, part[m][c]);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const float s = sq[c] * smax;
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(part[m][c], s, acc[m][c]);
    }
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(const T* __restrict__ x, int m_rows, int k_rows,
                const uint32_t* __restrict__ q_weight, const uint32_t* __restrict__ q_scale,
                const __half* __restrict__ q_scale_max, const int* __restrict__ perm,
                const int4* __restrict__ chunks, int num_chunks,
                const int* __restrict__ group_rows, int np, int n, int m_tiles,
                T* __restrict__ y, float* __restrict__ workspace) {
  __shared__ __align__(16) float xs[MT * kMaxChunkRows];
  __shared__ __align__(16) float red[kWarps][MT][kTileCols];

  const int m_tile = blockIdx.x % m_tiles;
  const int n_tile = blockIdx.x / m_tiles;
  const int m0 = m_tile * MT;
  const int split = blockIdx.y;
  const int splits = gridDim.y;
  const int c_begin = (int)(((long long)num_chunks * split) / splits);
  const int c_end = (int)(((long long)num_chunks * (split + 1)) / splits);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n0 = n_tile * kTileCols + lane * kColsPerThread;

  float acc[MT][kColsPerThread];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) acc[m][c] = 0.0f;

  for (int ci = c_begin; ci < c_end; ++ci) {
    const Chunk ch = load_chunk(chunks, ci);
    __syncthreads();  // the previous chunk's x slice is no longer read
    // Gather the chunk's activations into storage order (act-order), fp32.
    for (int idx = threadIdx.x; idx < MT * ch.rows; idx += kThreads) {
      const int m = idx / ch.rows;
      const int r = idx - m * ch.rows;
      const int mm = m0 + m;
      xs[m * kMaxChunkRows + r] =
          mm < m_rows ? to_float<T>(x[(size_t)mm * k_rows + perm[ch.row + r]]) : 0.0f;
    }
    __syncthreads();
    switch (ch.bits) {
      case 2: gemv_chunk<2, MT>(ch, q_weight, q_scale, q_scale_max, group_rows, np, n0, xs, acc); break;
      case 3: gemv_chunk<3, MT>(ch, q_weight, q_scale, q_scale_max, group_rows, np, n0, xs, acc); break;
      case 4: gemv_chunk<4, MT>(ch, q_weight, q_scale, q_scale_max, group_rows, np, n0, xs, acc); break;
      case 5: gemv_chunk<5, MT>(ch, q_weight, q_scale, q_scale_max, group_rows, np, n0, xs, acc); break;
      case 6: gemv_chunk<6, MT>(ch, q_weight, q_scale, q_scale_max, group_rows, np, n0, xs, acc); break;
      case 8: gemv_chunk<8, MT>(ch, q_weight, q_scale, q_scale_max, group_rows, np, n0, xs, acc); break;
      default: break;
    }
  }

  // Reduce the warps' partial sums in warp order (fixed, so deterministic).
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) red[warp][m][lane * kColsPerThread + c] = acc[m][c];
  __syncthreads();
  for (int idx = threadIdx.x; idx < MT * kTileCols; idx += kThreads) {
    const int m = idx / kTileCols;
    const int col = idx - m * kTileCols;
    float s = red[0][m][col];
#pragma unroll
    for (int wp = 1; wp < kWarps; ++wp) s += red[wp][m][col];
    const int mm = m0 + m;
    const int nn = n_tile * kTileCols + col;
    if (mm >= m_rows || nn >= np) continue;
    if (splits == 1) {
      if (nn < n) y[(size_t)mm * n + nn] = from_float<T>(s);
    } else {
      workspace[((size_t)split * m_rows + mm) * np + nn] = s;
    }
  }
}

// Sums the split partials in split order and converts to the output dtype.
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ workspace, int splits, int m_rows,
                                     int np, int n, T* __restrict__ y) {
  const size_t total = (size_t)m_rows * n;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (size_t)gridDim.x * blockDim.x) {
    const size_t mm = idx / n;
    const size_t nn = idx - mm * n;
    float s = 0.0f;
    for (int sp = 0; sp < splits; ++sp) s += workspace[((size_t)sp * m_rows + mm) * np + nn];
    y[idx] = from_float<T>(s);
  }
}

}  // namespace exl2
