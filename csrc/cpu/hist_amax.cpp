// CPU implementations of the range searches that turn a histogram of |x| into a clipping amax
// (schemas and the pure-torch references: calibfast/_ops.py, calibfast/_reference_ranges.py).
//
//   hist_amax_percentile / hist_amax_mse / hist_amax_entropy
//       calibfast's conventions: bins of width w over [0, B*w), bin j = [j*w, (j+1)*w); every
//       candidate amax is a bin edge k*w; results never exceed the upper edge of the last
//       non-empty bin (full description: calibfast/ranges.py).
//   modelopt_amax_percentile / modelopt_amax_mse / modelopt_amax_entropy
//       the values of ModelOpt's _compute_amax_percentile / _compute_amax_mse /
//       _compute_amax_entropy (nvidia-modelopt 0.47, calib/histogram.py) for the same counts and
//       bin edges, bit for bit (see each function for how).
//
// A histogram is 1-D [B] (one search) or 2-D [C, B] (one search per row; rows in parallel, or the
// candidates of a single row in parallel). Counts may be int32/int64/float32/float64; they are
// read as float64 (exact for counts below 2^53).

// Several results below must be the IEEE operations of numpy/torch in their order: no a*b+c
// fused into an FMA.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace calibfast {
namespace cpu {

std::string cpu_capability();  // channel_stats.cpp: the instruction set chosen for this process

namespace {

namespace v_base {
#include "hist_amax_kernel.h"
}  // namespace v_base

#if defined(__x86_64__) && defined(__GNUC__)
#define CALIBFAST_HIST_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace v_avx2 {
#include "hist_amax_kernel.h"
}  // namespace v_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2")
namespace v_avx512 {
#include "hist_amax_kernel.h"
}  // namespace v_avx512
#pragma GCC pop_options
#endif

struct Kernels {
  decltype(&v_base::mse_int_sum) mse_int_sum;
  decltype(&v_base::mse_fp8_sum) mse_fp8_sum;
  decltype(&v_base::modelopt_mse_terms<true>) terms_store;
  decltype(&v_base::modelopt_mse_terms<false>) terms_sum;
};

#define CALIBFAST_HIST_KERNELS(ns) \
  Kernels { &ns::mse_int_sum, &ns::mse_fp8_sum, &ns::modelopt_mse_terms<true>, &ns::modelopt_mse_terms<false> }

Kernels kernels() {
#if CALIBFAST_HIST_X86_VARIANTS
  const std::string isa = cpu_capability();
  if (isa == "avx512") return CALIBFAST_HIST_KERNELS(v_avx512);
  if (isa == "avx2") return CALIBFAST_HIST_KERNELS(v_avx2);
#endif
  return CALIBFAST_HIST_KERNELS(v_base);
}

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- arguments ---------------------------------------------------------------------------------

struct Hist {
  at::Tensor counts;  // float64 [rows, bins], contiguous
  int64_t rows = 0;
  int64_t bins = 0;
  bool batched = false;  // 2-D input: one result per row
  const double* row(int64_t r) const { return counts.const_data_ptr<double>() + r * bins; }
};

Hist load_hist(const at::Tensor& hist, const char* op) {
  TORCH_CHECK(hist.device().is_cpu(), "calibfast::", op, ": the CPU kernel got a histogram on ", hist.device());
  TORCH_CHECK_VALUE(hist.dim() == 1 || hist.dim() == 2, "calibfast::", op,
                    ": the histogram must be 1-D [bins] or 2-D [channels, bins], got shape ", hist.sizes());
  const auto t = hist.scalar_type();
  TORCH_CHECK_TYPE(t == at::kLong || t == at::kInt || t == at::kFloat || t == at::kDouble, "calibfast::", op,
                   ": histogram counts must be int64, int32, float32 or float64, got ", t);
  Hist h;
  h.batched = hist.dim() == 2;
  h.rows = h.batched ? hist.size(0) : 1;
  h.bins = hist.size(-1);
  TORCH_CHECK_VALUE(h.bins >= 1, "calibfast::", op, ": the histogram has no bins");
  h.counts = hist.to(at::kDouble).contiguous().view({h.rows, h.bins});
  for (int64_t r = 0; r < h.rows; ++r) {
    const double* c = h.row(r);
    double total = 0;
    for (int64_t j = 0; j < h.bins; ++j) {
      TORCH_CHECK_VALUE(std::isfinite(c[j]) && c[j] >= 0, "calibfast::", op,
                        ": histogram counts must be finite and non-negative, got ", c[j], " in bin ", j,
                        h.batched ? " of row " : "", h.batched ? std::to_string(r) : std::string());
      total += c[j];
    }
    TORCH_CHECK_VALUE(total > 0, "calibfast::", op, ": empty histogram (all counts are zero)",
                      h.batched ? " in row " : "", h.batched ? std::to_string(r) : std::string());
  }
  return h;
}

// Bin widths, one per row (a 0-d or [1] tensor applies to every row).
std::vector<double> load_widths(const at::Tensor& width, const Hist& h, const char* op) {
  TORCH_CHECK(width.device().is_cpu(), "calibfast::", op, ": the bin width is on ", width.device());
  TORCH_CHECK_VALUE(width.numel() == 1 || (width.dim() == 1 && width.numel() == h.rows), "calibfast::", op,
                    ": the bin width must be a scalar or have one entry per histogram row (", h.rows,
                    "), got shape ", width.sizes());
  const at::Tensor w = width.to(at::kDouble).contiguous();
  const double* p = w.const_data_ptr<double>();
  std::vector<double> out(h.rows);
  for (int64_t r = 0; r < h.rows; ++r) {
    out[r] = p[w.numel() == 1 ? 0 : r];
    TORCH_CHECK_VALUE(std::isfinite(out[r]) && out[r] > 0, "calibfast::", op,
                      ": the bin width must be finite and positive, got ", out[r]);
  }
  return out;
}

// Bin edges [E] (shared) or [rows, E], as float64 [rows or 1, E]; E = bins + 1, or (extra_ok)
// more: ModelOpt's percentile and entropy searches only index edges[0..bins], and its calibrator
// can hold an edge or two more than bins + 1 once its bins have grown (torch.arange rounding).
at::Tensor load_edges(const at::Tensor& edges, const Hist& h, const char* op, bool extra_ok) {
  TORCH_CHECK(edges.device().is_cpu(), "calibfast::", op, ": the bin edges are on ", edges.device());
  TORCH_CHECK_TYPE(at::isFloatingType(edges.scalar_type()), "calibfast::", op,
                   ": bin edges must be floating point, got ", edges.scalar_type());
  const int64_t n = edges.dim() >= 1 ? edges.size(-1) : 0;
  const bool size_ok = extra_ok ? n >= h.bins + 1 : n == h.bins + 1;
  const bool shared = edges.dim() == 1 && size_ok;
  const bool per_row = h.batched && edges.dim() == 2 && edges.size(0) == h.rows && size_ok;
  TORCH_CHECK_VALUE(shared || per_row, "calibfast::", op, ": expected bin edges of shape [", h.bins + 1,
                    extra_ok ? " or more" : "", "]",
                    h.batched ? " or [" + std::to_string(h.rows) + ", " + std::to_string(h.bins + 1) + "]" : "",
                    " for a histogram of shape ", h.counts.sizes(), ", got ", edges.sizes(),
                    extra_ok ? "" : " (ModelOpt's own mse search fails on such a histogram too)");
  return edges.to(at::kDouble).narrow(-1, 0, h.bins + 1).contiguous().view({shared ? 1 : h.rows, h.bins + 1});
}

at::Tensor make_result(const Hist& h) {
  return h.batched ? at::empty({h.rows}, at::kFloat) : at::empty({}, at::kFloat);
}

// One search per row: rows in parallel when there are several (a search then runs its own
// candidate loop serially, at::parallel_for does not nest).
template <class F>
void for_rows(const Hist& h, float* out, F&& search) {
  if (h.rows == 1) {
    out[0] = search(int64_t{0});
    return;
  }
  at::parallel_for(0, h.rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) out[r] = search(r);
  });
}

