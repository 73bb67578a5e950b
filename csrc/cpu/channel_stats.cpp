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
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>  // F16C's vcvtph2ps, used only in the AVX2 / AVX-512 variants
#define CALIBFAST_F16C 1
#else
#define CALIBFAST_F16C 0
#endif

namespace calibfast {
namespace cpu {

constexpr int64_t kChunk = 64;  // rows (row kernels) or values per lane (run kernels) per chunk
constexpr int kLanes = 16;      // independent accumulators in the run kernels
constexpr int kSubHists = 2;    // interleaved copies of the global histogram per thread
// Counters around each copy of the global histogram's B bins (one pad before the first copy, one
// after each; the same around each channel's N bins): indices -1 (NaN, Inf) and B (a finite value
// not binned) land in these instead of being tested for, so that the scatter loops have no branch
// (session 7: 10-35% faster increments in a microbenchmark, most on data crowded into few bins).
// 16 keeps each copy's start on a 64-byte line.
constexpr int64_t kHistPad = 16;
// Bin indices computed at a time before they are scattered: 4 KB, so that they and the counters
// (2 x 8 KB for 2048 bins) stay in the 32 KB L1 together (a whole row of 4096 channels at once,
// 16 KB of indices, pushed the counters out).
constexpr int64_t kIdxBlock = 1024;
// A task's rows of at least this many bytes prefetch their next 8 rows into L2 while the global
// histogram's scatter runs (rows_range). Session 14 (Xeon) gated it at 4 MiB: MiniLM's 1728 x 384
// float32 (1.3 MB a thread) looked ~5% slower with the prefetches when the input was in cache.
// Inside a forward pass, though, a hook's input has usually left the cache: session 15 (AMD,
// 512 KB of L2), MiniLM's calibration pass, time in the op 12% lower with this 256 KiB gate than
// with 4 MiB (paired passes, quartiles 1.04-1.17), and no change on inputs rewritten just before
// each call (2048 x 384, 2048 x 1536: 0.997-1.003).
constexpr int64_t kPrefetchMinBytes = int64_t(256) << 10;
// The statistics alone (no global histogram) of a task over kPrefetchMinBytes read each row this
// many values ahead of the fold (rows_range: float32, bfloat16, float16 with unit channel stride):
// with 8 rows folded at once, 8 streams, the hardware prefetchers did not keep the fold fed from
// memory (session 16, AMD Zen 5, 8192 x 4096: time per value 1.9x the x.sum() floor on one thread).
constexpr int64_t kStatsPrefetchValues = 256;
constexpr int64_t kTileC = 128; // channels per tile of the per-channel histogram pass (N > kTiledMaxN)
// Per-channel histograms of rows (session 9, ChannelTiles): the bin indices of many rows are
// buffered as uint16 offsets into the counters of their tile of kCTile channels, then scattered a
// tile at a time, so that a tile's counters (17 KB for 256 bins) stay in L1 for all the rows
// buffered: up to kCIdxLen indices per thread (1 MB), fewer when the input has fewer values.
constexpr int64_t kCTile = 16;
constexpr int64_t kCIdxLen = int64_t(1) << 19;
constexpr int64_t kCIdxLenOwn = int64_t(1) << 22;  // ... with few rows a channel (Slots: own_channels)
constexpr int64_t kTiledMaxN = 65535 / kCTile - kHistPad;  // offsets (j * (N + kHistPad) + bin + 1) fit uint16
// Entries per buffered row for n channels: whole tiles, and an odd number of 64-byte lines, so
// that a tile's rows (read 32 bytes a row) fall in different L1 sets. At 4096 channels (8 KB a
// row) every row of a tile mapped to one set of the 8-way L1 (session 9).
static inline int64_t tile_row_width(int64_t n) {
  int64_t w = (n + kCTile - 1) / kCTile * kCTile;
  if ((w * int64_t(sizeof(uint16_t)) / 64) % 2 == 0) w += 64 / int64_t(sizeof(uint16_t));
  return w;
}
// Run layouts (NCHW) with runs of at least this many values keep two copies of each channel's
// counters (Slot::ccopies). One copy: a run's increments, crowded into few bins, waited on each
// other (session 9, process time, 1 thread, fastest of 3 alternations, 256 bins a channel:
// 16 x 512 x 14 x 14 2.04 -> 1.55 ms, 8 x 512 x 64 x 64 19.6 -> 13.7). Shorter runs lost more to
// twice the counters than they gained (4 x 2048 x 7 x 7: 1.22 -> 1.52 ms).
constexpr int64_t kTwoCopiesMinRun = 128;
constexpr int64_t kWideBlock = 4096;  // channels folded at a time when a row has over 2x this many
constexpr int64_t kChannelSplitC = 1024;  // channels from which per-channel histograms split them over threads
constexpr int64_t kDeferChannelCounters = int64_t(1) << 18;  // C x N from which they merge after the pass
constexpr int64_t kParallelMergeC = 16384;  // channels from which the slots are merged in parallel
// 16-bit inputs (bfloat16, float16) with enough values: the global histogram first counts the
// 2^15 bit patterns of |x| (bits & 0x7fff: no float math per value, one increment), and the
// pattern counts become bin counts once per call, after the range is known (so no second pass
// when the range grows). The bin of a pattern is the bin of its value: the counts are the same
// as binning each value directly.
constexpr int64_t kTab = int64_t(1) << 15;
// int64 per 64-byte cache line: per-thread counters written while the other threads run are
// kept this far apart (two threads' counters in one line cost a line transfer per write).
constexpr int64_t kLine = 8;
constexpr int64_t kTableMinValues = int64_t(1) << 20;  // below: bin directly (the table's fixed cost)
// Values beyond the global histogram's range kept per thread in a pass whose range may grow
// (16 K floats, 64 KB; more in one thread: the call reads the input a second time instead).
constexpr int64_t kBeyondCap = int64_t(1) << 14;

// ---- loads: exact conversions to the accumulation type -------------------------------------
struct LoadF32 {
  using in_t = float;
  using acc_t = float;
  static constexpr bool kTable = false;
  static inline acc_t load(in_t v) { return v; }
};
struct LoadF64 {
  using in_t = double;
  using acc_t = double;
  static constexpr bool kTable = false;
  static inline acc_t load(in_t v) { return v; }
};
struct LoadBF16 {
  using in_t = uint16_t;
  using acc_t = float;
  static constexpr bool kTable = true;
  static constexpr uint32_t kFiniteLimit = 0x7f80;  // |x| bit patterns below this are finite
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
  static constexpr bool kTable = true;
  static constexpr uint32_t kFiniteLimit = 0x7c00;
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
// The per-channel counters of one thread (h_all: its csub; p: its pending) of the touched channels
// [p[1], p[2]) within [c_lo, c_hi) added into out_all ([C][N]) and cleared. Only the blocks of 8
// counters that are not all zero: an update with few values a channel (NCHW 7 x 7 maps, 256 bins)
// spent most of its time adding and clearing C x N counters, twice on two threads. Called for
// the whole range by one thread (under the lock), or for disjoint ranges by several at once
// (Slots::merge_channels); the pad before channel lo (where its -1 indices land) is cleared only
// by the range that starts at the first touched channel, so no two ranges write it.
static void flush_channel_counters(int64_t N, int64_t ccopies, int64_t* out_all, int32_t* h_all, const int64_t* p,
                                   int64_t c_lo, int64_t c_hi) {
  const int64_t stride = N + kHistPad, block = ccopies * stride;
  const int64_t lo = std::max(p[1], c_lo), hi = std::min(p[2], c_hi);
  for (int64_t c = lo; c < hi; ++c) {
    int32_t* h = h_all + c * block;
    int64_t* out = out_all + c * N;
    for (int64_t k = 0; k < ccopies; ++k) {
      int32_t* hk = h + k * stride;
      int64_t i = 0;
      for (; i + 8 <= N; i += 8) {
        int32_t any = 0;
        for (int j = 0; j < 8; ++j) any |= hk[i + j];
        if (any == 0) continue;
        for (int j = 0; j < 8; ++j) out[i + j] += hk[i + j];
        std::fill(hk + i, hk + i + 8, 0);
      }
      for (; i < N; ++i) {
        out[i] += hk[i];
        hk[i] = 0;
      }
      std::fill(hk + N, hk + stride, 0);  // its pad (what was not binned)
    }
  }
  if (lo < hi && lo == p[1]) std::fill(h_all + lo * block - kHistPad, h_all + lo * block, 0);
}

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
  // Histograms (B or N == 0: off). A value a = |x| with a >= lo lands in bin floor(a * scale)
  // when that is < B. Counts go to this thread's int32 counters (hsub: kSubHists interleaved
  // copies of the global histogram; csub: [channel][bin]), which flush() adds into the op's
  // int64 state under a lock: at the end of each task, and before an int32 could overflow.
  int64_t C = 0;
  int64_t group = 1;  // virtual channels per channel of the state (Layout::group)
  int64_t B = 0;
  acc_t hscale = 0, hlo = 0;
  bool table = false;       // 16-bit inputs: hsub counts bit patterns ([kSubHists][kTab]) into raw_out
  int32_t* hsub = nullptr;  // [kSubHists][hstride], after kHistPad counters of pad
  int64_t hstride = 0;      // counters per copy: B + kHistPad (the pads take what is not binned), or kTab
  int64_t* raw_out = nullptr;  // the call's pattern counts: [kTab]
  int64_t N = 0;
  const acc_t* cscale = nullptr;  // [C]
  const acc_t* clo = nullptr;     // [C]
  int32_t* csub = nullptr;        // [C][cblock()], after kHistPad counters of pad
  // Copies of each channel's counters (stride cstride()): 2 in run layouts with runs of at least
  // kTwoCopiesMinRun values, where a run's values (one channel, few bins) alternate between them
  // as the global histogram's do; 1 otherwise.
  int64_t ccopies = 1;
  bool defer_channels = false;    // per-channel counters merged after the pass (Slots::merge_channels)
  // This task is the only one of the call that bins its channels (the call's tasks split the
  // channels, or there is one task): ChannelTiles may add a tile's counters into the op's state
  // as soon as it has scattered them, without the lock (see ChannelTiles::scatter).
  bool own_channels = false;
  int32_t* idx = nullptr;         // scratch: max(C, kRunBlock, kChunk * kTileC) bin indices
  uint16_t* cidx = nullptr;       // rows with N <= kTiledMaxN: cidx_len per-channel tile offsets
  int64_t cidx_len = 0;
  // Values beyond the global range, kept while the call's range may still grow (keep_beyond):
  // Slots::slot points these at this thread's part of the call's buffer (nullptr: not kept).
  acc_t ovf_at = 0;               // |x| >= this: beyond the range
  acc_t* ovf = nullptr;           // [ovf_cap]
  int64_t* ovf_n = nullptr;       // how many this thread met (beyond ovf_cap: not all kept)
  int64_t ovf_cap = 0;
  // The same for the per-channel histograms: (channel, |x|) of values beyond their channel's range.
  const acc_t* covf_at = nullptr;  // [C]
  int64_t* covf_c = nullptr;       // [covf_cap]
  acc_t* covf_v = nullptr;         // [covf_cap]
  int64_t* covf_n = nullptr;
  int64_t covf_cap = 0;
  // [0]: values binned since the last flush; [1], [2]: the per-channel counters of channels
  // [pending[1], pending[2]) may be non-zero (flush() reads and clears only those); [3]: values
  // binned since the per-channel counters were last flushed
  int64_t* pending = nullptr;
  int64_t* hist_out = nullptr;    // the op's state: [B]
  int64_t* chist_out = nullptr;   // the op's state: [C][N]
  std::mutex* mu = nullptr;

