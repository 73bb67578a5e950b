// The inner loops of the mse searches (hist_amax.cpp). This file is included several times by
// hist_amax.cpp, each time inside its own namespace under a different `#pragma GCC target`
// (baseline x86-64, AVX2, AVX-512); the variant matching calibfast.cpu_capability() runs.
// The loops are branch-free so that GCC vectorises them; `omp simd reduction` lets it reorder the
// float64 sums (and nothing else: every other operation is the exact IEEE operation, with
// contraction into FMA off for the whole of hist_amax.cpp).

// The squared rounding error of the values of [lo, hi) (lo <= hi) spread uniformly, on the grid
// q * min(round(y / q), cap) (inv = 1 / q): the integral of (y - q(y))^2 over [lo, hi). Cells of
// the grid are [(m - 1/2) q, (m + 1/2) q), the top one (m = cap) unbounded: the clipped values.
// Both ends in one cell: ((hi - c)^3 - (lo - c)^3) / 3; otherwise the two partial cells plus
// q^3 / 12 for each full cell between them.
static inline double cell_sq(double lo, double hi, double q, double inv, double cap) {
  double v1 = lo * inv;
  v1 = v1 < cap ? v1 : cap;
  const double m1 = (v1 + 0x1p52) - 0x1p52;  // round half to even (0 <= v < 2^52)
  double v2 = hi * inv;
  v2 = v2 < cap ? v2 : cap;
  const double m2 = (v2 + 0x1p52) - 0x1p52;
  const double h = 0.5 * q;
  const double h3 = h * h * h;
  const double d1 = lo - m1 * q;
  const double d2 = hi - m2 * q;
  const double e1 = hi - m1 * q;
  const double single = (e1 * e1 * e1 - d1 * d1 * d1) / 3.0;
  const double multi = (h3 - d1 * d1 * d1) / 3.0 + (m2 - m1 - 1.0) * (q * q * q / 12.0) + (d2 * d2 * d2 + h3) / 3.0;
  return m1 == m2 ? single : multi;
}

// Sum over bins p < m (lower edges lo[p], width w, density nw[p] = count / w) of the squared
// error on an integer grid of `cap` steps of q over [0, amax].
static inline double mse_int_sum(const double* __restrict__ lo, const double* __restrict__ nw, int64_t m, double w,
                                 double q, double inv, double cap) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t p = 0; p < m; ++p) acc += nw[p] * cell_sq(lo[p], lo[p] + w, q, inv, cap);
  return acc;
}

inline double pow2(int e) { return std::bit_cast<double>(static_cast<uint64_t>(e + 1023) << 52); }

// The binade of y > 0 for the fp8 grid: floor(log2 y) clamped to [emin, emax] (below 2^emin the
// subnormals share the quantum of the first binade; from 2^emax on the top binade's grid, clipped
// at fmax, goes on).
inline int fp8_binade(double y, int emin, int emax) {
  int e = static_cast<int>((std::bit_cast<uint64_t>(y) >> 52) & 0x7ff) - 1023;
  e = e < emin ? emin : e;
  return e > emax ? emax : e;
}

// The same on the fp8 grid, in the scaled domain y = x * S (S = fmax / amax): quantum
// 2^(binade - mant), clipped at fmax. A bin [j, j+1) * w with j >= 1 spans at most two binades
// (hi / lo <= 2), split at the upper one's start. Returns the integral in y units (the caller
// divides by S^3).
static inline double mse_fp8_sum(const double* __restrict__ lo, const double* __restrict__ nw, int64_t m, double w,
                                 double S, int mant, int emin, int emax, double fmax) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t p = 0; p < m; ++p) {
    const double ylo = lo[p] * S;
    const double yhi = (lo[p] + w) * S;
    const int e1 = fp8_binade(ylo, emin, emax);
    const int e2 = fp8_binade(yhi, emin, emax);
    double t = pow2(e2);
    t = t < ylo ? ylo : t;
    t = t > yhi ? yhi : t;
    const double q1 = pow2(e1 - mant);
    const double q2 = pow2(e2 - mant);
    const double i1 = pow2(mant - e1);
    const double i2 = pow2(mant - e2);
    acc += nw[p] * (cell_sq(ylo, t, q1, i1, fmax * i1) + cell_sq(t, yhi, q2, i2, fmax * i2));
  }
  return acc;
}

// ModelOpt's per-bin mse terms for one candidate, in float32 with its operations:
//   t_j = (clamp(round(x_j * s), 0, mb) / s - x_j)^2 * c_j
// (round half to even; clamp(round(v)) == round(clamp(v)) for v >= 0 and integer mb <= 2^16).
// kStore: write the terms to out (for torch's own mean); returns their float64 sum either way.
template <bool kStore>
static inline double modelopt_mse_terms(const float* __restrict__ x, const float* __restrict__ c, int64_t B,
                                        float s, float mb, float* __restrict__ out) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < B; ++j) {
    float v = x[j] * s;
    v = v < mb ? v : mb;
    v = (v + 0x1p23f) - 0x1p23f;
    const float d = v / s - x[j];
    const float t = d * d * c[j];
    if constexpr (kStore) out[j] = t;
    acc += static_cast<double>(t);
  }
  return acc;
}