// Index of the last non-empty bin.
int64_t last_nonempty(const double* c, int64_t B) {
  int64_t j = B - 1;
  while (j > 0 && c[j] == 0) --j;
  return j;
}

// ---- formats for the mse search ---------------------------------------------------------------

enum class Fmt { kInt, kFp8 };
struct Format {
  Fmt kind = Fmt::kInt;
  double levels = 127;  // kInt: steps of amax/levels over [0, amax]
  int mant = 3;         // kFp8: mantissa bits
  int emin = -6;        //       exponent of the smallest normal
  int emax = 8;         //       exponent of the largest binade
  float fmax = 448.f;   //       largest finite value
};

Format parse_format(const std::string& f, const char* op) {
  Format F;
  if (f == "int8") {
    F.levels = 127;
  } else if (f == "uint8") {
    F.levels = 255;
  } else if (f == "int4") {
    F.levels = 7;
  } else if (f == "uint4") {
    F.levels = 15;
  } else if (f == "fp8_e4m3") {
    F.kind = Fmt::kFp8;
    F.mant = 3;
    F.emin = -6;
    F.emax = 8;
    F.fmax = 448.f;
  } else if (f == "fp8_e5m2") {
    F.kind = Fmt::kFp8;
    F.mant = 2;
    F.emin = -14;
    F.emax = 15;
    F.fmax = 57344.f;
  } else {
    TORCH_CHECK_VALUE(false, "calibfast::", op, ": unknown format '", f,
                      "'; valid formats: int8, uint8, int4, uint4, fp8_e4m3, fp8_e5m2");
  }
  return F;
}