  // counters per channel of csub: N + kHistPad (the pads take what is not binned)
  int64_t cstride() const { return N + kHistPad; }
  // counters per channel of csub: all its copies
  int64_t cblock() const { return ccopies * cstride(); }
  void touched(int64_t c0, int64_t c1) const {
    pending[1] = std::min(pending[1], c0);
    pending[2] = std::max(pending[2], c1);
  }
  void note_binned(int64_t n) const {
    pending[0] += n;
    pending[3] += n;
    if (pending[0] > (int64_t(1) << 30)) flush();
    if (N && pending[3] > (int64_t(1) << 30)) {  // (deferred or not: an int32 counter could overflow)
      std::lock_guard<std::mutex> lock(*mu);
      flush_channels();
    }
  }
  void flush_channels() const {
    flush_channel_counters(N, ccopies, chist_out, csub, pending, 0, C);
    pending[1] = C;
    pending[2] = 0;
    pending[3] = 0;
  }
  // The end of a task (and before an int32 counter could overflow): this thread's counters into
  // the op's state, under the lock. With defer_channels the per-channel counters stay for
  // Slots::merge_channels, which adds all threads' after the pass, split by channel.
  void flush() const {
    if (!(B || N)) return;
    if (B && pending[0] > 0) {
      std::lock_guard<std::mutex> lock(*mu);
      const int64_t H = table ? kTab : B;
      int64_t* out = table ? raw_out : hist_out;
      for (int64_t i = 0; i < H; ++i) {
        int64_t t = 0;
        for (int k = 0; k < kSubHists; ++k) t += hsub[k * hstride + i];
        out[i] += t;
      }
      std::fill(hsub - kHistPad, hsub + kSubHists * hstride, 0);  // the pads too (they count)
    }
    pending[0] = 0;
    if (N && !defer_channels && pending[1] < pending[2]) {
      std::lock_guard<std::mutex> lock(*mu);
      flush_channels();
    }
  }
};

constexpr int64_t kRunBlock = kChunk * kLanes;  // values of a run folded at a time
// Runs are read kRunPrefetch bytes ahead of the fold (a prefetch per 16 values). A run is one
// sequential stream, where the row kernels read 8 rows at once: the hardware prefetcher alone left
// long float32 runs waiting on memory (session 10: 1 thread, process time, 64 x 64 x 64 x 64
// float32, axis 1, 0.34-0.42 -> 0.26-0.31 ns a value; rows of 4096 channels: ~0.26).
constexpr int64_t kRunPrefetch = 2048;
constexpr int64_t kRunTile = 8;  // samples whose short runs of a channel are folded together

#define CALIBFAST_VECTOR_VARIANT 0
#define CALIBFAST_WIDE_VECTORS 0  // 64-byte GCC vector types (the AVX-512 variant only)
namespace v_base {
#include "channel_stats_kernel.h"
}  // namespace v_base

#if defined(__x86_64__) && defined(__GNUC__)
#define CALIBFAST_X86_VARIANTS 1
#undef CALIBFAST_VECTOR_VARIANT
#define CALIBFAST_VECTOR_VARIANT 1  // GCC vector types lower to vector code in these variants
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace v_avx2 {
#include "channel_stats_kernel.h"
}  // namespace v_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#undef CALIBFAST_WIDE_VECTORS
#define CALIBFAST_WIDE_VECTORS 1
namespace v_avx512 {
#include "channel_stats_kernel.h"
}  // namespace v_avx512
#pragma GCC pop_options
#endif
#undef CALIBFAST_VECTOR_VARIANT
#undef CALIBFAST_WIDE_VECTORS

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

// The histogram counters of every worker thread, kept between calls on this (calling) thread:
// flush() leaves them zero, so a call need neither allocate nor clear them. A call that did not
// finish (an exception) leaves the buffer marked dirty and the next call clears it.
struct CounterCache {
  std::vector<int32_t> buf;
  bool dirty = false;
};

static CounterCache& counter_cache() {
  thread_local CounterCache cache;
  return cache;
}

static int32_t* zeroed_counters(int64_t n) {
  CounterCache& cache = counter_cache();
  if (static_cast<int64_t>(cache.buf.size()) < n) {
    cache.buf.assign(n, 0);
  } else if (cache.dirty) {
    std::fill(cache.buf.begin(), cache.buf.end(), 0);
  }
  cache.dirty = true;
  return cache.buf.data();
}

// Folds partial state of channels [c0, c1) of C (min, max, abs-min; sum, sum |x|, sum x^2; NaN
// and Inf counts) into the op's state ([3][C] each; the value counts, row 0 of ist, are the
// caller's). Restrict pointers (the inputs never alias the state) so that the loop vectorises:
// without them it ran scalar, reloading the state after every store (session 6: 13% of the time
// of a 16 x 384 update, whose virtual rows fold 768 channels).
template <typename acc_t>
static void fold_state(int64_t C, int64_t c0, int64_t c1, const acc_t* __restrict__ mn,
                       const acc_t* __restrict__ mx, const acc_t* __restrict__ amn, const double* __restrict__ sum,
                       const double* __restrict__ sabs, const double* __restrict__ ssq,
                       const int64_t* __restrict__ nan, const int64_t* __restrict__ inf, float* __restrict__ fst,
                       double* __restrict__ dst, int64_t* __restrict__ ist) {
  for (int64_t c = c0; c < c1; ++c) {
    const float fmn = static_cast<float>(mn[c]);
    const float fmx = static_cast<float>(mx[c]);
    const float famn = static_cast<float>(amn[c]);
    fst[c] = fmn < fst[c] ? fmn : fst[c];
    fst[C + c] = fmx > fst[C + c] ? fmx : fst[C + c];
    fst[2 * C + c] = famn < fst[2 * C + c] ? famn : fst[2 * C + c];
    dst[c] += sum[c];
    dst[C + c] += sabs[c];
    dst[2 * C + c] += ssq[c];
    ist[C + c] += nan[c];
    ist[2 * C + c] += inf[c];
  }
}

// The slots' buffers, kept between calls on this (calling) thread: a call takes what it needs from
// here instead of allocating. Fresh allocations of a few MB were handed back to the kernel at the
// end of every call and page-faulted in again at the next (at C = 65536, most of an update's
// time). Contents are not kept: every call initialises what it reads.
template <typename acc_t>
struct SlotBuffers {
  std::vector<acc_t> a, scratch;
  std::vector<double> d;
  std::vector<int64_t> k;
  std::vector<int32_t> idx;
  std::vector<uint16_t> cidx;
  std::vector<acc_t> beyond;  // values beyond the global range (update_typed's pass 1)
  std::vector<acc_t> cbeyond;  // ... beyond their channel's range
  std::vector<int64_t> cbeyond_c;  // ... and their channels
};

template <typename acc_t>
static SlotBuffers<acc_t>& slot_buffers() {
  thread_local SlotBuffers<acc_t> buffers;
  return buffers;
}

template <typename T>
static T* at_least(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) {
    v.clear();
    v.shrink_to_fit();
    v.resize(n);
  }
  return v.data();
}

// Per-thread slots of per-channel accumulators and private histograms, merged into the op's
// state at the end. Sized once per call from the calling thread's SlotBuffers; each worker
// initialises its own slot when it takes its first task (in parallel, and only the slots that run).
template <typename acc_t>
struct Slots {
  int64_t C;      // the input's channels (virtual ones when Layout::group > 1)
  int64_t group;  // the input's channels per channel of the state (Layout::group)
  int64_t Cs;     // the state's channels: C / group
  int n;
  acc_t* a = nullptr;          // [n][3][Cs]: min, max, absmin
  double* d = nullptr;         // [n][3][Cs]: sum, sum|x|, sum x^2
  int64_t* k = nullptr;        // [n][2][Cs]: nan, inf
  acc_t* scratch = nullptr;    // [n][6][C]: chunk accumulators of the row kernels
  int32_t* hsub = nullptr;     // [n][kHistPad + kSubHists * HB]: global histogram } in the
  int32_t* csub = nullptr;     // [n][kHistPad + C * ccopies * (N + kHistPad)]: per-channel } counter cache
  int32_t* idx = nullptr;      // [n][max(C, kRunBlock, kChunk * kTileC)]: bin indices
  uint16_t* cidx = nullptr;    // [n][cidx_len]: per-channel tile offsets (rows, N <= kTiledMaxN)
  int64_t cidx_len = 0;
  std::vector<int64_t> pending;  // [n][kLine]: one cache line per thread (no false sharing)
  std::vector<int64_t> ready;    // [n][kLine]: whether slot t's statistics are initialised
  std::mutex mu;
  int64_t B = 0, N = 0, idx_len = 0;
  int64_t HB = 0;  // counters per copy of the global histogram: B + kHistPad, or kTab in table mode
  int64_t ccopies = 1;             // copies of each channel's counters (Slot::ccopies)
  bool defer_channels = false;     // per-channel counters merged by merge_channels (Slot::defer_channels)
  bool own_channels;               // Slot::own_channels
  int64_t hblock = 0, cblock = 0;  // counters per thread: pad + kSubHists copies; pad + C channels
  int64_t* hist_out;
  int64_t* chist_out;

