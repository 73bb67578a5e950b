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
// A second row kernel (rows_kernel_v2, below) is written for bandwidth: 4 channels a thread,
// float partial sums flushed to float64, fewer registers, whole waves. It is opt-in
// (CALIBFAST_CUDA_ROWS=2) until a GPU run has passed the tests with it and timed it.
//
// In version 1, sums are accumulated in float64 from the first value (Hopper and Ampere data-centre parts run
// float64 at half the float32 rate, far above what memory bandwidth feeds), so neither precision
// nor overflow of huge finite values depends on how many values a thread adds.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <cstdint>

#include "../common.h"

namespace calibfast {
namespace cuda {

namespace {

constexpr int kWarps = 8;        // rows handled side by side in a block of the row kernel
constexpr int kUnroll = 4;       // values each thread loads before using any (bytes in flight)
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

// ---- histograms ----------------------------------------------------------------------------
// A value a = |x| is binned at floor(a * B * 2^-e) (exact: a power-of-two scale) when that is < B;
// see calibfast/_reference.py. Pass 1 (with the statistics) bins at the ranges the update started
// with; a grow kernel then widens the ranges from the new absmax, merging bins; pass 2 (launched
// always, exiting at once when no range grew, so that no host synchronisation is needed) bins the
// values that lay beyond the old ranges.
constexpr int kSmemBins = 4096;  // a global histogram up to this size is gathered in shared memory

struct HistParams {
  unsigned long long* hist = nullptr;  // [B]
  int64_t B = 0;
  int64_t* hexp = nullptr;             // [2]: current exponent, exponent before this update
  unsigned long long* chist = nullptr; // [C, N]
  int64_t N = 0;
  int64_t* chexp = nullptr;            // [2, C]
};

// Binning parameters of one histogram for one pass: values with lo <= a and a * scale < bins.
template <typename acc_t>
struct BinRule {
  acc_t scale = 0;
  acc_t lo = INFINITY;  // +inf: bin nothing
};

template <typename acc_t>
__device__ __forceinline__ BinRule<acc_t> bin_rule(bool stats_pass, int64_t bins, int64_t e_now, int64_t e_prev) {
  BinRule<acc_t> r;
  if (stats_pass) {
    if (e_now != kEmptyExp) {  // empty: nothing can be binned before the range is known
      r.scale = static_cast<acc_t>(ldexp(static_cast<double>(bins), static_cast<int>(-e_now)));
      r.lo = 0;
    }
  } else if (e_now != e_prev) {  // the range grew: bin what lay at or beyond the old one
    r.scale = static_cast<acc_t>(ldexp(static_cast<double>(bins), static_cast<int>(-e_now)));
    r.lo = e_prev == kEmptyExp ? acc_t(0) : static_cast<acc_t>(ldexp(1.0, static_cast<int>(e_prev)));
  }
  return r;
}

// Bin of a (finite or not) value under a rule, or -1.
template <typename acc_t>
__device__ __forceinline__ int bin_of(acc_t v, const BinRule<acc_t>& r, int64_t bins) {
  const acc_t a = fabs(v);
  const acc_t t = a * r.scale;
  return (a >= r.lo && t < static_cast<acc_t>(bins)) ? static_cast<int>(t) : -1;  // NaN, Inf: -1
}

// Bins one value into the global histogram (shared-memory copy or global) and the value's
// channel histogram, under this pass's rules.
template <typename acc_t>
__device__ __forceinline__ void bin_value(acc_t f, bool gon, const BinRule<acc_t>& grule, bool gsmem,
                                          unsigned int* shist, bool con, const BinRule<acc_t>& crule,
                                          unsigned long long* channel_hist, const HistParams& hp) {
  if (gon) {
    const int b = bin_of(f, grule, hp.B);
    if (b >= 0) {
      if (gsmem) {
        atomicAdd(&shist[b], 1u);
      } else {
        atomicAdd(hp.hist + b, 1ull);
      }
    }
  }
  if (con) {
    const int b = bin_of(f, crule, hp.N);
    if (b >= 0) atomicAdd(channel_hist + b, 1ull);
  }
}

// Adds a block's shared-memory copy of the global histogram into the global one (after every
// thread of the block has binned; call from all of them). t: this thread's index, n: threads.
__device__ __forceinline__ void flush_shared_hist(const unsigned int* shist, const HistParams& hp, int t, int n) {
  __syncthreads();
  for (int i = t; i < hp.B; i += n) {
    if (shist[i]) atomicAdd(hp.hist + i, static_cast<unsigned long long>(shist[i]));
  }
}

// ---- the row kernel (kRows, kStrided) -----------------------------------------------------
// kStats: statistics and histogram pass 1; otherwise histogram pass 2 only.
template <class Ld, int VEC, bool kUnit, bool kStats>
__global__ void __launch_bounds__(32 * kWarps) rows_kernel(const typename Ld::in_t* __restrict__ x, RowOffsets off,
                                                            int64_t rows, int64_t C, int64_t cs,
                                                            int64_t rows_per_block, float* __restrict__ fst,
                                                            double* __restrict__ dst,
                                                            unsigned long long* __restrict__ ist, HistParams hp) {
  using acc_t = typename Ld::acc_t;
  using in_t = typename Ld::in_t;
  constexpr int kTile = 32 * VEC;  // channels per block
  __shared__ double red[kStats ? kWarps : 1][kTile];
  __shared__ unsigned int snan[kTile];
  __shared__ unsigned int sinf[kTile];
  __shared__ unsigned int shist[kSmemBins];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * 32 + tx;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c0 = tile0 + static_cast<int64_t>(tx) * VEC;
  const bool active = c0 < C;  // VEC > 1 only when C % VEC == 0, so the whole pack is in range
  // Rows loaded ahead per thread: 4 x 16 bytes, or 2 x 16 bytes for 16-bit inputs, whose eight
  // channels per thread already take many registers.
  constexpr int kUnroll = VEC >= 8 ? 2 : 4;

  // Histogram rules for this pass (uniform over the block for the global one).
  BinRule<acc_t> grule;
  if (hp.B) grule = bin_rule<acc_t>(kStats, hp.B, hp.hexp[0], hp.hexp[1]);
  const bool gon = grule.lo != INFINITY;
  const bool gsmem = gon && hp.B <= kSmemBins;
  BinRule<acc_t> crule[VEC];
  bool con = false;
  if (hp.N && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      crule[j] = bin_rule<acc_t>(kStats, hp.N, hp.chexp[c0 + j], hp.chexp[C + c0 + j]);
      con |= crule[j].lo != INFINITY;
    }
  }
  if (!kStats && !__syncthreads_or(gon || con)) return;  // pass 2 with nothing to bin

