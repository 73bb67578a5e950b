// CUDA implementation of calibfast::channel_stats_update (schema in calibfast/_ops.py; the
// registration for the CUDA dispatch key is in channel_stats_register.cpp, so that this file
// includes only the few ATen/c10 headers it needs and compiles quickly).
//
// One launch per update, one read of the input, no host synchronisation, no allocation (so it can
// be captured in a CUDA graph). Each block folds a tile of channels over a range of rows into
// registers, reduces across its threads in shared memory and commits to the running state with
// atomics: min/max through the ordered-integer trick, sums in float64 (atomicAdd), counts in
// 64-bit integers.
//
// Layouts (see csrc/common.h):
//   kRows    channels contiguous: 32 threads x VEC channels per warp (16-byte loads when the
//            channel count and every row offset allow), 8 warps stride over rows.
//   kRuns    channel-major with contiguous runs (NCHW): one block per (channel, slice of outer
//            rows); threads walk each run, coalesced.
//   kStrided anything else: the row kernel with VEC = 1 and a channel stride.
//
// Sums are accumulated in float64 from the first value (Hopper and Ampere data-centre parts run
// float64 at half the float32 rate, far above what memory bandwidth feeds), so neither precision
// nor overflow of huge finite values depends on how many values a thread adds.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"

namespace calibfast {
namespace cuda {

namespace {

constexpr int kWarps = 8;        // rows handled side by side in a block of the row kernel
constexpr int kUnroll = 4;       // rows each thread loads before using any (bytes in flight)
constexpr int kRunThreads = 256; // threads per block of the run kernel

// ---- loads --------------------------------------------------------------------------------
struct LdF32 {
  using in_t = float;
  using acc_t = float;
  __device__ __forceinline__ static acc_t load(in_t v) { return v; }
};
struct LdF64 {
  using in_t = double;
  using acc_t = double;
  __device__ __forceinline__ static acc_t load(in_t v) { return v; }
};
struct LdBF16 {
  using in_t = uint16_t;
  using acc_t = float;
  __device__ __forceinline__ static acc_t load(in_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
};
struct LdF16 {
  using in_t = uint16_t;
  using acc_t = float;
  __device__ __forceinline__ static acc_t load(in_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---- atomics ------------------------------------------------------------------------------
// Float min/max on the ordered-integer views: non-negative floats order as signed ints, negative
// ones in reverse as unsigned ints. Values are never NaN here.
__device__ __forceinline__ void atomic_min_float(float* addr, float v) {
  if (!signbit(v)) {
    atomicMin(reinterpret_cast<int*>(addr), __float_as_int(v));
  } else {
    atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
  }
}
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
  if (!signbit(v)) {
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  } else {
    atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
  }
}

template <typename acc_t>
struct Acc {
  acc_t mn, mx, amn;  // finite values only
  double s, sa, sq;