  Slots(const Layout& L, int n_, bool stats, int64_t B_, bool table, int64_t N_, int64_t* hist, int64_t* chist,
        bool own_channels_)
      : C(L.channels), group(L.group), Cs(L.channels / L.group), n(n_), B(B_), N(N_),
        HB(table ? kTab : B_ + kHistPad),
        ccopies(L.mode == Mode::kRuns && L.run >= kTwoCopiesMinRun ? 2 : 1), own_channels(own_channels_),
        hblock(B_ ? kHistPad + kSubHists * HB : 0), cblock(N_ ? kHistPad + C * ccopies * (N_ + kHistPad) : 0),
        hist_out(hist), chist_out(chist) {
    const bool rows = L.mode != Mode::kRuns;
    SlotBuffers<acc_t>& buf = slot_buffers<acc_t>();
    if (stats) {
      a = at_least(buf.a, 3 * Cs * n);
      d = at_least(buf.d, 3 * Cs * n);
      k = at_least(buf.k, 2 * Cs * n);
      if (rows) scratch = at_least(buf.scratch, 6 * C * n);
      ready.assign(n * kLine, 0);
    }
    if (B || N) {
      int32_t* counters = zeroed_counters((hblock + cblock) * n);
      hsub = counters;
      csub = counters + hblock * n;
      idx_len = std::max<int64_t>({C, kRunBlock, kChunk * kTileC});
      idx = at_least(buf.idx, idx_len * n);
      if (rows && N > 0 && N <= kTiledMaxN) {
        // every row of the input at once when that takes less than kCIdxLen; at least 8 rows
        const int64_t width = (C + kCTile - 1) / kCTile * kCTile + 32;  // >= tile_row_width(n <= C)
        cidx_len = width * std::max<int64_t>(8, std::min(L.rows, kCIdxLen / width));
        if (own_channels && L.rows <= N) {
          // few rows a channel: room for all the rows of a block of channels (rows_task), so that
          // each tile's counters go into the state from L1 (ChannelTiles::scatter)
          const int64_t block = tile_row_width(std::min(C, 2 * kWideBlock));
          cidx_len = std::max(cidx_len, std::min(kCIdxLenOwn, block * L.rows));
        }
        cidx = at_least(buf.cidx, cidx_len * n);
      } else if (!rows && N > 0 && N <= kTiledMaxN && ccopies == 1 && 2 * L.run <= kRunBlock) {
        // short runs (RunTiles): every value of the input (a region per tile of kCTile channels,
        // room for one sample's runs in each at least) when that takes less than kCIdxLen
        const int64_t tiles = (C + kCTile - 1) / kCTile;
        cidx_len = std::min(kCIdxLen, std::max(L.rows * C, tiles * kCTile * L.run));
        cidx = at_least(buf.cidx, cidx_len * n);
      }
      pending.assign(n * kLine, 0);
      for (int t = 0; t < n; ++t) pending[t * kLine + 1] = C;  // no channel touched
    }
  }