  for (int i = tid; i < kTile; i += 32 * kWarps) {
    snan[i] = 0;
    sinf[i] = 0;
  }
  if (gsmem) {
    for (int i = tid; i < hp.B; i += 32 * kWarps) shist[i] = 0;
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
            if (kStats && !acc[j].add(f)) {
              if (isnan(f)) {
                atomicAdd(&snan[tx * VEC + j], 1u);
              } else {
                atomicAdd(&sinf[tx * VEC + j], 1u);
              }
            }
            bin_value(f, gon, grule, gsmem, shist, con, crule[j], hp.chist + (c0 + j) * hp.N, hp);
          }
        }
      }
    }
  }

  if (gsmem) flush_shared_hist(shist, hp, tid, 32 * kWarps);
  if (!kStats) return;

  // Reduce the kWarps partial results of each channel; thread t finishes channel t of the tile.
  const int64_t ct = tile0 + tid;
  const bool owner = tid < kTile && ct < C;
  acc_t mn = INFINITY, mx = -INFINITY, amn = INFINITY;
  double s = 0, sa = 0, sq = 0;
#define CALIBFAST_REDUCE(field, op)                                        \
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
  CALIBFAST_REDUCE(mn, mn = q < mn ? static_cast<acc_t>(q) : mn)
  CALIBFAST_REDUCE(mx, mx = q > mx ? static_cast<acc_t>(q) : mx)
  CALIBFAST_REDUCE(amn, amn = q < amn ? static_cast<acc_t>(q) : amn)
  CALIBFAST_REDUCE(s, s += q)
  CALIBFAST_REDUCE(sa, sa += q)
  CALIBFAST_REDUCE(sq, sq += q)
#undef CALIBFAST_REDUCE
  if (owner) {
    commit<acc_t>(C, ct, mn, mx, amn, s, sa, sq, snan[tid], sinf[tid], fst, dst, ist);
    if (blockIdx.y == 0) ist[ct] += static_cast<unsigned long long>(rows);
  }
}