// ---- KL divergence by prefix sums ---------------------------------------------------------------
//
// For candidate i (clip at the upper edge of bin i-1) and a split of bins [0, i) into levels
// [lo_k, lo_{k+1}):
//   P_j = c_j / N for j < i-1, P_{i-1} = (c_{i-1} + O) / N with O = sum_{j >= i} c_j;
//   Q_j = (L_k / n_k) / S for c_j > 0 in level k (L_k its count, n_k its non-empty bins),
//         0 for empty bins; S = sum_{j < i} c_j;
//   KL = sum_j P_j log(P_j / Q_j)
//      = (1/N) [ sum_k (T_k - C'_k log(L_k / n_k)) + C log(S / N) ] + last-bin term,
// with T_k = sum of c log c and C'_k = sum of c over the bins of level k below i-1, C their sum
// over all levels. O(levels) per candidate from prefix sums of c, c log c and non-empty bins.
struct Prefix {
  std::vector<double> c;       // sum of counts below j (exact for integer counts < 2^53)
  std::vector<long double> t;  // sum of c log c below j
  std::vector<int64_t> nz;     // non-empty bins below j
  std::vector<int64_t> where;  // the non-empty bins, in order
  double total = 0;
  void build(const double* cnt, int64_t B) {
    c.assign(B + 1, 0.0);
    t.assign(B + 1, 0.0L);
    nz.assign(B + 1, 0);
    where.clear();
    for (int64_t j = 0; j < B; ++j) {
      const double v = cnt[j];
      c[j + 1] = c[j] + v;
      t[j + 1] = t[j] + (v > 0 ? static_cast<long double>(v) * std::log(static_cast<long double>(v)) : 0.0L);
      nz[j + 1] = nz[j] + (v > 0);
      if (v > 0) where.push_back(j);
    }
    total = c[B];
  }
};

// A level whose (at most kEqualCheck) non-empty bins below i-1 all hold the same count
// contributes exactly 0 (P == Q there) rather than a prefix-sum difference: mathematically equal
// divergences (ties, e.g. KL = 0 when the data fit the levels) then stay equal and the tie rule
// decides, not rounding.
constexpr int64_t kEqualCheck = 8;

// lo: level boundaries, lo[0] = 0 <= lo[1] <= ... <= lo[levels] = i.
// Returns +inf where P has mass that Q cannot carry, NaN where Q has no mass (S = 0).
double kl_by_prefix(const Prefix& pf, const double* cnt, int64_t i, const int64_t* lo, int64_t levels) {
  const double N = pf.total;
  const double S = pf.c[i];
  if (!(S > 0)) return kNaN;
  const double cl = cnt[i - 1];
  const double O = N - S;
  long double main = 0.0L;
  double lastq_log = 0;  // log(L_k / n_k) of the level holding bin i-1
  for (int64_t k = 0; k < levels; ++k) {
    const int64_t a = lo[k];
    const int64_t b = lo[k + 1];
    if (b <= a) continue;
    const double Lk = pf.c[b] - pf.c[a];
    if (!(Lk > 0)) continue;
    const int64_t nk = pf.nz[b] - pf.nz[a];
    const double lg = std::log(Lk / static_cast<double>(nk));
    const int64_t bb = std::min(b, i - 1);  // bins of this level below i-1
    if (b == i) lastq_log = lg;
    if (bb <= a) continue;
    if (nk <= kEqualCheck) {
      const int64_t p0 = pf.nz[a];
      const double c0 = cnt[pf.where[p0]];
      bool equal = true;
      for (int64_t p = p0 + 1; p < p0 + nk && pf.where[p] < bb; ++p) equal = equal && cnt[pf.where[p]] == c0;
      // (the bin i-1, when in this level, is not part of the sum but is part of L_k and n_k)
      if (equal && (b != i || cl == c0 || cl == 0)) continue;
    }
    const long double Ck = static_cast<long double>(pf.c[bb] - pf.c[a]);
    main += (pf.t[bb] - pf.t[a]) - Ck * lg;
  }
  if (O > 0) main += static_cast<long double>(pf.c[i - 1]) * std::log(static_cast<long double>(S / N));
  double kl = static_cast<double>(main / N);
  const double Pl = cl + O;
  if (Pl > 0) {
    if (!(cl > 0)) return kInf;
    kl += (Pl / N) * (std::log(Pl) - std::log(N) - (lastq_log - std::log(S)));
  }
  return kl;
}