  // Slot t's statistics at their identities (+inf, -inf, +inf; zeros), by the thread that owns it.
  void init_slot(int t) {
    if (a == nullptr || ready[t * kLine]) return;
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    acc_t* p = a + 3 * Cs * t;
    std::fill(p, p + Cs, inf);
    std::fill(p + Cs, p + 2 * Cs, -inf);
    std::fill(p + 2 * Cs, p + 3 * Cs, inf);
    std::fill(d + 3 * Cs * t, d + 3 * Cs * (t + 1), 0.0);
    std::fill(k + 2 * Cs * t, k + 2 * Cs * (t + 1), int64_t(0));
    ready[t * kLine] = 1;
  }

  Slot<acc_t> slot(int t, const Slot<acc_t>& hist_args) {
    TORCH_INTERNAL_ASSERT(t >= 0 && t < n, "calibfast: thread index ", t, " outside ", n, " slots");
    Slot<acc_t> s = hist_args;
    s.group = group;
    if (a != nullptr) {
      init_slot(t);
      s.mn = a + 3 * Cs * t;
      s.mx = s.mn + Cs;
      s.amn = s.mx + Cs;
      s.sum = d + 3 * Cs * t;
      s.sabs = s.sum + Cs;
      s.ssq = s.sabs + Cs;
      s.nan = k + 2 * Cs * t;
      s.inf = s.nan + Cs;
    }
    s.C = C;
    if (s.ovf != nullptr) {
      s.ovf += s.ovf_cap * t;
      s.ovf_n += kLine * t;
    }
    if (s.covf_c != nullptr) {
      s.covf_c += s.covf_cap * t;
      s.covf_v += s.covf_cap * t;
      s.covf_n += kLine * t;
    }
    if (B) {
      s.hsub = hsub + hblock * t + kHistPad;
      s.hstride = HB;
    }
    if (N) {
      s.csub = csub + cblock * t + kHistPad;
      s.ccopies = ccopies;
    }
    if (B || N) {
      s.idx = idx + idx_len * t;
      if (cidx != nullptr) {
        s.cidx = cidx + cidx_len * t;
        s.cidx_len = cidx_len;
      }
      s.pending = pending.data() + kLine * t;
      s.defer_channels = defer_channels;
      s.own_channels = own_channels;
      s.hist_out = hist_out;
      s.chist_out = chist_out;
      s.mu = &mu;
    }
    return s;
  }

  acc_t* scratch_for(int t) { return scratch + 6 * C * t; }

  // With defer_channels, after the pass: every thread's per-channel counters added into the op's
  // state, the channels split over the threads (no lock: the ranges are disjoint), instead of each
  // thread adding all of its own under the lock at the end of its task (the threads' flushes ran
  // one after another, each a read of C x N counters and a read-modify-write of the state).
  void merge_channels(bool parallel) {
    if (!N || !defer_channels) return;
    auto fold = [&](int64_t c0, int64_t c1) {
      for (int t = 0; t < n; ++t)
        flush_channel_counters(N, ccopies, chist_out, csub + cblock * t + kHistPad, pending.data() + kLine * t, c0, c1);
    };
    if (parallel) {
      at::parallel_for(0, C, std::max<int64_t>(16, (int64_t(1) << 16) / N), fold);
    } else {
      fold(0, C);
    }
    for (int t = 0; t < n; ++t) {
      pending[kLine * t + 1] = C;
      pending[kLine * t + 2] = 0;
      pending[kLine * t + 3] = 0;
    }
  }