// ---- the row kernel, version 2 (kRows, unit stride, float32 / bfloat16 / float16) --------------
// Written for bandwidth where version 1 is latency-bound (H200, 16384 x 8192: statistics at 2.4x
// (float32) and 6.6x (bfloat16) the time of x.sum(); the 16-bit kernel, 8 channels a thread with
// float64 sums, needs 160 registers, so one 8-warp block per SM and few bytes in flight):
//   - 4 channels a thread for every input width (16-byte loads of float32, 8-byte loads of 16-bit
//     values; a warp still reads whole 128-byte lines), 64 bytes a thread in flight;
//   - sums in float over at most kFlushValues values per channel and thread, then added to float64
//     partial sums in shared memory (one slot per warp and channel, written by one thread: no
//     atomics). Values with |x| >= 2^32 or 0 < |x| < 2^-60 go to those float64 slots directly,
//     so a float partial sum cannot overflow (32 * 2^64 << FLT_MAX) nor lose tiny squares to
//     underflow; non-finite values are counted (the same compare sends them off the fast path);
//   - under 64 registers a thread (several blocks per SM) and a grid sized to whole waves of
//     resident blocks (launch_rows_v2).
// The float partial sums carry the same error bound as the CPU kernel's float chunk sums (kChunk
// values a chunk there): relative error ~kFlushValues * 2^-24 of sum |x| at worst.
constexpr int kVec2 = 4;            // channels a thread
constexpr int kTile2 = 32 * kVec2;  // channels a block
constexpr int kFlushValues = 32;    // values a float partial sum takes before it is flushed