// ---- calibfast conventions ---------------------------------------------------------------------

float percentile_row(const double* c, int64_t B, double w, double p) {
  double N = 0;
  for (int64_t j = 0; j < B; ++j) N += c[j];
  // The first bin where the cumulative count reaches p% of the total: 100 * cum >= p * N.
  const double thr = p * N;
  double cum = 0;
  for (int64_t j = 0; j < B; ++j) {
    cum += c[j];
    if (c[j] > 0 && cum * 100.0 >= thr) return static_cast<float>(static_cast<double>(j + 1) * w);
  }
  return static_cast<float>(static_cast<double>(last_nonempty(c, B) + 1) * w);
}

// The fp8 error of bin 0, [0, hi) in the scaled domain: every binade from the subnormals up.
double fp8_bin0(double yhi, const Format& F) {
  const int emax = F.emax;
  double tot = 0;
  double lo = 0;
  for (int e = F.emin + 1; e <= emax && lo < yhi; ++e) {
    const double t = std::min(std::ldexp(1.0, e), yhi);
    const double q = std::ldexp(1.0, e - 1 - F.mant);
    tot += v_base::cell_sq(lo, t, q, 1.0 / q, static_cast<double>(F.fmax) / q);
    lo = t;
  }
  if (lo < yhi) {
    const double q = std::ldexp(1.0, emax - F.mant);
    tot += v_base::cell_sq(lo, yhi, q, 1.0 / q, static_cast<double>(F.fmax) / q);
  }
  return tot;
}

// Errors of every candidate amax = k*w, k = 1..K (K: upper edge of the last non-empty bin), the
// values of each bin taken as spread uniformly over it (as torch.ao's HistogramObserver does):
// sum over bins of count / w * integral over the bin of (x - q(x))^2. Bins below k: a vectorised
// loop over the non-empty ones; bins from k on are all clipped to the same q_c, and their errors,
// count * ((lo - q_c)^2 + (lo - q_c) * w + w^2 / 3), come from suffix sums (long double).
float mse_row(const double* c, int64_t B, double w, const Format& F, const Kernels& kern) {
  std::vector<double> lo, nw;
  std::vector<int64_t> below(B + 1, 0);  // non-empty bins below j
  lo.reserve(B);
  nw.reserve(B);
  for (int64_t j = 0; j < B; ++j) {
    below[j + 1] = below[j] + (c[j] > 0);
    if (c[j] > 0) {
      lo.push_back(static_cast<double>(j) * w);
      nw.push_back(c[j] / w);
    }
  }
  const int64_t m = static_cast<int64_t>(lo.size());
  const bool has0 = c[0] > 0;
  // Suffix sums over the non-empty bins, in units of w: n, n*j, n*j^2.
  std::vector<long double> t0(m + 1, 0.0L), t1(m + 1, 0.0L), t2(m + 1, 0.0L);
  for (int64_t p = m - 1; p >= 0; --p) {
    const long double n = static_cast<long double>(nw[p]) * w;
    const long double u = static_cast<long double>(lo[p]) / w;
    t0[p] = t0[p + 1] + n;
    t1[p] = t1[p + 1] + n * u;
    t2[p] = t2[p + 1] + n * u * u;
  }
  const int64_t K = last_nonempty(c, B) + 1;
  std::vector<double> err(K);
  // Threads only for enough work (cell evaluations, a few ns each): waking them costs more below.
  int64_t work = 0;
  for (int64_t k = 1; k <= K; ++k) work += below[k];
  const int64_t grain = work < (int64_t{1} << 20) ? K : 16;
  at::parallel_for(1, K + 1, grain, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const double a = static_cast<double>(k) * w;
      const int64_t p = below[k];
      double inside, qc;
      if (F.kind == Fmt::kInt) {
        const double q = a / F.levels;
        inside = kern.mse_int_sum(lo.data(), nw.data(), p, w, q, F.levels / a, F.levels);
        qc = F.levels * q;
      } else {
        const double S = static_cast<double>(F.fmax) / a;
        const int64_t p0 = has0 ? 1 : 0;
        double y = p > p0 ? kern.mse_fp8_sum(lo.data() + p0, nw.data() + p0, p - p0, w, S, F.mant, F.emin, F.emax,
                                             static_cast<double>(F.fmax))
                          : 0.0;
        if (has0 && p > 0) y += nw[0] * fp8_bin0(w * S, F);
        inside = y / (S * S * S);
        qc = static_cast<double>(F.fmax) / S;
      }
      const long double uq = static_cast<long double>(qc) / w;
      const long double clip =
          (t2[p] - 2.0L * uq * t1[p] + uq * uq * t0[p] + t1[p] - uq * t0[p] + t0[p] / 3.0L) * w * w;
      err[k - 1] = inside + static_cast<double>(clip);
    }
  });
  // Smallest error; on exact ties the smallest amax.
  int64_t best = 0;
  for (int64_t k = 1; k < K; ++k)
    if (err[k] < err[best]) best = k;
  return static_cast<float>(static_cast<double>(best + 1) * w);
}