  // Folds every initialised slot into the op's state; wide states split over the threads by
  // channel (parallel: not when the call runs on one thread anyway).
  void merge_stats(float* fst, double* dst, int64_t* ist, bool parallel) {
    auto fold = [&](int64_t c0, int64_t c1) {
      for (int t = 0; t < n; ++t) {
        if (!ready[t * kLine]) continue;  // this thread ran no task
        const acc_t* mn = a + 3 * Cs * t;
        const double* sm = d + 3 * Cs * t;
        const int64_t* kk = k + 2 * Cs * t;
        fold_state(Cs, c0, c1, mn, mn + Cs, mn + 2 * Cs, sm, sm + Cs, sm + 2 * Cs, kk, kk + Cs, fst, dst, ist);
      }
    };
    if (parallel && Cs >= kParallelMergeC) {
      at::parallel_for(0, Cs, kParallelMergeC / 4, fold);
    } else {
      fold(0, Cs);
    }
  }

};

// Runs one pass over the input: statistics and histograms (stats = true; histograms binned with
// the ranges in `hargs`), or histograms alone (stats = false: the pass after a range grew).
template <class Ld>
static void run_pass(const at::Tensor& x, const Layout& L, bool stats, const Slot<typename Ld::acc_t>& hargs,
                     float* fst, double* dst, int64_t* ist, int64_t* hist, int64_t* chist) {
  using acc_t = typename Ld::acc_t;
  const Isa isa = chosen_isa();
  const int64_t C = L.channels;
  const int64_t rows = L.rows;
  constexpr int64_t kTaskValues = 1 << 16;  // values per parallel task, at least
  // Called from inside a parallel region (nested), at::parallel_for runs inline on this thread,
  // whose index may exceed get_num_threads(): use a single slot then. Small inputs stay on one
  // thread too: a parallel region costs more than it saves there.
  const bool serial = at::in_parallel_region() || rows * C <= kTaskValues;
  const int nthreads = serial ? 1 : std::max(1, at::get_num_threads());
  auto slot_index = [serial]() { return serial ? 0 : at::get_thread_num(); };
  const void* data = x.const_data_ptr();
  // Per-channel histograms of many channels and few rows (at most 2 N a thread): split the
  // channels, so that each thread has the counters of its own channels only. Split by rows, every
  // thread kept C x N counters, whose flush read them all whatever the rows: with 256 rows of
  // 65536 channels that read was the larger part of the call.
  const bool chist_by_channels = L.mode != Mode::kRuns && hargs.N && nthreads > 1 && C >= kChannelSplitC &&
                                 rows <= 2 * hargs.N * nthreads;
  const bool own_channels = nthreads == 1 || chist_by_channels;  // (Slot::own_channels)
  Slots<acc_t> slots(L, nthreads, stats, hargs.B, hargs.table, hargs.N, hist, chist, own_channels);
  // Many per-channel counters and several threads: merged after the pass, split by channel.
  slots.defer_channels = nthreads > 1 && hargs.N * C >= kDeferChannelCounters;

#if CALIBFAST_X86_VARIANTS
#define CALIBFAST_ISA_CALL(fn, ...)                          \
  switch (isa) {                                             \
    case Isa::kAvx512:                                       \
      v_avx512::fn<Ld>(__VA_ARGS__);                         \
      break;                                                 \
    case Isa::kAvx2:                                         \
      v_avx2::fn<Ld>(__VA_ARGS__);                           \
      break;                                                 \
    default:                                                 \
      v_base::fn<Ld>(__VA_ARGS__);                           \
  }
#else
#define CALIBFAST_ISA_CALL(fn, ...) v_base::fn<Ld>(__VA_ARGS__);
#endif

  auto parallel = [&](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
    if (serial || nthreads == 1) {  // (one task: Slot::own_channels relies on it)
      f(0, n);
    } else {
      at::parallel_for(0, n, grain, f);
    }
  };

  if (L.mode == Mode::kRuns) {
    const int64_t pairs = (rows / L.run) * C;
    const int64_t grain = std::max<int64_t>(1, kTaskValues / L.run);
    parallel(pairs, grain, [&](int64_t b, int64_t e) {
      auto s = slots.slot(slot_index(), hargs);
      CALIBFAST_ISA_CALL(runs_task, data, L, b, e, s, stats)
    });
  } else {
    auto task = [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
      const int t = slot_index();
      auto s = slots.slot(t, hargs);
      acc_t* scratch = stats ? slots.scratch_for(t) : nullptr;  // nullptr: histograms only
      CALIBFAST_ISA_CALL(rows_task, data, L, r0, r1, c0, n, s, scratch)
    };
    if ((rows >= 8 * nthreads || C < 64) && !chist_by_channels) {
      // Split the rows; every task covers all channels.
      parallel(rows, std::max<int64_t>(1, kTaskValues / C), [&](int64_t b, int64_t e) { task(b, e, 0, C); });
    } else {
      // Few rows, many channels: split the channels instead.
      parallel(C, std::max<int64_t>(64, kTaskValues / std::max<int64_t>(rows, 1)),
               [&](int64_t b, int64_t e) { task(0, rows, b, e - b); });
    }
  }
#undef CALIBFAST_ISA_CALL
  if (stats) slots.merge_stats(fst, dst, ist, !serial && nthreads > 1);
  slots.merge_channels(!serial && nthreads > 1);
  if (hargs.B || hargs.N) counter_cache().dirty = false;  // every task flushed: all zero again
}

// Histogram exponents: the smallest e with amax < 2^e, clamped (see csrc/common.h); kEmptyExp
// for amax = -inf, the abs-max of a channel with no finite value yet (NaN / Inf only): such a
// channel needs no range, and max(e_old, kEmptyExp) keeps the one it had. (Before session 8 it
// gave kMaxExp like +inf: one all-NaN batch saturated that channel's range, or a whole
// single-channel histogram's, to 2^128 for good, and merges then disagreed with one pass.)
static int64_t exponent_for(float amax) {
  if (amax == -std::numeric_limits<float>::infinity()) return kEmptyExp;
  if (std::isinf(amax)) return kMaxExp;
  if (!(amax > 0.0f)) return kMinExp;
  int e = 0;
  std::frexp(static_cast<double>(amax), &e);
  return std::min<int64_t>(kMaxExp, std::max<int64_t>(kMinExp, e));
}

// Merges 2^(e_new - e_old) adjacent bins (exact), in place.
static void grow_hist(int64_t* h, int64_t B, int64_t e_old, int64_t e_new) {
  if (e_new <= e_old) return;
  const int64_t shift = std::min<int64_t>(e_new - e_old, 62);
  if (shift >= 62 || (int64_t(1) << shift) >= B) {
    int64_t total = 0;
    for (int64_t i = 0; i < B; ++i) total += h[i];
    std::fill(h, h + B, 0);
    h[0] = total;
    return;
  }
  for (int64_t i = 0; i < B; ++i) {
    const int64_t v = h[i];
    h[i] = 0;
    h[i >> shift] += v;  // i >> shift <= i: the target is never read again
  }
}

template <typename acc_t>
static acc_t bin_scale(int64_t B, int64_t e) {
  return static_cast<acc_t>(std::ldexp(static_cast<double>(B), static_cast<int>(-e)));
}

template <typename acc_t>
static acc_t lower_bound_for(int64_t e) {
  // Values below 2^e were binned already (0 for an empty range: bin everything).
  return e == kEmptyExp ? acc_t(0) : static_cast<acc_t>(std::ldexp(1.0, static_cast<int>(e)));
}

// Folds the finite |x| of n values (stride cs) into the running maxima l[0 .. kLanes) (-1: none
// yet). Lane arrays so that it vectorises (this is compiled for the baseline ISA: the samples
// below read ~1/64 of the input, once per empty histogram).
template <class Ld>
static void absmax_lanes(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t cs, typename Ld::acc_t* l) {
  using acc_t = typename Ld::acc_t;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  int64_t c = 0;
  if (cs == 1) {
    for (; c + kLanes <= n; c += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        acc_t a = std::fabs(Ld::load(p[c + j]));
        a = a < inf ? a : acc_t(-1);  // NaN and Inf: not in any range
        l[j] = a > l[j] ? a : l[j];
      }
    }
  }
  for (; c < n; ++c) {
    acc_t a = std::fabs(Ld::load(p[c * cs]));
    a = a < inf ? a : acc_t(-1);
    l[0] = a > l[0] ? a : l[0];
  }
}