// kHist: the global histogram off (0), in shared memory (1: B <= kSmemBins) or in global memory
// (2), fixed at compile time so that the per-value path has no branch on it.
template <class Ld, bool kStats, int kHist>
__global__ void __launch_bounds__(32 * kWarps, 3)
    rows_kernel_v2(const typename Ld::in_t* __restrict__ x, int64_t row_stride, int64_t rows, int64_t C,
                   int64_t rows_per_block, float* __restrict__ fst, double* __restrict__ dst,
                   unsigned long long* __restrict__ ist, HistParams hp) {
  using in_t = typename Ld::in_t;
  static_assert(std::is_same<typename Ld::acc_t, float>::value, "rows_kernel_v2 folds in float");
  constexpr int kU = 64 / (kVec2 * static_cast<int>(sizeof(in_t)));  // rows a thread loads at once
  constexpr int kFlushIters = kFlushValues / kU;
  static_assert(kFlushIters >= 1, "kFlushValues must be a multiple of kU");
  constexpr float kBig = 4294967296.0f;  // 2^32: at or beyond, a value skips the float partial sums
  // 2^-60: a non-zero value below it skips them too (its square, below 2^-120, would lose bits to
  // float underflow; the float64 slots keep it exactly as the reference does)
  constexpr float kTiny = 8.673617379884035e-19f;
  const float kNaN = __int_as_float(0x7fffffff);
  // float64 partial sums [stat][warp][j * 32 + lane] (lane-major per j: no bank conflicts), and the
  // float min/max/abs-min of the final reduction.
  constexpr int kStat = kWarps * kTile2;  // float64 slots per statistic
  __shared__ double dsum[kStats ? 3 * kStat : 1];
  __shared__ float fred[kStats ? kWarps : 1][kTile2];
  __shared__ unsigned int snan[kTile2];
  __shared__ unsigned int sinf[kTile2];
  __shared__ unsigned int shist[kHist == 1 ? kSmemBins : 1];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * 32 + tx;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTile2;
  const int64_t c0 = tile0 + static_cast<int64_t>(tx) * kVec2;
  const bool active = c0 < C;  // C % kVec2 == 0 (launch condition): the whole pack is in range

  // The histogram's rule for this pass. When it bins nothing (an empty histogram in pass 1),
  // lo = +inf and every value's bin is -1: no branch needed in the loop.
  BinRule<float> grule;
  if (kHist) grule = bin_rule<float>(kStats, hp.B, hp.hexp[0], hp.hexp[1]);
  const bool gon = grule.lo != INFINITY;
  constexpr bool gsmem = kHist == 1;
  if (!kStats && !gon) return;  // pass 2 with nothing to bin (uniform over the block)

  for (int i = tid; i < kTile2; i += 32 * kWarps) {
    snan[i] = 0;
    sinf[i] = 0;
  }
  if (kStats) {
    for (int i = tid; i < 3 * kStat; i += 32 * kWarps) dsum[i] = 0.0;
  }
  if (gsmem) {
    for (int i = tid; i < hp.B; i += 32 * kWarps) shist[i] = 0;
  }
  __syncthreads();

  float mn[kVec2], mx[kVec2], amn[kVec2], fs[kVec2], fa[kVec2], fq[kVec2];
#pragma unroll
  for (int j = 0; j < kVec2; ++j) {
    mn[j] = INFINITY;
    mx[j] = -INFINITY;
    amn[j] = INFINITY;
    fs[j] = fa[j] = fq[j] = 0.0f;
  }
  // This thread's float64 slot of statistic k (sum, sum |x|, sum x^2) for its channel j:
  // dsum[k * kStat + mine + j * 32].
  const int mine = ty * kTile2 + tx;
  auto flush = [&]() {
#pragma unroll
    for (int j = 0; j < kVec2; ++j) {
      dsum[mine + j * 32] += static_cast<double>(fs[j]);
      dsum[kStat + mine + j * 32] += static_cast<double>(fa[j]);
      dsum[2 * kStat + mine + j * 32] += static_cast<double>(fq[j]);
      fs[j] = fa[j] = fq[j] = 0.0f;
    }
  };

  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = min(rows, r_begin + rows_per_block);
  // kU rows of this thread's 4 channels: loads first (all in flight), then folded without a branch
  // per value: a value off the fast path (NaN, +-Inf, |x| >= 2^32, 0 < |x| < 2^-60) enters the
  // float partial sums as 0 and the min/max as NaN (which fminf/fmaxf ignore), and is handled after
  // the step, which branches once. kGuard: rows at or past r_end may occur (the last step of a
  // thread only).
  auto step = [&](int64_t r, auto guard) {
    constexpr bool kGuard = decltype(guard)::value;
    Pack<in_t, kVec2> v[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t ru = r + u * kWarps;
      if (!kGuard || ru < r_end) v[u] = *reinterpret_cast<const Pack<in_t, kVec2>*>(x + ru * row_stride + c0);
    }
    bool bad = false;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (kGuard && r + u * kWarps >= r_end) break;
#pragma unroll
      for (int j = 0; j < kVec2; ++j) {
        const float f = Ld::load(v[u].v[j]);
        const float a = fabsf(f);
        if (kStats) {
          // finite, not huge (NaN compares false) and not tiny
          const bool ok = (a < kBig) & ((a >= kTiny) | (a == 0.0f));
          const float z = ok ? f : 0.0f;
          const float m = ok ? f : kNaN;   // NaN: ignored by fminf/fmaxf
          const float am = ok ? a : kNaN;
          mn[j] = fminf(m, mn[j]);
          mx[j] = fmaxf(m, mx[j]);
          amn[j] = fminf(am, amn[j]);
          fs[j] += z;
          fa[j] += fabsf(z);
          fq[j] = fmaf(z, z, fq[j]);
          bad |= !ok;
        }
        if (kHist == 1) {
          // Not binned (outside [lo, 2^e), NaN, Inf): add 0 at the lane's own counter instead of
          // branching (distinct lanes, distinct counters: no contention).
          const float t = fminf(a * grule.scale, static_cast<float>(hp.B));  // NaN -> B
          const bool in = a >= grule.lo && t < static_cast<float>(hp.B);
          atomicAdd(&shist[in ? static_cast<int>(t) : tx], in ? 1u : 0u);
        } else if (kHist == 2) {
          const int b = bin_of(f, grule, hp.B);
          if (b >= 0) atomicAdd(hp.hist + b, 1ull);
        }
      }
    }
    if (kStats && bad) {  // rare: the values the fast path left out, read again (from cache)
      for (int u = 0; u < kU; ++u) {
        const int64_t ru = r + u * kWarps;
        if (kGuard && ru >= r_end) break;
        for (int j = 0; j < kVec2; ++j) {
          const float f = Ld::load(x[ru * row_stride + c0 + j]);
          const float a = fabsf(f);
          if (a < kBig && (a >= kTiny || a == 0.0f)) continue;
          if (isnan(f)) {
            atomicAdd(&snan[j * 32 + tx], 1u);
          } else if (isinf(f)) {
            atomicAdd(&sinf[j * 32 + tx], 1u);
          } else {  // huge or tiny but finite: straight into float64
            mn[j] = fminf(f, mn[j]);
            mx[j] = fmaxf(f, mx[j]);
            amn[j] = fminf(a, amn[j]);
            const double d = static_cast<double>(f);
            dsum[mine + j * 32] += d;
            dsum[kStat + mine + j * 32] += fabs(d);
            dsum[2 * kStat + mine + j * 32] += d * d;
          }
        }
      }
    }
  };

  if (active) {
    int64_t r = r_begin + ty;
    int iters = 0;
    for (; r + (kU - 1) * kWarps < r_end; r += kWarps * kU) {
      step(r, std::false_type{});
      if (kStats && ++iters == kFlushIters) {
        flush();
        iters = 0;
      }
    }
    if (r < r_end) step(r, std::true_type{});
    if (kStats) flush();
  }

  if (gsmem) flush_shared_hist(shist, hp, tid, 32 * kWarps);
  if (!kStats) return;

  // Thread t < kTile2 finishes channel tile0 + t, held by lane t / kVec2 as its channel t % kVec2,
  // i.e. at slot (t % kVec2) * 32 + t / kVec2.
  const int64_t ct = tile0 + tid;
  const bool owner = tid < kTile2 && ct < C;
  const int slot = (tid % kVec2) * 32 + tid / kVec2;
  float rmn = INFINITY, rmx = -INFINITY, ramn = INFINITY;
  double s = 0, sa = 0, sq = 0;
  __syncthreads();  // every flush done
  if (owner) {
    for (int w = 0; w < kWarps; ++w) {
      s += dsum[w * kTile2 + slot];
      sa += dsum[kStat + w * kTile2 + slot];
      sq += dsum[2 * kStat + w * kTile2 + slot];
    }
  }
