// The floor of a histogram update on this CPU, measured: what one scattered increment per value
// costs when nothing else is in the way (indices already computed and in L1, counters in L1),
// next to what one read of the data costs. benchmarks/hist_floor.py compiles and runs this; see
// benchmarks/NOTES.md ("The histogram's floor, measured").
//
// Each test prints one line: <name> <ns per value> (fastest of --reps repetitions, one thread).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// GCC 12 warns about the scalar tail loops below (an overflow at iteration 2^62 it cannot rule
// out for an unknown n); n is far smaller here.
#pragma GCC diagnostic ignored "-Waggressive-loop-optimizations"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

volatile float g_sink_f;
volatile int32_t g_sink_i;

// One read of n floats: 32 independent lanes so that the loop vectorises without -ffast-math.
__attribute__((noinline)) float read_sum(const float* __restrict__ p, int64_t n) {
  float acc[32] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int l = 0; l < 32; ++l) acc[l] += p[i + l];
  float s = 0;
  for (int l = 0; l < 32; ++l) s += acc[l];
  for (int64_t j = i; j < n; ++j) s += p[j];
  return s;
}

// Bin indices of |x| (vectorised; the float math of calibfast's f32 path).
__attribute__((noinline)) void bin_indices(const float* __restrict__ p, int64_t n, float scale, int32_t B,
                                           int32_t* __restrict__ out) {
  const float Bf = static_cast<float>(B);
  for (int64_t i = 0; i < n; ++i) {
    float f = std::fabs(p[i]) * scale;
    f = f < Bf ? f : Bf;
    out[i] = static_cast<int32_t>(f);
  }
}

// n increments into K interleaved copies of `stride` counters (indices < stride).
template <int K>
__attribute__((noinline)) void scatter(const int32_t* __restrict__ idx, int64_t n, int64_t stride,
                                       int32_t* __restrict__ h) {
  int64_t i = 0;
  for (; i + K <= n; i += K)
    for (int k = 0; k < K; ++k) h[k * stride + idx[i + k]] += 1;
  for (int64_t j = i; j < n; ++j) h[idx[j]] += 1;
}

// calibfast's increments since session 7: 2 interleaved copies, no test per value (indices that
// are not bins land in pads), two indices per 64-bit load.
__attribute__((noinline)) void scatter_pairs(const int32_t* __restrict__ idx, int64_t n, int64_t stride,
                                             int32_t* __restrict__ h) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 4; ++k) {
      uint64_t w;
      std::memcpy(&w, idx + i + 2 * k, 8);
      h[static_cast<int32_t>(static_cast<uint32_t>(w))] += 1;
      h[stride + static_cast<int32_t>(static_cast<uint32_t>(w >> 32))] += 1;
    }
  }
  for (int64_t j = i; j < n; ++j) h[idx[j]] += 1;
}

// calibfast's increments to session 6: 2 interleaved copies, a test per value (index < B).
__attribute__((noinline)) void scatter_tested(const int32_t* __restrict__ idx, int64_t n, int64_t stride,
                                              int32_t* __restrict__ h) {
  const uint32_t Bu = 2048;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2)
    for (int k = 0; k < 2; ++k) {
      const uint32_t j = static_cast<uint32_t>(idx[i + k]);
      if (j < Bu) h[k * stride + j] += 1;
    }
  for (int64_t j = i; j < n; ++j) h[idx[j]] += 1;
}

// 16-bit bit-pattern counting as calibfast's bf16/fp16 path does it: 4 values per 64-bit load.
__attribute__((noinline)) void count_patterns(const uint16_t* __restrict__ p, int64_t n, int32_t* __restrict__ t) {
  constexpr int64_t T = 1 << 15;
  for (int64_t i = 0; i + 4 <= n; i += 4) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    t[w & 0x7fff] += 1;
    t[T + ((w >> 16) & 0x7fff)] += 1;
    t[(w >> 32) & 0x7fff] += 1;
    t[T + ((w >> 48) & 0x7fff)] += 1;
  }
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <class F>
double best_ns(int reps, int64_t values, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t = now();
    f();
    best = std::min(best, now() - t);
  }
  return best / static_cast<double>(values) * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : (int64_t(1) << 24);  // values in memory
  const int reps = argc > 2 ? std::atoi(argv[2]) : 15;
  constexpr int32_t B = 2048;
  constexpr int64_t kL1 = 4096;   // values of the L1-resident tests (16 KiB of f32 / indices)
  constexpr int64_t kRep = 2048;  // passes over them per timing
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(n);
  std::vector<uint16_t> xb(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = normal(gen);
    xb[i] = to_bf16(x[i]);
  }
  // the range calibfast would choose for this data: 2^e > amax, 2048 bins over [0, 2^e)
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  int e = 0;
  std::frexp(amax, &e);
  const float scale = std::ldexp(static_cast<float>(B), -e);
  std::vector<int32_t> idx(kL1), h(4 * (B + 16), 0), tab(2 << 15, 0);
  bin_indices(x.data(), kL1, scale, B, idx.data());
  for (auto& i : idx) i = std::min(i, B - 1);

  std::printf("read_f32_memory %.4f\n", best_ns(reps, n, [&] { g_sink_f = read_sum(x.data(), n); }));
  std::printf("read_f32_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) g_sink_f = read_sum(x.data(), kL1);
              }));
  std::printf("bin_index_f32_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) bin_indices(x.data(), kL1, scale, B, idx.data() + 0);
              }));
  for (auto& i : idx) i = std::min(i, B - 1);
  std::printf("increment_1copy_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) scatter<1>(idx.data(), kL1, B + 16, h.data());
              }));
  std::printf("increment_2copies_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) scatter<2>(idx.data(), kL1, B + 16, h.data());
              }));
  std::printf("increment_2copies_tested_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) scatter_tested(idx.data(), kL1, B + 16, h.data());
              }));
  std::printf("increment_2copies_pairs_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) scatter_pairs(idx.data(), kL1, B + 16, h.data());
              }));
  std::printf("increment_4copies_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) scatter<4>(idx.data(), kL1, B + 16, h.data());
              }));
  std::printf("pattern_count_bf16_l1 %.4f\n", best_ns(reps, kL1 * kRep, [&] {
                for (int r = 0; r < kRep; ++r) count_patterns(xb.data(), kL1, tab.data());
              }));
  std::printf("pattern_count_bf16_memory %.4f\n",
              best_ns(reps, n, [&] { count_patterns(xb.data(), n, tab.data()); }));
  int32_t s = 0;
  for (int32_t v : h) s += v;
  for (int32_t v : tab) s += v;
  g_sink_i = s;
  return 0;
}