// The largest finite |x| of a sample, -1 when there is none: the first k rows (kRows / kStrided
// layouts), or every 64th (outer row, channel) run, at least 8 of them (kRuns).
template <class Ld>
static typename Ld::acc_t sample_absmax(const at::Tensor& x, const Layout& L, int64_t k) {
  using acc_t = typename Ld::acc_t;
  using in_t = typename Ld::in_t;
  const in_t* base = static_cast<const in_t*>(x.const_data_ptr());
  const int64_t C = L.channels;
  acc_t l[kLanes];
  for (int j = 0; j < kLanes; ++j) l[j] = -1;
  if (L.mode == Mode::kRuns) {
    const int64_t pairs = (L.rows / L.run) * C;
    const int64_t step = std::max<int64_t>(1, std::min<int64_t>(64, pairs / 8));
    for (int64_t pi = 0; pi < pairs; pi += step) {
      const int64_t q = pi / C;
      absmax_lanes<Ld>(base + L.outer(q) + (pi - q * C) * L.channel_stride, L.run, 1, l);
    }
  } else {
    for (int64_t r = 0; r < k; ++r) absmax_lanes<Ld>(base + L.offsets(r), C, L.channel_stride, l);
  }
  acc_t m = l[0];
  for (int j = 1; j < kLanes; ++j) m = l[j] > m ? l[j] : m;
  return m;
}

// The bin of a kept |x| under the final range, as bin_indices computes it (floor(|x| * scale));
// B or more: not binned.
template <typename acc_t>
static int64_t kept_bin(acc_t a, acc_t scale, int64_t B) {
  acc_t f = a * scale;
  f = f < static_cast<acc_t>(B) ? f : static_cast<acc_t>(B);
  return static_cast<int64_t>(f);
}

// Whether every thread kept all the values it met beyond its range (counts [threads][kLine]).
static bool kept_all(const std::vector<int64_t>& counts) {
  for (size_t t = 0; t < counts.size(); t += kLine)
    if (counts[t] > kBeyondCap) return false;
  return true;
}