float entropy_row(const double* c_in, int64_t B, double w, int64_t levels, bool ignore_zero_spike) {
  std::vector<double> copy;
  const double* c = c_in;
  if (ignore_zero_spike && B >= 2) {  // ModelOpt's rule: bin 0 takes bin 1's count
    copy.assign(c_in, c_in + B);
    copy[0] = copy[1];
    c = copy.data();
  }
  const int64_t K = last_nonempty(c, B) + 1;
  // All data within `levels` bins: the quantized distribution equals P, KL = 0 at the max.
  if (K <= levels) return static_cast<float>(static_cast<double>(K) * w);
  Prefix pf;
  pf.build(c, B);
  const int64_t n = K - levels + 1;  // candidates i = levels..K
  std::vector<double> kl(n);
  at::parallel_for(0, n, 32, [&](int64_t b, int64_t e) {
    std::vector<int64_t> lo(levels + 1);
    for (int64_t t = b; t < e; ++t) {
      const int64_t i = levels + t;
      for (int64_t k = 0; k <= levels; ++k) lo[k] = (k * i + levels - 1) / levels;  // ceil(k*i/levels)
      const double d = kl_by_prefix(pf, c, i, lo.data(), levels);
      kl[t] = std::isnan(d) ? kInf : d;  // no data below i: everything clipped
    }
  });
  // Smallest divergence; on exact ties the largest amax (least clipping), as ModelOpt.
  int64_t best = 0;
  for (int64_t t = 1; t < n; ++t)
    if (kl[t] <= kl[best]) best = t;
  return static_cast<float>(static_cast<double>(levels + best) * w);
}

at::Tensor hist_amax_percentile_cpu(const at::Tensor& hist, const at::Tensor& width, double percentile) {
  const char* op = "hist_amax_percentile";
  TORCH_CHECK_VALUE(percentile > 0 && percentile <= 100, "calibfast::", op, ": percentile must be in (0, 100], got ",
                    percentile);
  const Hist h = load_hist(hist, op);
  const std::vector<double> w = load_widths(width, h, op);
  at::Tensor out = make_result(h);
  for_rows(h, out.data_ptr<float>(), [&](int64_t r) { return percentile_row(h.row(r), h.bins, w[r], percentile); });
  return out;
}

at::Tensor hist_amax_mse_cpu(const at::Tensor& hist, const at::Tensor& width, c10::string_view fmt) {
  const char* op = "hist_amax_mse";
  const Format F = parse_format(std::string(fmt), op);
  const Hist h = load_hist(hist, op);
  const std::vector<double> w = load_widths(width, h, op);
  const Kernels kern = kernels();
  at::Tensor out = make_result(h);
  for_rows(h, out.data_ptr<float>(), [&](int64_t r) { return mse_row(h.row(r), h.bins, w[r], F, kern); });
  return out;
}

at::Tensor hist_amax_entropy_cpu(const at::Tensor& hist, const at::Tensor& width, int64_t levels,
                                 bool ignore_zero_spike) {
  const char* op = "hist_amax_entropy";
  TORCH_CHECK_VALUE(levels >= 2, "calibfast::", op, ": levels must be >= 2, got ", levels);
  const Hist h = load_hist(hist, op);
  const std::vector<double> w = load_widths(width, h, op);
  at::Tensor out = make_result(h);
  for_rows(h, out.data_ptr<float>(),
           [&](int64_t r) { return entropy_row(h.row(r), h.bins, w[r], levels, ignore_zero_spike); });
  return out;
}

// ---- ModelOpt compatibility --------------------------------------------------------------------

// numpy's pairwise summation of float64 (np.sum / np.add.reduce over a contiguous array): blocks
// of at most 128 summed with 8 accumulators, split in halves (multiples of 8) above that.
template <class F>
double np_pairwise_sum(const F& a, int64_t lo, int64_t n) {
  if (n < 8) {
    double res = 0.;
    for (int64_t k = 0; k < n; ++k) res += a(lo + k);
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int k = 0; k < 8; ++k) r[k] = a(lo + k);
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int k = 0; k < 8; ++k) r[k] += a(lo + i + k);
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a(lo + i);
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return np_pairwise_sum(a, lo, n2) + np_pairwise_sum(a, lo + n2, n - n2);
}

// scipy.special.rel_entr.
inline double rel_entr(double x, double y) {
  if (std::isnan(x) || std::isnan(y)) return kNaN;
  if (x > 0 && y > 0) return x * std::log(x / y);
  if (x == 0 && y >= 0) return 0;
  return kInf;
}