#define CALIBFAST_REDUCE2(field, op)                                      \
  __syncthreads();                                                        \
  _Pragma("unroll") for (int j = 0; j < kVec2; ++j) fred[ty][j * 32 + tx] = field[j]; \
  __syncthreads();                                                        \
  if (owner) {                                                            \
    for (int w = 0; w < kWarps; ++w) {                                    \
      const float q = fred[w][slot];                                      \
      op;                                                                 \
    }                                                                     \
  }
  CALIBFAST_REDUCE2(mn, rmn = q < rmn ? q : rmn)
  CALIBFAST_REDUCE2(mx, rmx = q > rmx ? q : rmx)
  CALIBFAST_REDUCE2(amn, ramn = q < ramn ? q : ramn)
#undef CALIBFAST_REDUCE2
  if (owner) {
    commit<float>(C, ct, rmn, rmx, ramn, s, sa, sq, snan[slot], sinf[slot], fst, dst, ist);
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

template <class Ld, bool kStats>
__global__ void __launch_bounds__(kRunThreads) runs_kernel(const typename Ld::in_t* __restrict__ x, RowOffsets outer,
                                                           int64_t Q, int64_t run, int64_t C, int64_t cs,
                                                           int64_t q_per_block, float* __restrict__ fst,
                                                           double* __restrict__ dst,
                                                           unsigned long long* __restrict__ ist, HistParams hp) {
  using acc_t = typename Ld::acc_t;
  constexpr int kW = kRunThreads / 32;
  __shared__ double red[6][kW];
  __shared__ unsigned long long cnt[2][kW];
  __shared__ unsigned int shist[kSmemBins];
  const int64_t c = blockIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * q_per_block;
  const int64_t q1 = min(Q, q0 + q_per_block);

  BinRule<acc_t> grule, crule;
  if (hp.B) grule = bin_rule<acc_t>(kStats, hp.B, hp.hexp[0], hp.hexp[1]);
  if (hp.N) crule = bin_rule<acc_t>(kStats, hp.N, hp.chexp[c], hp.chexp[C + c]);
  const bool gon = grule.lo != INFINITY;  // uniform over the block
  const bool con = crule.lo != INFINITY;
  const bool gsmem = gon && hp.B <= kSmemBins;
  if (!kStats && !gon && !con) return;  // pass 2 with nothing to bin
  if (gsmem) {
    for (int i = threadIdx.x; i < hp.B; i += kRunThreads) shist[i] = 0;
    __syncthreads();
  }
  unsigned long long* chist = hp.chist + c * hp.N;

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
          if (kStats && !acc.add(f)) {
            nnan += isnan(f) ? 1 : 0;
            ninf += isnan(f) ? 0 : 1;
          }
          bin_value(f, gon, grule, gsmem, shist, con, crule, chist, hp);
        }
      }
    }
  }
  if (gsmem) flush_shared_hist(shist, hp, threadIdx.x, kRunThreads);
  if (!kStats) return;
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