template <class Ld>
static void update_typed(const at::Tensor& x, const Layout& L, float* fst, double* dst, int64_t* ist, int64_t B,
                         int64_t* hist, int64_t* hexp, int64_t N, int64_t* chist, int64_t* chexp) {
  using acc_t = typename Ld::acc_t;
  const int64_t C = L.channels;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  // Pass 1: statistics, and every value below the current ranges binned (nothing is binned
  // into an empty histogram: its range is known only after this pass). 16-bit inputs with
  // enough values count bit patterns instead, turned into bins after the pass.
  Slot<acc_t> h1{};
  std::vector<acc_t> cscale, clo;
  std::vector<int64_t> raw;
  acc_t* beyond = nullptr;        // [threads][kBeyondCap]: values beyond pass 1's global range
  std::vector<int64_t> beyond_n;  // [threads][kLine]
  bool table = false;
  if constexpr (Ld::kTable) table = B && L.rows * C >= kTableMinValues;
  // The range pass 1 bins the global histogram with: the current one, or for an empty histogram
  // a provisional one from a sample (the first 1/64 of the rows, or every 64th run): the largest
  // finite |x| there cannot exceed the whole input's, so the final range is as wide or wider and
  // the counts grow into it exactly; what lay beyond the sample's range is kept during the pass and
  // binned after it (or, past the per-thread cap, by a second pass) — usually nothing: one octave
  // is wide, and outlier channels are in every row.
  int64_t e_start = B ? hexp[0] : kEmptyExp;
  if (B && !table && e_start == kEmptyExp) {
    const acc_t m = sample_absmax<Ld>(x, L, std::min(L.rows, std::max<int64_t>(8, L.rows / 64)));
    if (m >= 0) e_start = exponent_for(static_cast<float>(m));
  }
  if (table) {
    raw.assign(kTab, 0);
    h1.B = B;
    h1.table = true;
    h1.raw_out = raw.data();
  } else if (B && e_start != kEmptyExp) {
    h1.B = B;
    h1.hscale = bin_scale<acc_t>(B, e_start);
    h1.hlo = acc_t(0);
    // Values beyond this range are kept (up to kBeyondCap a thread) and binned after the pass
    // with the final range: a range that grows needs no second read unless a thread meets more.
    const int64_t threads = std::max(1, at::get_num_threads());
    beyond = at_least(slot_buffers<acc_t>().beyond, threads * kBeyondCap);  // kept between calls
    beyond_n.assign(threads * kLine, 0);
    h1.ovf_at = static_cast<acc_t>(std::ldexp(1.0, static_cast<int>(e_start)));
    h1.ovf = beyond;
    h1.ovf_n = beyond_n.data();
    h1.ovf_cap = kBeyondCap;
  }
  std::vector<acc_t> covf_at;
  std::vector<int64_t> cbeyond_n;
  if (N) {
    cscale.resize(C);
    clo.resize(C);
    bool any = false, all = true;
    for (int64_t c = 0; c < C; ++c) {
      const bool empty = chexp[c] == kEmptyExp;
      cscale[c] = empty ? acc_t(0) : bin_scale<acc_t>(N, chexp[c]);
      clo[c] = empty ? inf : acc_t(0);
      any |= !empty;
      all &= !empty;
    }
    if (any) {
      h1.N = N;
      h1.cscale = cscale.data();
      h1.clo = clo.data();
    }
    if (all) {
      // Every channel has a range: values beyond their channel's are kept as for the global
      // histogram (an empty channel would need all of its values: the second pass does that).
      covf_at.resize(C);
      for (int64_t c = 0; c < C; ++c) covf_at[c] = static_cast<acc_t>(std::ldexp(1.0, static_cast<int>(chexp[c])));
      const int64_t threads = std::max(1, at::get_num_threads());
      SlotBuffers<acc_t>& buf = slot_buffers<acc_t>();
      h1.covf_v = at_least(buf.cbeyond, threads * kBeyondCap);
      h1.covf_c = at_least(buf.cbeyond_c, threads * kBeyondCap);
      cbeyond_n.assign(threads * kLine, 0);
      h1.covf_n = cbeyond_n.data();
      h1.covf_at = covf_at.data();
      h1.covf_cap = kBeyondCap;
    }
  }
  run_pass<Ld>(x, L, true, h1, fst, dst, ist, hist, chist);
  if (!B && !N) return;

  // Grow the ranges to the new absmax; pass 2 bins what lay beyond the old ranges.
  Slot<acc_t> h2{};
  bool again = false;
  if (B) {
    const int64_t Cs = C / L.group;  // the state's channels
    float amax = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < Cs; ++c) amax = std::max(amax, std::max(fst[Cs + c], -fst[c]));
    const int64_t e_old = hexp[0];
    const int64_t e_new = std::max(e_old, exponent_for(amax));
    const int64_t e_at = table ? e_old : e_start;  // the range `hist` was binned with (>= e_old)
    if (e_at != kEmptyExp) grow_hist(hist, B, e_at, e_new);
    hexp[0] = e_new;
    hexp[1] = e_old;
    if constexpr (Ld::kTable) {
      if (table) {
        // Every finite pattern is below 2^e_new: its bin floor(|x| * B / 2^e_new) is < B (the
        // product by a power of two is exact, or underflows towards bin 0).
        const float sc = static_cast<float>(bin_scale<acc_t>(B, e_new));
        for (uint32_t u = 0; u < Ld::kFiniteLimit; ++u) {
          const int64_t k = raw[u];
          if (k == 0) continue;
          const int64_t b = static_cast<int64_t>(Ld::load(static_cast<uint16_t>(u)) * sc);
          TORCH_INTERNAL_ASSERT(b >= 0 && b < B, "calibfast: bit pattern ", u, " outside the histogram");
          hist[b] += k;
        }
      }
    }
    if (e_new != e_at && !table) {
      // What pass 1 did not bin lies at or beyond 2^e_at (or is not finite): bin it with the new
      // range from the kept values when every thread kept all of its own, else read it again.
      if (h1.ovf != nullptr && kept_all(beyond_n)) {
        const acc_t sc = bin_scale<acc_t>(B, e_new);
        for (size_t t = 0; t < beyond_n.size(); t += kLine) {
          const acc_t* v = beyond + (t / kLine) * kBeyondCap;
          for (int64_t j = 0; j < beyond_n[t]; ++j) {
            const int64_t b = kept_bin(v[j], sc, B);
            if (b < B) hist[b] += 1;
          }
        }
      } else {
        again = true;
        h2.B = B;
        h2.hscale = bin_scale<acc_t>(B, e_new);
        h2.hlo = lower_bound_for<acc_t>(e_at);
      }
    }
  }
  if (N) {
    bool any = false;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e_old = chexp[c];
      const int64_t e_new = std::max(e_old, exponent_for(std::max(fst[C + c], -fst[c])));
      if (e_old != kEmptyExp) grow_hist(chist + c * N, N, e_old, e_new);
      chexp[c] = e_new;
      chexp[C + c] = e_old;
      cscale[c] = e_new == kEmptyExp ? acc_t(0) : bin_scale<acc_t>(N, e_new);
      clo[c] = e_new != e_old ? lower_bound_for<acc_t>(e_old) : inf;  // inf: nothing left to bin
      any |= e_new != e_old;
    }
    const bool kept = h1.covf_c != nullptr && kept_all(cbeyond_n);
    if (any && kept) {
      // Bin the kept values of the channels whose range grew with their new range (what the
      // second pass would bin: clo = 2^e_old there, and nothing for the channels that did not).
      for (size_t t = 0; t < cbeyond_n.size(); t += kLine) {
        const int64_t* kc = h1.covf_c + (t / kLine) * kBeyondCap;
        const acc_t* kv = h1.covf_v + (t / kLine) * kBeyondCap;
        for (int64_t j = 0; j < cbeyond_n[t]; ++j) {
          const int64_t c = kc[j];
          if (chexp[c] == chexp[C + c]) continue;
          const int64_t b = kept_bin(kv[j], cscale[c], N);
          if (b < N) chist[c * N + b] += 1;
        }
      }
    } else if (any) {
      again = true;
      h2.N = N;
      h2.cscale = cscale.data();
      h2.clo = clo.data();
    }
  }
  if (again) run_pass<Ld>(x, L, false, h2, fst, dst, ist, hist, chist);
}

// Few channels in contiguous rows (a [rows, C] block, C small; no per-channel histograms): the
// row kernel's per-row and per-chunk costs would dominate, so k consecutive rows are read as one
// row of k * C "virtual" channels (virtual channel j * C + c is channel c), into scratch state
// that is then folded into the real one; the rows left over go through the ordinary path. The
// results are the same: min / max / abs-min / the counts / the histogram do not depend on how
// values are grouped; the sums are grouped differently (float64 beyond each chunk, as always).
//
// Virtual rows of at least 512 values when the input is small (6 x 512 chunk accumulators stay in
// L1, and the state of the virtual channels, set up and folded once per call, stays small), of at
// least 4096 when it comes from memory (from kLongRowsBytes): rows of 512 are 2 KB runs, too short
// for the hardware prefetchers (session 4: 262144 x 64 and 65536 x 256 f32 took 1.5-1.6x the
// time of 4096 x 4096 for the same bytes with 512, 0.9-1.2x with 4096), while for small inputs the
// per-call cost of 4096 virtual channels is what shows (2048 x 64: 0.04 ms with 512, 0.10 with
// 4096).
constexpr int64_t kWideRow = 512;
constexpr int64_t kLongRow = 4096;
constexpr int64_t kLongRowsBytes = int64_t(16) << 20;