// ModelOpt's level split of bins [0, i): level(j) = digitize(j, linspace(0, i, nb + 1)) - 1,
// i.e. the largest k with fl(k * fl(i / nb)) <= j. Level k is [ceil(s_k), ceil(s_{k+1})).
void modelopt_levels(int64_t i, int64_t nb, int64_t* lo) {
  const double step = static_cast<double>(i) / static_cast<double>(nb);
  lo[0] = 0;
  for (int64_t k = 1; k < nb; ++k) {
    const double s = static_cast<double>(k) * step;
    lo[k] = std::min<int64_t>(i, static_cast<int64_t>(std::ceil(s)));
  }
  lo[nb] = i;
}

// ModelOpt's divergence for candidate i with numpy's and scipy's operations in their order:
// new_density (each level's count over its non-empty bins, on those bins), the reference density
// with the outliers in its last bin, both normalised by their pairwise sums, rel_entr, pairwise sum.
double modelopt_kl_exact(const double* c, int64_t i, double N, double O, const int64_t* lo, int64_t nb,
                         std::vector<double>& q) {
  q.assign(i, 0.0);
  for (int64_t k = 0; k < nb; ++k) {
    double sum = 0;
    int64_t cnt = 0;
    for (int64_t j = lo[k]; j < lo[k + 1]; ++j) {
      if (c[j] != 0) {
        sum += c[j];
        ++cnt;
      }
    }
    if (cnt == 0) continue;
    const double v = sum / static_cast<double>(cnt);
    for (int64_t j = lo[k]; j < lo[k + 1]; ++j)
      if (c[j] != 0) q[j] = v;
  }
  const double sq = np_pairwise_sum([&](int64_t j) { return q[j]; }, 0, i);
  const double last = c[i - 1] + O;
  return np_pairwise_sum(
      [&](int64_t j) {
        const double p = (j == i - 1 ? last : c[j]) / N;
        return rel_entr(p, q[j] / sq);
      },
      0, i);
}

float modelopt_entropy_row(const double* c_in, int64_t B, const double* edges, int64_t nb, int64_t stride,
                           int64_t start_bin) {
  std::vector<double> c(c_in, c_in + B);
  c[0] = c[1];  // ModelOpt: bins[0] = bins[1]
  Prefix pf;
  pf.build(c.data(), B);
  const double N = pf.total;
  const int64_t n = (B - start_bin) / stride + 1;  // candidates i = start_bin + t * stride <= B
  // Screen every candidate with the O(levels) divergence, then recompute with ModelOpt's exact
  // operations only those within a margin of the smallest: the screening differs from numpy's
  // value by ~1e-13 (both are within a few ulp-sums of the true KL), far inside the margin.
  std::vector<double> kl(n);
  at::parallel_for(0, n, 32, [&](int64_t b, int64_t e) {
    std::vector<int64_t> lo(nb + 1);
    for (int64_t t = b; t < e; ++t) {
      const int64_t i = start_bin + t * stride;
      modelopt_levels(i, nb, lo.data());
      kl[t] = N > 0 ? kl_by_prefix(pf, c.data(), i, lo.data(), nb) : kNaN;
    }
  });
  // np.argmin over the reversed list: a NaN wins (the last NaN), else the last of the smallest.
  int64_t pick = -1;
  for (int64_t t = n - 1; t >= 0 && pick < 0; --t)
    if (std::isnan(kl[t])) pick = t;
  if (pick < 0) {
    double mn = kInf;
    for (int64_t t = 0; t < n; ++t) mn = std::min(mn, kl[t]);
    if (std::isinf(mn)) {
      pick = n - 1;  // every candidate infinite: the last
    } else {
      const double margin = 1e-9 + 1e-7 * std::abs(mn);
      std::vector<double> q;
      std::vector<int64_t> lo(nb + 1);
      double best = kInf;
      for (int64_t t = 0; t < n; ++t) {
        if (!(kl[t] <= mn + margin)) continue;
        const int64_t i = start_bin + t * stride;
        modelopt_levels(i, nb, lo.data());
        const double d = modelopt_kl_exact(c.data(), i, N, N - pf.c[i], lo.data(), nb, q);
        if (pick < 0 || d <= best) {
          best = d;
          pick = t;
        }
      }
    }
  }
  return static_cast<float>(edges[start_bin + pick * stride]);
}