  __device__ __forceinline__ void init() {
    mn = INFINITY;
    mx = -INFINITY;
    amn = INFINITY;
    s = sa = sq = 0.0;
  }
  // Folds v when finite; returns false when it is not.
  __device__ __forceinline__ bool add(acc_t v) {
    const acc_t a = fabs(v);
    const bool fin = isfinite(v);
    if (fin) {
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
      amn = a < amn ? a : amn;
      const double d = static_cast<double>(v);
      s += d;
      sa += fabs(d);
      sq = fma(d, d, sq);
    }
    return fin;
  }
};

// Commits one channel's block-level result to the running state.
template <typename acc_t>
__device__ __forceinline__ void commit(int64_t C, int64_t c, acc_t mn, acc_t mx, acc_t amn, double s, double sa,
                                       double sq, unsigned long long nnan, unsigned long long ninf,
                                       float* __restrict__ fst, double* __restrict__ dst,
                                       unsigned long long* __restrict__ ist) {
  if (mn <= mx) {  // some finite value was seen
    atomic_min_float(fst + c, static_cast<float>(mn));
    atomic_max_float(fst + C + c, static_cast<float>(mx));
    atomic_min_float(fst + 2 * C + c, static_cast<float>(amn));
    atomicAdd(dst + c, s);
    atomicAdd(dst + C + c, sa);
    atomicAdd(dst + 2 * C + c, sq);
  }
  if (nnan) atomicAdd(ist + C + c, nnan);
  if (ninf) atomicAdd(ist + 2 * C + c, ninf);
}

// ---- the row kernel (kRows, kStrided) -----------------------------------------------------
template <class Ld, int VEC, bool kUnit>
__global__ void __launch_bounds__(32 * kWarps) rows_kernel(const typename Ld::in_t* __restrict__ x, RowOffsets off,
                                                            int64_t rows, int64_t C, int64_t cs,
                                                            int64_t rows_per_block, float* __restrict__ fst,
                                                            double* __restrict__ dst,
                                                            unsigned long long* __restrict__ ist) {
  using acc_t = typename Ld::acc_t;
  using in_t = typename Ld::in_t;
  constexpr int kTile = 32 * VEC;  // channels per block
  __shared__ double red[kWarps][kTile];
  __shared__ unsigned int snan[kTile];
  __shared__ unsigned int sinf[kTile];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * 32 + tx;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c0 = tile0 + static_cast<int64_t>(tx) * VEC;
  const bool active = c0 < C;  // VEC > 1 only when C % VEC == 0, so the whole pack is in range

  for (int i = tid; i < kTile; i += 32 * kWarps) {
    snan[i] = 0;
    sinf[i] = 0;
  }
  __syncthreads();

  Acc<acc_t> acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j].init();

  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = min(rows, r_begin + rows_per_block);
  if (active) {
    // kUnroll rows' loads are issued before any is used, so that enough bytes are in flight to
    // cover memory latency.
    for (int64_t r = r_begin + ty; r < r_end; r += kWarps * kUnroll) {
      in_t v[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t ru = r + u * kWarps;
        if (ru < r_end) {
          const in_t* p = x + off(ru) + c0 * cs;
          if (kUnit && VEC > 1) {
            const Pack<in_t, VEC> pk = *reinterpret_cast<const Pack<in_t, VEC>*>(p);
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[u][j] = pk.v[j];
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[u][j] = p[j * cs];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * kWarps < r_end) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t f = Ld::load(v[u][j]);
            if (!acc[j].add(f)) {
              if (isnan(f)) {
                atomicAdd(&snan[tx * VEC + j], 1u);
              } else {
                atomicAdd(&sinf[tx * VEC + j], 1u);
              }
            }
          }
        }
      }
    }
  }