// ---- growing the ranges (after pass 1) ------------------------------------------------------
// (kEmptyExp for -inf: a channel with no finite value needs no range; see the CPU version.)
__device__ __forceinline__ int64_t exponent_for(float amax) {
  if (amax == -INFINITY) return kEmptyExp;
  if (isinf(amax)) return kMaxExp;
  if (!(amax > 0.0f)) return kMinExp;
  int e = 0;
  frexp(static_cast<double>(amax), &e);
  const int64_t ee = e;
  return ee < kMinExp ? kMinExp : (ee > kMaxExp ? kMaxExp : ee);
}

// Merges 2^(e_new - e_old) adjacent bins of h[0..bins) in place, with the whole block. Targets
// are written in increasing chunks; a chunk's sources lie at or after its own targets and after
// every target written before, so nothing is read after being overwritten.
__device__ void fold_bins(unsigned long long* h, int64_t bins, int64_t e_old, int64_t e_new) {
  __shared__ unsigned long long total;
  if (e_old == kEmptyExp || e_new <= e_old) return;
  const int64_t shift = e_new - e_old < 62 ? e_new - e_old : 62;
  if (shift >= 62 || (int64_t(1) << shift) >= bins) {
    if (threadIdx.x == 0) total = 0;
    __syncthreads();
    unsigned long long part = 0;
    for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) part += h[i];
    atomicAdd(&total, part);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) h[i] = i == 0 ? total : 0ull;
    return;
  }
  const int64_t f = int64_t(1) << shift;
  const int64_t targets = bins >> shift;
  for (int64_t base = 0; base < targets; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    unsigned long long sum = 0;
    if (i < targets) {
      for (int64_t k = 0; k < f; ++k) sum += h[i * f + k];
    }
    __syncthreads();
    if (i < targets) h[i] = sum;
    __syncthreads();
  }
  for (int64_t i = targets + threadIdx.x; i < bins; i += blockDim.x) h[i] = 0;
}

// One block: the global histogram's range from the absmax over all channels.
__global__ void __launch_bounds__(1024) grow_hist_kernel(const float* __restrict__ fst, int64_t C,
                                                         unsigned long long* hist, int64_t B, int64_t* hexp) {
  __shared__ float wmax[32];
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) m = fmaxf(m, fmaxf(fst[C + c], -fst[c]));
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < (blockDim.x + 31) / 32 ? wmax[threadIdx.x] : -INFINITY;
    m = warp_max(m);
    if (threadIdx.x == 0) wmax[0] = m;
  }
  __syncthreads();
  const int64_t e_old = hexp[0];
  const int64_t e_new = max(e_old, exponent_for(wmax[0]));
  fold_bins(hist, B, e_old, e_new);
  __syncthreads();
  if (threadIdx.x == 0) {
    hexp[0] = e_new;
    hexp[1] = e_old;
  }
}