at::Tensor modelopt_amax_entropy_cpu(const at::Tensor& hist, const at::Tensor& bin_edges, int64_t num_bits,
                                     bool is_unsigned, int64_t stride, int64_t start_bin) {
  const char* op = "modelopt_amax_entropy";
  TORCH_CHECK_VALUE(num_bits >= 1 && num_bits <= 16, "calibfast::", op, ": num_bits must be in [1, 16], got ",
                    num_bits);
  TORCH_CHECK_VALUE(stride >= 1, "calibfast::", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(start_bin >= 1, "calibfast::", op, ": start_bin must be >= 1, got ", start_bin);
  const Hist h = load_hist(hist, op);
  const at::Tensor edges = load_edges(bin_edges, h, op, true);
  TORCH_CHECK_VALUE(h.bins >= 2, "calibfast::", op, ": ModelOpt's entropy search needs at least 2 bins");
  TORCH_CHECK_VALUE(start_bin <= h.bins, "calibfast::", op, ": no candidates: start_bin (", start_bin,
                    ") is beyond the number of bins (", h.bins, ")");
  const int64_t nb = int64_t{1} << (num_bits - 1 + (is_unsigned ? 1 : 0));
  at::Tensor out = make_result(h);
  const double* e = edges.const_data_ptr<double>();
  const int64_t estride = edges.size(0) == 1 ? 0 : h.bins + 1;
  for_rows(h, out.data_ptr<float>(), [&](int64_t r) {
    return modelopt_entropy_row(h.row(r), h.bins, e + r * estride, nb, stride, start_bin);
  });
  return out;
}

// ModelOpt's mse search, in float32 as ModelOpt runs it on CPU: centres (e[j] + e[j+1]) / 2,
// fake_tensor_quant (scale = max_bound / amax, clamp(round(x * scale)) / scale), per-bin error
// (q - x)^2 * count, and the mean over the bins. The mean must be torch's float32 mean (its
// summation order decides near-ties), so: every candidate's terms are summed in float64 first
// (a screen, within ~1e-6 of torch's float32 sum), and only the candidates within a margin of the
// smallest are then written out and averaged by at::mean itself. A row of a [rows, bins] mean is
// the 1-D mean of that row while bins is within one parallel grain; beyond it each row is reduced
// on its own, as ModelOpt does.
float modelopt_mse_row(const double* c_in, int64_t B, const double* edges, int64_t num_bits, bool is_unsigned,
                       int64_t stride, int64_t start_bin, const Kernels& kern) {
  std::vector<float> c(B), x(B);
  for (int64_t j = 0; j < B; ++j) {
    c[j] = static_cast<float>(c_in[j]);
    x[j] = (static_cast<float>(edges[j + 1]) + static_cast<float>(edges[j])) / 2.0f;
  }
  const float mb = static_cast<float>(std::ldexp(1.0, static_cast<int>(num_bits - 1 + (is_unsigned ? 1 : 0))) - 1.0);
  const float eps = 1.0f / static_cast<float>(1 << 24);
  const int64_t n = (B - 1 - start_bin) / stride + 1;  // candidates start_bin + t * stride < B
  // The terms of candidate t into out (or only their float64 sum when out is null).
  auto terms = [&](int64_t t, float* out) -> double {
    const float amax = x[start_bin + t * stride];
    if (amax <= eps) {  // ModelOpt: a (near-)zero amax quantizes everything to 0
      double acc = 0;
      for (int64_t j = 0; j < B; ++j) {
        const float d = 0.0f - x[j];
        const float v = d * d * c[j];
        if (out) out[j] = v;
        acc += v;
      }
      return acc;
    }
    const float s = mb / amax;
    return out ? kern.terms_store(x.data(), c.data(), B, s, mb, out)
               : kern.terms_sum(x.data(), c.data(), B, s, mb, nullptr);
  };
  std::vector<double> screen(n);
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) screen[t] = terms(t, nullptr);
  });
  // Candidates whose torch mean may be the smallest: all of them if any is NaN (num_bits = 1),
  // else those within the margin. Torch's float32 sum of B non-negative terms is within
  // ~log2(B) * 2^-24 of the exact sum (B * 2^-24 even summed naively); the margin is 4x the latter
  // and at least 1e-3.
  bool any_nan = false;
  double mn = kInf;
  for (int64_t t = 0; t < n; ++t) {
    any_nan = any_nan || std::isnan(screen[t]);
    mn = std::min(mn, screen[t]);
  }
  const double margin = std::max(1e-3, 4.0 * static_cast<double>(B) * 0x1p-24);
  std::vector<int64_t> sel;
  for (int64_t t = 0; t < n; ++t)
    if (any_nan || screen[t] <= mn * (1 + margin)) sel.push_back(t);
  const int64_t ns = static_cast<int64_t>(sel.size());
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 22) / B);
  const bool row_means = B > at::internal::GRAIN_SIZE;
  at::Tensor buf = at::empty({std::min(chunk, ns), B}, at::kFloat);
  float* bp = buf.data_ptr<float>();
  std::vector<float> mse(ns);
  for (int64_t s0 = 0; s0 < ns; s0 += chunk) {
    const int64_t rows = std::min(chunk, ns - s0);
    at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) terms(sel[s0 + r], bp + r * B);
    });
    const at::Tensor part = buf.narrow(0, 0, rows);
    if (!row_means) {
      const at::Tensor mean = at::mean(part, {1});
      const float* mp = mean.const_data_ptr<float>();
      std::copy(mp, mp + rows, mse.begin() + s0);
    } else {
      for (int64_t r = 0; r < rows; ++r) mse[s0 + r] = at::mean(part[r]).item<float>();
    }
  }
  // np.argmin: the first NaN, else the first of the smallest.
  int64_t best = 0;
  for (int64_t q = 0; q < ns; ++q) {
    if (std::isnan(mse[q])) {
      best = q;
      break;
    }
    if (mse[q] < mse[best]) best = q;
  }
  return x[start_bin + sel[best] * stride];
}

