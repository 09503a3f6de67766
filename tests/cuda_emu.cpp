// Runs the real kernels of python/exl2rs/cuda/exl2_kernels.cuh on the CPU (tests/test_cuda.py
// builds it with g++ and the CUDA headers when no GPU is present): one std::thread per CUDA
// thread, a std::barrier for __syncthreads, blocks one after another, __shared__ arrays as
// function statics (shared by the threads of the one block that runs at a time). Inputs and
// outputs are raw little-endian files in a folder; see usage in main().
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 gridDim;
thread_local dim3 blockDim;
static std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
template <class T> inline T __ldcs(const T* p) { return *p; }
inline float emu_uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
#define __uint_as_float emu_uint_as_float
#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)

#include "exl2_kernels.cuh"

template <class F> void run_grid(dim3 grid, int threads, F f) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(threads);
      g_barrier = &bar;
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = make_uint3(t, 0, 0);
          blockIdx = make_uint3(bx, by, 0);
          gridDim = grid;
          blockDim = dim3(threads);
          f();
        });
      for (auto& th : ts) th.join();
    }
}

template <class T> std::vector<T> read(const std::string& path, size_t n) {
  std::vector<T> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(T), n, f) != n) { std::fprintf(stderr, "read %s\n", path.c_str()); std::exit(2); }
  std::fclose(f);
  return v;
}
template <class T> void write(const std::string& path, const std::vector<T>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
}

template <class T, int MT>
void gemv(const std::string& d, int m, int k, int np, int n, int q, int g, int c, int splits) {
  auto x = read<T>(d + "/x", (size_t)m * k);
  auto qw = read<uint32_t>(d + "/q_weight", (size_t)q * np);
  auto qs = read<uint32_t>(d + "/q_scale", (size_t)g * np / 8);
  auto sm = read<__half>(d + "/q_scale_max", g);
  auto perm = read<int>(d + "/q_perm", k);
  auto ch = read<int4>(d + "/chunks", c);
  auto gr = read<int>(d + "/group_rows", g + 1);
  std::vector<T> y((size_t)m * n);
  std::vector<float> ws((size_t)splits * m * np, NAN);
  const int m_tiles = (m + MT - 1) / MT;
  const dim3 grid(((np + exl2::kTileCols - 1) / exl2::kTileCols) * m_tiles, splits);
  run_grid(grid, exl2::kThreads, [&] {
    exl2::gemv_kernel<T, MT>(x.data(), m, k, qw.data(), qs.data(), sm.data(), perm.data(),
                             ch.data(), c, gr.data(), np, n, m_tiles, y.data(), ws.data());
  });
  if (splits > 1) {
    run_grid(dim3(4, 1), 256, [&] {
      exl2::splitk_reduce_kernel<T>(ws.data(), splits, m, np, n, y.data());
    });
  }
  write(d + "/y", y);
}

template <class T>
void dequant(const std::string& d, int k, int np, int n, int q, int g, int c, bool storage) {
  auto qw = read<uint32_t>(d + "/q_weight", (size_t)q * np);
  auto qs = read<uint32_t>(d + "/q_scale", (size_t)g * np / 8);
  auto sm = read<__half>(d + "/q_scale_max", g);
  auto perm = read<int>(d + "/q_perm", k);
  auto ch = read<int4>(d + "/chunks", c);
  auto gr = read<int>(d + "/group_rows", g + 1);
  std::vector<T> w((size_t)k * n);
  if (!storage) {
    const dim3 grid((np + exl2::kTileCols - 1) / exl2::kTileCols, c);
    run_grid(grid, exl2::kThreads, [&] {
      exl2::dequant_kernel<T>(qw.data(), qs.data(), sm.data(), ch.data(), gr.data(), perm.data(),
                              0, 0, np, n, w.data());
    });
  } else {
    // Storage order in two chunk ranges, as the K-chunked large-batch path calls it.
    const int halves[3] = {0, c / 2, c};
    for (int h = 0; h < 2; ++h) {
      const int c0 = halves[h], nc = halves[h + 1] - c0;
      if (nc == 0) continue;
      const int row_base = ch[c0].x;
      const dim3 grid((np + exl2::kTileCols - 1) / exl2::kTileCols, nc);
      run_grid(grid, exl2::kThreads, [&] {
        exl2::dequant_kernel<T>(qw.data(), qs.data(), sm.data(), ch.data(), gr.data(), nullptr,
                                c0, row_base, np, n, w.data() + (size_t)row_base * n);
      });
    }
  }
  write(d + "/w", w);
}

template <class T>
void gemv_tile(const std::string& d, int m, int k, int np, int n, int q, int g, int c, int s) {
  // The batch tile exl2_launch.cu picks (gemv_batch_tile).
  if (m <= 1) gemv<T, 1>(d, m, k, np, n, q, g, c, s);
  else if (m <= 2) gemv<T, 2>(d, m, k, np, n, q, g, c, s);
  else if (m <= 4) gemv<T, 4>(d, m, k, np, n, q, g, c, s);
  else gemv<T, exl2::kMaxBatchTile>(d, m, k, np, n, q, g, c, s);
}

int main(int argc, char** argv) {
  if (argc != 12) { std::fprintf(stderr, "usage: emu dir mode dtype m k np n q g c splits\n"); return 2; }
  const std::string d = argv[1], mode = argv[2];
  const int dt = std::atoi(argv[3]), m = std::atoi(argv[4]), k = std::atoi(argv[5]),
            np = std::atoi(argv[6]), n = std::atoi(argv[7]), q = std::atoi(argv[8]),
            g = std::atoi(argv[9]), c = std::atoi(argv[10]), s = std::atoi(argv[11]);
  if (mode == "gemv") {
    if (dt == 0) gemv_tile<__half>(d, m, k, np, n, q, g, c, s);
    else if (dt == 1) gemv_tile<__nv_bfloat16>(d, m, k, np, n, q, g, c, s);
    else gemv_tile<float>(d, m, k, np, n, q, g, c, s);
  } else {
    const bool storage = mode == "dequant_storage";
    if (dt == 0) dequant<__half>(d, k, np, n, q, g, c, storage);
    else if (dt == 1) dequant<__nv_bfloat16>(d, k, np, n, q, g, c, storage);
    else dequant<float>(d, k, np, n, q, g, c, storage);
  }
  return 0;
}