  // Reduce the kWarps partial results of each channel; thread t finishes channel t of the tile.
  const int64_t ct = tile0 + tid;
  const bool owner = tid < kTile && ct < C;
  acc_t mn = INFINITY, mx = -INFINITY, amn = INFINITY;
  double s = 0, sa = 0, sq = 0;
#define CALIBFAST_REDUCE(field, out, op)                                   \
  __syncthreads();                                                         \
  _Pragma("unroll") for (int j = 0; j < VEC; ++j) red[ty][tx * VEC + j] = \
      static_cast<double>(acc[j].field);                                  \
  __syncthreads();                                                         \
  if (owner) {                                                             \
    for (int w = 0; w < kWarps; ++w) {                                     \
      const double q = red[w][tid];                                        \
      op;                                                                  \
    }                                                                      \
  }
  CALIBFAST_REDUCE(mn, mn, mn = q < mn ? static_cast<acc_t>(q) : mn)
  CALIBFAST_REDUCE(mx, mx, mx = q > mx ? static_cast<acc_t>(q) : mx)
  CALIBFAST_REDUCE(amn, amn, amn = q < amn ? static_cast<acc_t>(q) : amn)
  CALIBFAST_REDUCE(s, s, s += q)
  CALIBFAST_REDUCE(sa, sa, sa += q)
  CALIBFAST_REDUCE(sq, sq, sq += q)
#undef CALIBFAST_REDUCE
  if (owner) {
    commit<acc_t>(C, ct, mn, mx, amn, s, sa, sq, snan[tid], sinf[tid], fst, dst, ist);
    if (blockIdx.y == 0) ist[ct] += static_cast<unsigned long long>(rows);
  }
}

// ---- the run kernel (kRuns) -----------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T warp_min(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_down_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_down_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <class Ld>
__global__ void __launch_bounds__(kRunThreads) runs_kernel(const typename Ld::in_t* __restrict__ x, RowOffsets outer,
                                                           int64_t Q, int64_t run, int64_t C, int64_t cs,
                                                           int64_t q_per_block, float* __restrict__ fst,
                                                           double* __restrict__ dst,
                                                           unsigned long long* __restrict__ ist) {
  using acc_t = typename Ld::acc_t;
  constexpr int kW = kRunThreads / 32;
  __shared__ double red[6][kW];
  __shared__ unsigned long long cnt[2][kW];
  const int64_t c = blockIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * q_per_block;
  const int64_t q1 = min(Q, q0 + q_per_block);
  Acc<acc_t> acc;
  acc.init();
  unsigned long long nnan = 0, ninf = 0;
  for (int64_t q = q0; q < q1; ++q) {
    const typename Ld::in_t* p = x + outer(q) + c * cs;
    for (int64_t i0 = threadIdx.x; i0 < run; i0 += kRunThreads * kUnroll) {
      typename Ld::in_t v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u * kRunThreads;
        if (i < run) v[u] = p[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u * kRunThreads < run) {
          const acc_t f = Ld::load(v[u]);
          if (!acc.add(f)) {
            nnan += isnan(f) ? 1 : 0;
            ninf += isnan(f) ? 0 : 1;
          }
        }
      }
    }
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const double wmn = warp_min(static_cast<double>(acc.mn));
  const double wmx = warp_max(static_cast<double>(acc.mx));
  const double wamn = warp_min(static_cast<double>(acc.amn));
  const double ws = warp_sum(acc.s);
  const double wsa = warp_sum(acc.sa);
  const double wsq = warp_sum(acc.sq);
  const unsigned long long wn = warp_sum(nnan);
  const unsigned long long wi = warp_sum(ninf);
  if (lane == 0) {
    red[0][warp] = wmn;
    red[1][warp] = wmx;
    red[2][warp] = wamn;
    red[3][warp] = ws;
    red[4][warp] = wsa;
    red[5][warp] = wsq;
    cnt[0][warp] = wn;
    cnt[1][warp] = wi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double mn = red[0][0], mx = red[1][0], amn = red[2][0], s = red[3][0], sa = red[4][0], sq = red[5][0];
    unsigned long long n0 = cnt[0][0], n1 = cnt[1][0];
    for (int w = 1; w < kW; ++w) {
      mn = red[0][w] < mn ? red[0][w] : mn;
      mx = red[1][w] > mx ? red[1][w] : mx;
      amn = red[2][w] < amn ? red[2][w] : amn;
      s += red[3][w];
      sa += red[4][w];
      sq += red[5][w];
      n0 += cnt[0][w];
      n1 += cnt[1][w];
    }
    commit<acc_t>(C, c, static_cast<acc_t>(mn), static_cast<acc_t>(mx), static_cast<acc_t>(amn), s, sa, sq, n0, n1,
                  fst, dst, ist);
    if (blockIdx.y == 0) ist[c] += static_cast<unsigned long long>(Q * run);
  }
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cached[device] = n > 0 ? n : 1;
  }
  return cached[device];
}

template <class Ld, int VEC, bool kUnit>
void launch_rows(const at::Tensor& x, const Layout& L, float* fst, double* dst, unsigned long long* ist,
                 cudaStream_t stream, int sms) {
  constexpr int kTile = 32 * VEC;
  const int64_t tiles = (L.channels + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= 0x7fffffff, "calibfast: too many channels for one launch: ", L.channels);
  // Enough blocks to fill the device four times over, each with at least kWarps * 4 rows.
  const int64_t want = (4 * static_cast<int64_t>(sms) + tiles - 1) / tiles;
  const int64_t max_y = (L.rows + 4 * kWarps - 1) / (4 * kWarps);
  int64_t gy = std::max<int64_t>(1, std::min<int64_t>({want, max_y, 65535}));
  const int64_t rows_per_block = (L.rows + gy - 1) / gy;
  gy = (L.rows + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(gy));
  const dim3 block(32, kWarps);
  rows_kernel<Ld, VEC, kUnit><<<grid, block, 0, stream>>>(
      static_cast<const typename Ld::in_t*>(x.const_data_ptr()), L.offsets, L.rows, L.channels, L.channel_stride,
      rows_per_block, fst, dst, ist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Ld>
void launch_runs(const at::Tensor& x, const Layout& L, float* fst, double* dst, unsigned long long* ist,
                 cudaStream_t stream, int sms) {
  TORCH_CHECK(L.channels <= 0x7fffffff, "calibfast: too many channels for one launch: ", L.channels);
  const int64_t Q = L.rows / L.run;
  const int64_t want = (4 * static_cast<int64_t>(sms) + L.channels - 1) / L.channels;
  // At least ~4 threads' worth of values per thread.
  const int64_t max_y = std::max<int64_t>(1, (Q * L.run) / (4 * kRunThreads));
  int64_t gy = std::max<int64_t>(1, std::min<int64_t>({want, max_y, Q, 65535}));
  const int64_t q_per_block = (Q + gy - 1) / gy;
  gy = (Q + q_per_block - 1) / q_per_block;
  const dim3 grid(static_cast<unsigned>(L.channels), static_cast<unsigned>(gy));
  runs_kernel<Ld><<<grid, kRunThreads, 0, stream>>>(static_cast<const typename Ld::in_t*>(x.const_data_ptr()),
                                                    L.outer, Q, L.run, L.channels, L.channel_stride, q_per_block,
                                                    fst, dst, ist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether every row of the kRows layout starts on a `bytes` boundary.
bool rows_aligned(const at::Tensor& x, const Layout& L, int64_t vec) {
  const auto addr = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  if (addr % (vec * x.element_size()) != 0) return false;
  if (L.channels % vec != 0) return false;
  for (int d = 0; d < L.offsets.nd; ++d) {
    if (L.offsets.strides[d] % vec != 0) return false;
  }
  return true;
}

template <class Ld>
void update_typed(const at::Tensor& x, const Layout& L, float* fst, double* dst, unsigned long long* ist,
                  cudaStream_t stream, int sms) {
  constexpr int kVec = static_cast<int>(16 / sizeof(typename Ld::in_t));  // 16-byte loads
  switch (L.mode) {
    case Mode::kRuns:
      launch_runs<Ld>(x, L, fst, dst, ist, stream, sms);
      break;
    case Mode::kRows:
      if (rows_aligned(x, L, kVec)) {
        launch_rows<Ld, kVec, true>(x, L, fst, dst, ist, stream, sms);
      } else {
        launch_rows<Ld, 1, true>(x, L, fst, dst, ist, stream, sms);
      }
      break;
    default:
      launch_rows<Ld, 1, false>(x, L, fst, dst, ist, stream, sms);
  }
}

}  // namespace

void channel_stats_update_cuda(const at::Tensor& x_in, int64_t axis, at::Tensor& fstate, at::Tensor& dstate,
                               at::Tensor& istate, at::Tensor& hist, at::Tensor& hexp,
                               at::Tensor& chist, at::Tensor& chexp) {
  const int64_t ax = check_channel_stats_args(x_in, axis, fstate, dstate, istate, hist, hexp, chist, chexp);
  TORCH_CHECK(x_in.is_cuda(), "calibfast: the CUDA kernel got a tensor on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in;
  Layout L;
  if (!analyse_layout(x, ax, L)) {
    x = x.contiguous();
    TORCH_INTERNAL_ASSERT(analyse_layout(x, ax, L));
  }
  if (L.channels == 0 || L.rows == 0) return;  // nothing to read, nothing to count
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int sms = sm_count(x.get_device());
  float* fst = fstate.data_ptr<float>();
  double* dst = dstate.data_ptr<double>();
  auto* ist = reinterpret_cast<unsigned long long*>(istate.data_ptr<int64_t>());
  switch (x.scalar_type()) {
    case at::kFloat:
      update_typed<LdF32>(x, L, fst, dst, ist, stream, sms);
      break;
    case at::kDouble:
      update_typed<LdF64>(x, L, fst, dst, ist, stream, sms);
      break;
    case at::kHalf:
      update_typed<LdF16>(x, L, fst, dst, ist, stream, sms);
      break;
    case at::kBFloat16:
      update_typed<LdBF16>(x, L, fst, dst, ist, stream, sms);
      break;
    default:
      TORCH_CHECK(false, "calibfast: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace cuda
}  // namespace calibfast