at::Tensor modelopt_amax_mse_cpu(const at::Tensor& hist, const at::Tensor& bin_edges, int64_t num_bits,
                                 bool is_unsigned, int64_t stride, int64_t start_bin) {
  const char* op = "modelopt_amax_mse";
  TORCH_CHECK_VALUE(num_bits >= 1 && num_bits <= 16, "calibfast::", op, ": num_bits must be in [1, 16], got ",
                    num_bits);
  TORCH_CHECK_VALUE(stride >= 1, "calibfast::", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(start_bin >= 0, "calibfast::", op, ": start_bin must be >= 0, got ", start_bin);
  const Hist h = load_hist(hist, op);
  const at::Tensor edges = load_edges(bin_edges, h, op, false);
  TORCH_CHECK_VALUE(start_bin < h.bins, "calibfast::", op, ": no candidates: ModelOpt's mse search tries bin centres ",
                    start_bin, " to ", h.bins - 1, " (start_bin must be below the number of bins, ", h.bins, ")");
  at::Tensor out = make_result(h);
  float* o = out.data_ptr<float>();
  const double* e = edges.const_data_ptr<double>();
  const int64_t estride = edges.size(0) == 1 ? 0 : h.bins + 1;
  const Kernels kern = kernels();
  // Rows one after the other: each search parallelises inside, and at::mean must not run inside
  // a parallel region (its summation order would change for long rows).
  for (int64_t r = 0; r < h.rows; ++r)
    o[r] = modelopt_mse_row(h.row(r), h.bins, e + r * estride, num_bits, is_unsigned, stride, start_bin, kern);
  return out;
}

// ModelOpt's percentile: cdf = cumsum(counts / total) (float64, in order), the first bin whose
// cdf reaches percentile / 100 (searchsorted, left), and that bin's LOWER edge.
at::Tensor modelopt_amax_percentile_cpu(const at::Tensor& hist, const at::Tensor& bin_edges, double percentile) {
  const char* op = "modelopt_amax_percentile";
  TORCH_CHECK_VALUE(percentile >= 0 && percentile <= 100, "calibfast::", op,
                    ": percentile must be in [0, 100], got ", percentile);
  const Hist h = load_hist(hist, op);
  const at::Tensor edges = load_edges(bin_edges, h, op, true);
  at::Tensor out = make_result(h);
  const double* e = edges.const_data_ptr<double>();
  const int64_t estride = edges.size(0) == 1 ? 0 : h.bins + 1;
  const double target = percentile / 100;
  for_rows(h, out.data_ptr<float>(), [&](int64_t r) {
    const double* c = h.row(r);
    double total = 0;
    for (int64_t j = 0; j < h.bins; ++j) total += c[j];
    double cdf = 0;
    int64_t idx = h.bins;
    for (int64_t j = 0; j < h.bins; ++j) {
      cdf += c[j] / total;
      if (cdf >= target) {
        idx = j;
        break;
      }
    }
    return static_cast<float>(e[r * estride + idx]);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace calibfast

TORCH_LIBRARY_IMPL(calibfast, CPU, m) {
  m.impl("hist_amax_percentile", &calibfast::cpu::hist_amax_percentile_cpu);
  m.impl("hist_amax_mse", &calibfast::cpu::hist_amax_mse_cpu);
  m.impl("hist_amax_entropy", &calibfast::cpu::hist_amax_entropy_cpu);
  m.impl("modelopt_amax_percentile", &calibfast::cpu::modelopt_amax_percentile_cpu);
  m.impl("modelopt_amax_mse", &calibfast::cpu::modelopt_amax_mse_cpu);
  m.impl("modelopt_amax_entropy", &calibfast::cpu::modelopt_amax_entropy_cpu);
}