// NCHW inputs with small maps (runs of H x W < kRunBlock values; channel axis 1 and each sample's
// C x H x W values contiguous): folded one run at a time, short runs cost 2.8x (float32) and 4.7x
// (bfloat16) the time per value of the row kernel for 7 x 7 (session 4). Each sample is read as one
// row of C x H x W virtual channels by the row kernel, and its chunk accumulators folded group by
// group (H x W virtual channels a channel) straight into the state's channels (Layout::group), so
// no per-virtual-channel state exists. Same results: min / max / abs-min / counts / histogram do
// not depend on grouping; the sums are grouped differently (float chunks, then float64).
// With fewer samples (or per-channel histograms) the runs go channel by channel over tiles of
// kRunTile samples instead (ShortRuns in channel_stats_kernel.h): a 16-lane fold per run and one
// reduction per channel and tile. Session 6, 2 threads, fastest of 3 alternations, µs for
// grouped rows / short runs: 8 x 2048 x 7 x 7 221 / 146, 16 x 2048 x 7 x 7 412 / 266, 16 x 512 x
// 14 x 14 498 / 221, 32 x 2048 x 7 x 7 616 / 514 (2048 bins 1509 / 1548), 48 x 512 x 14 x 14
// 536 / 692 (1904 / 2055), 64 x 2048 x 7 x 7 1116 / 1047 (2835 / 3147): grouped from 40 samples.
constexpr int64_t kGroupMinRows = 40;  // samples at least (fewer: short runs)

template <class Ld>
static bool update_grouped(const at::Tensor& x, const Layout& L, float* fst, double* dst, int64_t* ist, int64_t B,
                           int64_t* hist, int64_t* hexp, int64_t N) {
  if (L.mode != Mode::kRuns || N != 0 || L.run >= kRunBlock || L.channel_stride != L.run || L.outer.nd != 1)
    return false;
  const int64_t Q = L.outer.sizes[0];
  if (Q < kGroupMinRows || L.outer.strides[0] < L.channels * L.run) return false;
  Layout V;
  V.mode = Mode::kRows;
  V.channels = L.channels * L.run;
  V.channel_stride = 1;
  V.rows = Q;
  V.offsets.nd = 1;
  V.offsets.sizes[0] = Q;
  V.offsets.strides[0] = L.outer.strides[0];
  V.group = L.run;
  update_typed<Ld>(x, V, fst, dst, ist, B, hist, hexp, 0, nullptr, nullptr);
  return true;
}

template <class Ld>
static void update_layout(const at::Tensor& x, const Layout& L, float* fst, double* dst, int64_t* ist, int64_t B,
                          int64_t* hist, int64_t* hexp, int64_t N, int64_t* chist, int64_t* chexp) {
  if (update_grouped<Ld>(x, L, fst, dst, ist, B, hist, hexp, N)) return;
  const int64_t C = L.channels;
  const bool contiguous_rows = L.mode == Mode::kRows && L.offsets.nd == 1 && L.offsets.strides[0] == C;
  const int64_t wide = x.numel() * static_cast<int64_t>(x.element_size()) >= kLongRowsBytes ? kLongRow : kWideRow;
  const int64_t k = (wide + C - 1) / C;
  const int64_t R = L.rows / k;
  if (N != 0 || !contiguous_rows || C >= wide || R < 8) {
    update_typed<Ld>(x, L, fst, dst, ist, B, hist, hexp, N, chist, chexp);
    return;
  }
  const int64_t W = k * C;
  Layout V = L;
  V.channels = W;
  V.rows = R;
  V.offsets.sizes[0] = R;
  V.offsets.strides[0] = W;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> vf(3 * W);
  std::fill(vf.begin(), vf.begin() + W, inf);
  std::fill(vf.begin() + W, vf.begin() + 2 * W, -inf);
  std::fill(vf.begin() + 2 * W, vf.end(), inf);
  std::vector<double> vd(3 * W, 0.0);
  std::vector<int64_t> vi(3 * W, 0);
  const int64_t e0 = B ? hexp[0] : 0;
  update_typed<Ld>(x, V, vf.data(), vd.data(), vi.data(), B, hist, hexp, 0, nullptr, nullptr);
  for (int64_t o = 0; o < W; o += C) {
    const float* f = vf.data() + o;
    const double* d = vd.data() + o;
    const int64_t* i = vi.data() + o;
    fold_state(C, 0, C, f, f + W, f + 2 * W, d, d + W, d + 2 * W, i + W, i + 2 * W, fst, dst, ist);
  }
  const int64_t rest = L.rows - R * k;
  if (rest > 0) {
    const at::Tensor tail = x.as_strided({rest, C}, {C, 1}, x.storage_offset() + R * k * C);
    Layout T;
    TORCH_INTERNAL_ASSERT(analyse_layout(tail, 1, T));
    update_typed<Ld>(tail, T, fst, dst, ist, B, hist, hexp, 0, nullptr, nullptr);
  }
  if (B) hexp[1] = e0;  // the range before this call, as one pass would leave it
}

void channel_stats_update_cpu(const at::Tensor& x_in, int64_t axis, at::Tensor& fstate, at::Tensor& dstate,
                              at::Tensor& istate, at::Tensor& hist, at::Tensor& hexp, at::Tensor& chist,
                              at::Tensor& chexp) {
  const int64_t ax = check_channel_stats_args(x_in, axis, fstate, dstate, istate, hist, hexp, chist, chexp);
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
  const int64_t B = hist.numel();
  const int64_t N = chist.numel() > 0 ? chist.size(1) : 0;
  int64_t* hp = B ? hist.data_ptr<int64_t>() : nullptr;
  int64_t* he = B ? hexp.data_ptr<int64_t>() : nullptr;
  int64_t* cp = N ? chist.data_ptr<int64_t>() : nullptr;
  int64_t* ce = N ? chexp.data_ptr<int64_t>() : nullptr;
#define CALIBFAST_CASE(dtype, Ld)                                       \
  case dtype:                                                           \
    update_layout<Ld>(x, L, fst, dst, ist, B, hp, he, N, cp, ce);       \
    break;
  switch (x.scalar_type()) {
    CALIBFAST_CASE(at::kFloat, LoadF32)
    CALIBFAST_CASE(at::kDouble, LoadF64)
    CALIBFAST_CASE(at::kHalf, LoadF16)
    CALIBFAST_CASE(at::kBFloat16, LoadBF16)
#undef CALIBFAST_CASE
    default:
      TORCH_CHECK(false, "calibfast: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace cpu
}  // namespace calibfast

TORCH_LIBRARY_IMPL(calibfast, CPU, m) {
  m.impl("channel_stats_update", &calibfast::cpu::channel_stats_update_cpu);
}