// One block per channel: the per-channel histograms' ranges.
__global__ void __launch_bounds__(256) grow_channel_hist_kernel(const float* __restrict__ fst, int64_t C,
                                                                unsigned long long* chist, int64_t N,
                                                                int64_t* chexp) {
  const int64_t c = blockIdx.x;
  const int64_t e_old = chexp[c];
  const int64_t e_new = max(e_old, exponent_for(fmaxf(fst[C + c], -fst[c])));
  fold_bins(chist + c * N, N, e_old, e_new);
  __syncthreads();
  if (threadIdx.x == 0) {
    chexp[c] = e_new;
    chexp[C + c] = e_old;
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
                 const HistParams& hp, bool stats, cudaStream_t stream, int sms) {
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
  const auto* xp = static_cast<const typename Ld::in_t*>(x.const_data_ptr());
  if (stats) {
    rows_kernel<Ld, VEC, kUnit, true><<<grid, block, 0, stream>>>(xp, L.offsets, L.rows, L.channels,
                                                                  L.channel_stride, rows_per_block, fst, dst, ist, hp);
  } else {
    rows_kernel<Ld, VEC, kUnit, false><<<grid, block, 0, stream>>>(xp, L.offsets, L.rows, L.channels,
                                                                   L.channel_stride, rows_per_block, fst, dst, ist, hp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Grid of the version 2 row kernel: tiles x gy blocks, gy chosen so that the blocks fill whole
// waves of the resident blocks (occupancy x SMs) as nearly as possible, preferring fewer blocks on
// a tie; each block keeps at least kWarps * 8 rows.
int64_t rows_grid_y(int64_t tiles, int64_t rows, int64_t resident) {
  const int64_t max_y = std::max<int64_t>(1, std::min<int64_t>(65535, rows / (8 * kWarps)));
  const int64_t cap = std::min<int64_t>(max_y, std::max<int64_t>(1, 8 * resident / std::max<int64_t>(tiles, 1)));
  int64_t best = 1;
  double best_eff = -1;
  for (int64_t gy = 1; gy <= cap; ++gy) {
    const int64_t blocks = tiles * gy;
    const int64_t waves = (blocks + resident - 1) / resident;
    const double eff = static_cast<double>(blocks) / static_cast<double>(waves * resident);
    if (eff > best_eff + 1e-9) {
      best_eff = eff;
      best = gy;
    }
  }
  return best;
}

template <class Ld>
void launch_rows_v2(const at::Tensor& x, const Layout& L, float* fst, double* dst, unsigned long long* ist,
                    const HistParams& hp, bool stats, cudaStream_t stream, int sms) {
  const int64_t tiles = (L.channels + kTile2 - 1) / kTile2;
  TORCH_CHECK(tiles <= 0x7fffffff, "calibfast: too many channels for one launch: ", L.channels);
  const dim3 block(32, kWarps);
  const int hm = hp.B == 0 ? 0 : (hp.B <= kSmemBins ? 1 : 2);
  using Kernel = void (*)(const typename Ld::in_t*, int64_t, int64_t, int64_t, int64_t, float*, double*,
                          unsigned long long*, HistParams);
  static constexpr Kernel kernels[2][3] = {
      {rows_kernel_v2<Ld, false, 0>, rows_kernel_v2<Ld, false, 1>, rows_kernel_v2<Ld, false, 2>},
      {rows_kernel_v2<Ld, true, 0>, rows_kernel_v2<Ld, true, 1>, rows_kernel_v2<Ld, true, 2>}};
  const Kernel kernel = kernels[stats ? 1 : 0][hm];
  // resident blocks per SM of each kernel (assumed the same on every device of the process)
  static int per_sm[2][3] = {{0, 0, 0}, {0, 0, 0}};
  int& occ = per_sm[stats ? 1 : 0][hm];
  if (occ == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, 32 * kWarps, 0));
    occ = std::max(1, n);
  }
  const int64_t gy0 = rows_grid_y(tiles, L.rows, static_cast<int64_t>(occ) * sms);
  const int64_t rows_per_block = (L.rows + gy0 - 1) / gy0;
  const int64_t gy = (L.rows + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(gy));
  const auto* xp = static_cast<const typename Ld::in_t*>(x.const_data_ptr());
  kernel<<<grid, block, 0, stream>>>(xp, L.offsets.strides[0], L.rows, L.channels, rows_per_block, fst, dst, ist,
                                     hp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which row kernel handles kRows inputs: 1 (default) or 2 (CALIBFAST_CUDA_ROWS=2, read on every
// update so that a benchmark can switch in one process). Version 2 stays opt-in until a GPU run
// has passed the CUDA tests with it and measured it against version 1 (benchmarks/gpu_check.sh
// does both).
int rows_version() {
  const char* v = std::getenv("CALIBFAST_CUDA_ROWS");
  return (v != nullptr && v[0] == '2' && v[1] == '\0') ? 2 : 1;
}

template <class Ld>
void launch_runs(const at::Tensor& x, const Layout& L, float* fst, double* dst, unsigned long long* ist,
                 const HistParams& hp, bool stats, cudaStream_t stream, int sms) {
  TORCH_CHECK(L.channels <= 0x7fffffff, "calibfast: too many channels for one launch: ", L.channels);
  const int64_t Q = L.rows / L.run;
  const int64_t want = (4 * static_cast<int64_t>(sms) + L.channels - 1) / L.channels;
  // At least ~4 threads' worth of values per thread.
  const int64_t max_y = std::max<int64_t>(1, (Q * L.run) / (4 * kRunThreads));
  int64_t gy = std::max<int64_t>(1, std::min<int64_t>({want, max_y, Q, 65535}));
  const int64_t q_per_block = (Q + gy - 1) / gy;
  gy = (Q + q_per_block - 1) / q_per_block;
  const dim3 grid(static_cast<unsigned>(L.channels), static_cast<unsigned>(gy));
  const auto* xp = static_cast<const typename Ld::in_t*>(x.const_data_ptr());
  if (stats) {
    runs_kernel<Ld, true><<<grid, kRunThreads, 0, stream>>>(xp, L.outer, Q, L.run, L.channels, L.channel_stride,
                                                            q_per_block, fst, dst, ist, hp);
  } else {
    runs_kernel<Ld, false><<<grid, kRunThreads, 0, stream>>>(xp, L.outer, Q, L.run, L.channels, L.channel_stride,
                                                             q_per_block, fst, dst, ist, hp);
  }
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
void launch_pass(const at::Tensor& x, const Layout& L, float* fst, double* dst, unsigned long long* ist,
                 const HistParams& hp, bool stats, cudaStream_t stream, int sms) {
  constexpr int kVec = static_cast<int>(16 / sizeof(typename Ld::in_t));  // 16-byte loads
  switch (L.mode) {
    case Mode::kRuns:
      launch_runs<Ld>(x, L, fst, dst, ist, hp, stats, stream, sms);
      break;
    case Mode::kRows:
      if constexpr (std::is_same<typename Ld::acc_t, float>::value) {
        if (hp.N == 0 && L.offsets.nd == 1 && rows_version() == 2 && rows_aligned(x, L, kVec2)) {
          launch_rows_v2<Ld>(x, L, fst, dst, ist, hp, stats, stream, sms);
          break;
        }
      }
      if (rows_aligned(x, L, kVec)) {
        launch_rows<Ld, kVec, true>(x, L, fst, dst, ist, hp, stats, stream, sms);
      } else {
        launch_rows<Ld, 1, true>(x, L, fst, dst, ist, hp, stats, stream, sms);
      }
      break;
    default:
      launch_rows<Ld, 1, false>(x, L, fst, dst, ist, hp, stats, stream, sms);
  }
}

// Pass 1 (statistics + histograms at the current ranges), the range growth, and pass 2 (the
// values beyond the old ranges; its blocks exit at once when no range grew). All on the stream,
// nothing read back by the host.
template <class Ld>
void update_typed(const at::Tensor& x, const Layout& L, float* fst, double* dst, unsigned long long* ist,
                  const HistParams& hp, cudaStream_t stream, int sms) {
  launch_pass<Ld>(x, L, fst, dst, ist, hp, true, stream, sms);
  if (!hp.B && !hp.N) return;
  if (hp.B) {
    grow_hist_kernel<<<1, 1024, 0, stream>>>(fst, L.channels, hp.hist, hp.B, hp.hexp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (hp.N) {
    grow_channel_hist_kernel<<<static_cast<unsigned>(L.channels), 256, 0, stream>>>(fst, L.channels, hp.chist, hp.N,
                                                                                     hp.chexp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_pass<Ld>(x, L, fst, dst, ist, hp, false, stream, sms);
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
  HistParams hp;
  if (hist.numel() > 0) {
    hp.B = hist.numel();
    hp.hist = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    hp.hexp = hexp.data_ptr<int64_t>();
  }
  if (chist.numel() > 0) {
    hp.N = chist.size(1);
    hp.chist = reinterpret_cast<unsigned long long*>(chist.data_ptr<int64_t>());
    hp.chexp = chexp.data_ptr<int64_t>();
  }
#define CALIBFAST_CASE(dtype, Ld)                              \
  case dtype:                                                  \
    update_typed<Ld>(x, L, fst, dst, ist, hp, stream, sms);    \
    break;
  switch (x.scalar_type()) {
    CALIBFAST_CASE(at::kFloat, LdF32)
    CALIBFAST_CASE(at::kDouble, LdF64)
    CALIBFAST_CASE(at::kHalf, LdF16)
    CALIBFAST_CASE(at::kBFloat16, LdBF16)
#undef CALIBFAST_CASE
    default:
      TORCH_CHECK(false, "calibfast: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace cuda
}  // namespace calibfast
