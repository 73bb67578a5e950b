// CPU implementation of calibfast::channel_stats_update (schema in calibfast/_ops.py).
//
// One read of the input: the work is split over threads (rows, or channel slices when there are
// few rows, or (row, channel) runs for channel-major layouts), each thread folds into its own
// slot of per-channel accumulators, and the slots are merged into the state once at the end.
// The kernels themselves live in channel_stats_kernel.h, compiled here once per instruction set.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../common.h"

namespace calibfast {
namespace cpu {

constexpr int64_t kChunk = 64;  // rows (row kernels) or values per lane (run kernels) per chunk
constexpr int kLanes = 16;      // independent accumulators in the run kernels

// ---- loads: exact conversions to the accumulation type -------------------------------------
struct LoadF32 {
  using in_t = float;
  using acc_t = float;
  static inline acc_t load(in_t v) { return v; }
};
struct LoadF64 {
  using in_t = double;
  using acc_t = double;
  static inline acc_t load(in_t v) { return v; }
};
struct LoadBF16 {
  using in_t = uint16_t;
  using acc_t = float;
  static inline acc_t load(in_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};
struct LoadF16 {
  using in_t = uint16_t;
  using acc_t = float;
  // Branch-free IEEE half -> float (exact for every input, subnormals, Inf and NaN included).
  static inline acc_t load(in_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    uint32_t nb = (two_w >> 4) + exp_offset;
    float normalized;
    std::memcpy(&normalized, &nb, sizeof normalized);
    normalized *= exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    uint32_t db = (two_w >> 17) | magic_mask;
    float denormalized;
    std::memcpy(&denormalized, &db, sizeof denormalized);
    denormalized -= magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    uint32_t nbits, dbits;
    std::memcpy(&nbits, &normalized, sizeof nbits);
    std::memcpy(&dbits, &denormalized, sizeof dbits);
    const uint32_t result = sign | (two_w < denormalized_cutoff ? dbits : nbits);
    float f;
    std::memcpy(&f, &result, sizeof f);
    return f;
  }
};

// ---- per-thread accumulators -----------------------------------------------------------------
template <typename acc_t>
struct Slot {
  // One slot per worker thread, C entries each; merged into the op's state at the end.
  acc_t* mn;
  acc_t* mx;
  acc_t* amn;
  double* sum;
  double* sabs;
  double* ssq;
  int64_t* nan;
  int64_t* inf;
};

namespace v_base {
#include "channel_stats_kernel.h"
}  // namespace v_base

#if defined(__x86_64__) && defined(__GNUC__)
#define CALIBFAST_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace v_avx2 {
#include "channel_stats_kernel.h"
}  // namespace v_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace v_avx512 {
#include "channel_stats_kernel.h"
}  // namespace v_avx512
#pragma GCC pop_options
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

static Isa detect_isa() {
#if CALIBFAST_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBase;
}

// The instruction set to use: the best the processor has, or CALIBFAST_CPU_CAPABILITY
// (base, avx2, avx512) when set, capped at what the processor has.
static Isa chosen_isa() {
  static const Isa best = detect_isa();
  const char* env = std::getenv("CALIBFAST_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa w = best;
  if (want == "base" || want == "default") {
    w = Isa::kBase;
  } else if (want == "avx2") {
    w = Isa::kAvx2;
  } else if (want == "avx512") {
    w = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "calibfast: CALIBFAST_CPU_CAPABILITY must be base, avx2 or avx512, got '", want, "'");
  }
  return static_cast<int>(w) <= static_cast<int>(best) ? w : best;
}

std::string cpu_capability() {
  switch (chosen_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

// Per-thread slots of per-channel accumulators, merged into the op's state at the end.
template <typename acc_t>
struct Slots {
  int64_t C;
  int n;
  std::vector<acc_t> a;       // [n][3][C]: min, max, absmin
  std::vector<double> d;      // [n][3][C]: sum, sum|x|, sum x^2
  std::vector<int64_t> k;     // [n][2][C]: nan, inf
  std::vector<acc_t> scratch; // [n][6][C]: chunk accumulators of the row kernels

  Slots(int64_t C_, int n_, bool rows)
      : C(C_), n(n_), a(3 * C_ * n_), d(3 * C_ * n_, 0.0), k(2 * C_ * n_, 0), scratch(rows ? 6 * C_ * n_ : 0) {
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    for (int t = 0; t < n; ++t) {
      acc_t* p = a.data() + 3 * C * t;
      std::fill(p, p + C, inf);
      std::fill(p + C, p + 2 * C, -inf);
      std::fill(p + 2 * C, p + 3 * C, inf);
    }
  }

  Slot<acc_t> slot(int t) {
    TORCH_INTERNAL_ASSERT(t >= 0 && t < n, "calibfast: thread index ", t, " outside ", n, " slots");
    Slot<acc_t> s;
    s.mn = a.data() + 3 * C * t;
    s.mx = s.mn + C;
    s.amn = s.mx + C;
    s.sum = d.data() + 3 * C * t;
    s.sabs = s.sum + C;
    s.ssq = s.sabs + C;
    s.nan = k.data() + 2 * C * t;
    s.inf = s.nan + C;
    return s;
  }

  acc_t* scratch_for(int t) { return scratch.data() + 6 * C * t; }

  void merge_into(float* fst, double* dst, int64_t* ist) {
    for (int t = 0; t < n; ++t) {
      const acc_t* mn = a.data() + 3 * C * t;
      const acc_t* mx = mn + C;
      const acc_t* amn = mx + C;
      const double* sm = d.data() + 3 * C * t;
      const int64_t* kk = k.data() + 2 * C * t;
      for (int64_t c = 0; c < C; ++c) {
        const float fmn = static_cast<float>(mn[c]);
        const float fmx = static_cast<float>(mx[c]);
        const float famn = static_cast<float>(amn[c]);
        fst[c] = fmn < fst[c] ? fmn : fst[c];
        fst[C + c] = fmx > fst[C + c] ? fmx : fst[C + c];
        fst[2 * C + c] = famn < fst[2 * C + c] ? famn : fst[2 * C + c];
        dst[c] += sm[c];
        dst[C + c] += sm[C + c];
        dst[2 * C + c] += sm[2 * C + c];
        ist[C + c] += kk[c];
        ist[2 * C + c] += kk[C + c];
      }
    }
  }
};

template <class Ld>
static void update_typed(const at::Tensor& x, const Layout& L, float* fst, double* dst, int64_t* ist) {
  using acc_t = typename Ld::acc_t;
  const Isa isa = chosen_isa();
  const int nthreads = std::max(1, at::get_num_threads());
  const int64_t C = L.channels;
  const int64_t rows = L.rows;
  const void* data = x.const_data_ptr();
  constexpr int64_t kTaskValues = 1 << 16;  // values per parallel task, at least

  if (L.mode == Mode::kRuns) {
    Slots<acc_t> slots(C, nthreads, false);
        const int64_t pairs = (rows / L.run) * C;
    const int64_t grain = std::max<int64_t>(1, kTaskValues / L.run);
    at::parallel_for(0, pairs, grain, [&](int64_t b, int64_t e) {
      const int t = at::get_thread_num();
      auto s = slots.slot(t);
      switch (isa) {
#if CALIBFAST_X86_VARIANTS
        case Isa::kAvx512:
          v_avx512::runs_task<Ld>(data, L, b, e, s);
          break;
        case Isa::kAvx2:
          v_avx2::runs_task<Ld>(data, L, b, e, s);
          break;
#endif
        default:
          v_base::runs_task<Ld>(data, L, b, e, s);
      }
    });
    slots.merge_into(fst, dst, ist);
    return;
  }

  Slots<acc_t> slots(C, nthreads, true);
    auto rows_task = [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    const int t = at::get_thread_num();
    auto s = slots.slot(t);
    acc_t* scratch = slots.scratch_for(t);
    switch (isa) {
#if CALIBFAST_X86_VARIANTS
      case Isa::kAvx512:
        v_avx512::rows_task<Ld>(data, L, r0, r1, c0, n, s, scratch);
        break;
      case Isa::kAvx2:
        v_avx2::rows_task<Ld>(data, L, r0, r1, c0, n, s, scratch);
        break;
#endif
      default:
        v_base::rows_task<Ld>(data, L, r0, r1, c0, n, s, scratch);
    }
  };
  if (rows >= 8 * nthreads || C < 64) {
    // Split the rows; every task covers all channels.
    const int64_t grain = std::max<int64_t>(1, kTaskValues / C);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { rows_task(b, e, 0, C); });
  } else {
    // Few rows, many channels: split the channels instead.
    const int64_t grain = std::max<int64_t>(64, kTaskValues / std::max<int64_t>(rows, 1));
    at::parallel_for(0, C, grain, [&](int64_t b, int64_t e) { rows_task(0, rows, b, e - b); });
  }
  slots.merge_into(fst, dst, ist);
}

void channel_stats_update_cpu(const at::Tensor& x_in, int64_t axis, at::Tensor& fstate, at::Tensor& dstate,
                              at::Tensor& istate) {
  const int64_t ax = check_channel_stats_args(x_in, axis, fstate, dstate, istate);
  TORCH_CHECK(x_in.device().is_cpu(), "calibfast: the CPU kernel got a tensor on ", x_in.device());
  at::Tensor x = x_in;
  Layout L;
  if (!analyse_layout(x, ax, L)) {
    // More than kMaxDims non-collapsible dims: rare enough to copy.
    x = x.contiguous();
    TORCH_INTERNAL_ASSERT(analyse_layout(x, ax, L));
  }
  const int64_t C = L.channels;
  if (C == 0) return;
  int64_t* ist = istate.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) ist[c] += L.rows;
  if (L.rows == 0) return;
  float* fst = fstate.data_ptr<float>();
  double* dst = dstate.data_ptr<double>();
  switch (x.scalar_type()) {
    case at::kFloat:
      update_typed<LoadF32>(x, L, fst, dst, ist);
      break;
    case at::kDouble:
      update_typed<LoadF64>(x, L, fst, dst, ist);
      break;
    case at::kHalf:
      update_typed<LoadF16>(x, L, fst, dst, ist);
      break;
    case at::kBFloat16:
      update_typed<LoadBF16>(x, L, fst, dst, ist);
      break;
    default:
      TORCH_CHECK(false, "calibfast: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace cpu
}  // namespace calibfast

TORCH_LIBRARY_IMPL(calibfast, CPU, m) {
  m.impl("channel_stats_update", &calibfast::cpu::channel_stats_update_cpu);
}
