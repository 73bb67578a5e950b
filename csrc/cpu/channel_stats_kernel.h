// The CPU kernels of channel_stats_update. This file is included several times by
// channel_stats.cpp, each time inside its own namespace under a different `#pragma GCC target`
// (baseline x86-64, AVX2+FMA+F16C, AVX-512), and the best variant the processor supports is chosen
// once at run time. The loops are written so that GCC vectorises them (check with
// -fopt-info-vec): no branches in the hot loops, restrict pointers, fixed-width lane arrays.
//
// Hot path: values are assumed finite and folded into fresh chunk accumulators with plain
// compare/select and add; a NaN or +-Inf anywhere in a chunk makes that chunk's sum of |x|
// non-finite, which one check per chunk and channel notices. That channel's part of the chunk is
// thrown away and redone by the masked scalar path, which also counts the non-finite values. So
// finite data pays nothing for NaN/Inf handling, and data with non-finite values is still exact
// (only slower, on the chunk channels that hold them).
//
// Sums: each chunk sums at most kChunk values per channel (or per lane) in the accumulation type
// (float for 16/32-bit inputs), then adds the chunk sum into float64. The relative error of a
// chunk sum is at most about kChunk * 2^-24 (in practice ~sqrt(kChunk) * 2^-24); beyond a chunk,
// float64 carries 2^-53 per addition, so 10^9 values lose nothing that matters. A chunk whose
// float partial sums overflow (finite values near FLT_MAX) or whose sum of squares is so small that
// float underflow would cost precision (|x| below ~2^-51 throughout) is redone in float64 like a
// chunk with non-finite values (see chunk_bad); only the channels concerned are redone.

// Expects channel_stats.cpp to have defined before it: kChunk, kLanes, the Load* structs, Slot.

// One input value in the accumulation type: Ld::load, except float16 in the variants with F16C,
// where one vcvtsh2ss (_cvtsh_ss, exact like LoadF16::load) replaces the branch-free bit
// conversion's ~15 operations. The vectorised unit-stride paths widen 8 values at a time instead;
// this serves the strided ones (float16 with a non-unit channel stride took ~8x float32's time
// per value: session 10) and the scalar tails.
template <class Ld>
static inline typename Ld::acc_t load1(typename Ld::in_t x) {
#if CALIBFAST_VECTOR_VARIANT && CALIBFAST_F16C
  if constexpr (std::is_same<Ld, LoadF16>::value) return _cvtsh_ss(x);
#endif
  return Ld::load(x);
}

// Folds the chunk accumulators of n channels into running state. A function of its own with
// restrict parameters: written inline on the slot's members, GCC 12 did not vectorise the loop
// ("no vectype"), and this scalar fold took a sixth of the time of the statistics for C = 384.
template <typename acc_t>
static inline void fold_arrays(int64_t n, acc_t* __restrict__ mn, acc_t* __restrict__ mx, acc_t* __restrict__ amn,
                               double* __restrict__ sum, double* __restrict__ sabs, double* __restrict__ ssq,
                               const acc_t* __restrict__ cmn, const acc_t* __restrict__ cmx,
                               const acc_t* __restrict__ camn, const acc_t* __restrict__ csum,
                               const acc_t* __restrict__ csabs, const acc_t* __restrict__ cssq) {
  for (int64_t c = 0; c < n; ++c) {
    mn[c] = cmn[c] < mn[c] ? cmn[c] : mn[c];
    mx[c] = cmx[c] > mx[c] ? cmx[c] : mx[c];
    amn[c] = camn[c] < amn[c] ? camn[c] : amn[c];
    sum[c] += static_cast<double>(csum[c]);
    sabs[c] += static_cast<double>(csabs[c]);
    ssq[c] += static_cast<double>(cssq[c]);
  }
}

// Reduces n partial accumulators (min, max, abs-min; float sums added in float64) into channel k
// of the slot: a run's lanes, or one channel's group of virtual channels.
template <typename acc_t>
static inline void reduce_into(const Slot<acc_t>& s, int64_t k, int64_t n, const acc_t* mn, const acc_t* mx,
                               const acc_t* amn, const acc_t* sm, const acc_t* sa, const acc_t* sq) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t rmn = inf, rmx = -inf, ramn = inf;
  double rs = 0, rsa = 0, rsq = 0;
  for (int64_t l = 0; l < n; ++l) {
    rmn = mn[l] < rmn ? mn[l] : rmn;
    rmx = mx[l] > rmx ? mx[l] : rmx;
    ramn = amn[l] < ramn ? amn[l] : ramn;
    rs += static_cast<double>(sm[l]);
    rsa += static_cast<double>(sa[l]);
    rsq += static_cast<double>(sq[l]);
  }
  s.mn[k] = rmn < s.mn[k] ? rmn : s.mn[k];
  s.mx[k] = rmx > s.mx[k] ? rmx : s.mx[k];
  s.amn[k] = ramn < s.amn[k] ? ramn : s.amn[k];
  s.sum[k] += rs;
  s.sabs[k] += rsa;
  s.ssq[k] += rsq;
}

template <typename acc_t>
static inline void fold_chunk(const Slot<acc_t>& s, int64_t c0, int64_t n, const acc_t* cmn, const acc_t* cmx,
                              const acc_t* camn, const acc_t* csum, const acc_t* csabs, const acc_t* cssq) {
  if (s.group == 1) {
    fold_arrays(n, s.mn + c0, s.mx + c0, s.amn + c0, s.sum + c0, s.sabs + c0, s.ssq + c0, cmn, cmx, camn, csum,
                csabs, cssq);
    return;
  }
  // Virtual channels c0 .. c0 + n - 1 (s.group of them a channel, possibly a partial group at
  // either end): each group reduced into its channel.
  for (int64_t v = 0; v < n;) {
    const int64_t k = (c0 + v) / s.group;
    const int64_t end = std::min(n, (k + 1) * s.group - c0);
    reduce_into(s, k, end - v, cmn + v, cmx + v, camn + v, csum + v, csabs + v, cssq + v);
    v = end;
  }
}

// Whether a chunk's float partial sums of one channel (or lane) cannot be kept, so that its values
// are redone by the masked float64 path (row_slow):
//   - sum |x| not finite: a NaN or +-Inf among the values (sum |x| >= |sum x|, so it covers sum x);
//   - sum x^2 not finite: it overflowed on huge finite values (|x|^2 beyond FLT_MAX);
//   - sum x^2 below tiny_sq while sum |x| is not zero: the squares of values below ~2^-63 fall into
//     float's subnormal range (2^-149 resolution) or to zero (|x| < ~1e-23), losing precision the
//     float64 reference keeps. Above tiny_sq = FLT_MIN * 2^24, the subnormal rounding of kChunk
//     squares costs at most kChunk * 2^-150 / tiny_sq = 2^-42 of the sum: far below float's own.
template <typename acc_t>
constexpr acc_t tiny_sq() {
  return std::numeric_limits<acc_t>::min() * static_cast<acc_t>(16777216.0);
}

template <typename acc_t>
static inline int chunk_bad(acc_t sabs, acc_t sq) {
  return ((sabs - sabs) != (sabs - sabs)) | ((sq - sq) != (sq - sq)) | ((sq < tiny_sq<acc_t>()) & (sabs > 0));
}

template <typename acc_t>
static inline void init_chunk(int64_t n, acc_t* __restrict__ cmn, acc_t* __restrict__ cmx,
                              acc_t* __restrict__ camn, acc_t* __restrict__ csum, acc_t* __restrict__ csabs,
                              acc_t* __restrict__ cssq) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    cmn[c] = inf;
    cmx[c] = -inf;
    camn[c] = inf;
    csum[c] = 0;
    csabs[c] = 0;
    cssq[c] = 0;
  }
}

// ---- histograms ------------------------------------------------------------------------------

// Bin indices of n values (stride cs) for the global histogram: floor(|x| * scale) when |x| >= lo
// and the result is < B; B for a finite value not binned (beyond the range, or below lo); -1 for
// NaN and Inf. Returns whether some index is B: a finite value was left out. Written without
// undefined float->int conversions so that it vectorises (NaN * scale and Inf * scale become B
// through the min, then -1), the result tracked as a running maximum: 8 vector ops per 8 values
// where session 6's loop had 13 (a third of the histogram's time under perf).
template <class Ld, bool kUnit>
static inline int32_t bin_indices_impl(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t cs,
                                  typename Ld::acc_t scale, typename Ld::acc_t lo, int64_t B,
                                  int32_t* __restrict__ out) {
  using acc_t = typename Ld::acc_t;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t Bf = static_cast<acc_t>(B);
  const int32_t Bi = static_cast<int32_t>(B);
  int32_t top = 0;
  // Two instantiations of one loop: with the lower bound (a second pass: what lies below lo was
  // binned by the first), and without it (two vector ops fewer per 8 values).
  auto bin = [&](auto with_lo) {
    for (int64_t c = 0; c < n; ++c) {
      const acc_t a = std::fabs(load1<Ld>(p[kUnit ? c : c * cs]));
      acc_t f = a * scale;
      f = f < Bf ? f : Bf;
      int32_t i = static_cast<int32_t>(f);
      if constexpr (decltype(with_lo)::value) i = a >= lo ? i : Bi;
      i = a < inf ? i : -1;
      out[c] = i;
      top = i > top ? i : top;
    }
  };
  if (lo > 0) {
    bin(std::true_type{});
  } else {
    bin(std::false_type{});
  }
  return top >= Bi;
}

// Values beyond the global histogram's range during a pass whose range may still grow (s.ovf set):
// the finite |x| >= s.ovf_at of n values (stride cs) are kept in this thread's buffer, to be
// binned once the call's final range is known, instead of reading the whole input again. Called
// only when bin_indices reported a finite value left out (rare outside a growing range; NaN and
// Inf do not count), and only until the thread has met more than s.ovf_cap of them (the call then
// makes the second pass: see wants_beyond).
template <typename acc_t>
static inline bool wants_beyond(const Slot<acc_t>& s) {
  return s.ovf != nullptr && *s.ovf_n <= s.ovf_cap;
}

template <typename acc_t>
static inline bool wants_channel_beyond(const Slot<acc_t>& s) {
  return s.covf_c != nullptr && *s.covf_n <= s.covf_cap;
}

template <class Ld, bool kUnit>
static inline void keep_beyond(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t cs,
                               const Slot<typename Ld::acc_t>& s) {
  using acc_t = typename Ld::acc_t;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    const acc_t a = std::fabs(load1<Ld>(p[kUnit ? c : c * cs]));
    if (a >= s.ovf_at && a < inf) {
      if (*s.ovf_n < s.ovf_cap) s.ovf[*s.ovf_n] = a;
      *s.ovf_n += 1;
    }
  }
}

// Same, with a scale and lower bound per channel (channel c0 + c); the same indices (-1 .. N) and
// return value.
template <class Ld, bool kUnit>
static inline int32_t channel_bin_indices_impl(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t cs,
                                          const typename Ld::acc_t* __restrict__ scale,
                                          const typename Ld::acc_t* __restrict__ lo, int64_t N,
                                          int32_t* __restrict__ out) {
  using acc_t = typename Ld::acc_t;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t Nf = static_cast<acc_t>(N);
  const int32_t Ni = static_cast<int32_t>(N);
  int32_t top = 0;
  for (int64_t c = 0; c < n; ++c) {
    const acc_t a = std::fabs(load1<Ld>(p[kUnit ? c : c * cs]));
    acc_t f = a * scale[c];
    f = f < Nf ? f : Nf;
    int32_t i = a >= lo[c] ? static_cast<int32_t>(f) : Ni;
    i = a < inf ? i : -1;
    out[c] = i;
    top = i > top ? i : top;
  }
  return top >= Ni;
}

// float16 input (unit stride, F16C): widened 256 values at a time by vcvtph2ps, then binned as
// float32 -- the same bins (the widening is exact), where LoadF16's branch-free conversion, poorly
// vectorised, made float16 histograms ~4x float32's (session 8).
#if CALIBFAST_VECTOR_VARIANT && CALIBFAST_F16C
static inline void widen_halves(const uint16_t* __restrict__ p, int64_t n, float* __restrict__ out) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c))));
  for (; c < n; ++c) out[c] = LoadF16::load(p[c]);
}

// bin(values, count, offset) on n float16 values widened 256 at a time; ORs what it returns.
template <class Bin>
static inline int32_t on_widened(const uint16_t* p, int64_t n, Bin bin) {
  float buf[256];
  int32_t left_out = 0;
  for (int64_t c0 = 0; c0 < n; c0 += 256) {
    const int64_t m = std::min<int64_t>(256, n - c0);
    widen_halves(p + c0, m, buf);
    left_out |= bin(buf, m, c0);
  }
  return left_out;
}
#endif

template <class Ld, bool kUnit>
static inline int32_t bin_indices(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t cs,
                                  typename Ld::acc_t scale, typename Ld::acc_t lo, int64_t B,
                                  int32_t* __restrict__ out) {
#if CALIBFAST_VECTOR_VARIANT && CALIBFAST_F16C
  if constexpr (kUnit && std::is_same<Ld, LoadF16>::value) {
    return on_widened(p, n, [&](const float* b, int64_t m, int64_t c0) {
      return bin_indices_impl<LoadF32, true>(b, m, 1, scale, lo, B, out + c0);
    });
  }
#endif
  return bin_indices_impl<Ld, kUnit>(p, n, cs, scale, lo, B, out);
}

template <class Ld, bool kUnit>
static inline int32_t channel_bin_indices(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t cs,
                                          const typename Ld::acc_t* __restrict__ scale,
                                          const typename Ld::acc_t* __restrict__ lo, int64_t N,
                                          int32_t* __restrict__ out) {
#if CALIBFAST_VECTOR_VARIANT && CALIBFAST_F16C
  if constexpr (kUnit && std::is_same<Ld, LoadF16>::value) {
    return on_widened(p, n, [&](const float* b, int64_t m, int64_t c0) {
      return channel_bin_indices_impl<LoadF32, true>(b, m, 1, scale + c0, lo + c0, N, out + c0);
    });
  }
#endif
  return channel_bin_indices_impl<Ld, kUnit>(p, n, cs, scale, lo, N, out);
}

// The per-channel counterpart of keep_beyond: the finite |x| >= s.covf_at[channel] of n values
// of channels c0 .. c0 + n - 1 (stride cs; c0 alone when kRun: a run of one channel), kept with
// their channel in this thread's buffer.
template <class Ld, bool kUnit, bool kRun>
static inline void keep_beyond_channels(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t cs, int64_t c0,
                                        const Slot<typename Ld::acc_t>& s) {
  using acc_t = typename Ld::acc_t;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    const int64_t k = kRun ? c0 : c0 + c;
    const acc_t a = std::fabs(load1<Ld>(p[kUnit ? c : c * cs]));
    if (a >= s.covf_at[k] && a < inf) {
      if (*s.covf_n < s.covf_cap) {
        s.covf_c[*s.covf_n] = k;
        s.covf_v[*s.covf_n] = a;
      }
      *s.covf_n += 1;
    }
  }
}

// Scatters bin indices (-1 .. B, as bin_indices writes them) into this thread's int32 counters:
// the global histogram is split into kSubHists interleaved copies (stride S = B + kHistPad) so
// that runs of equal bins do not serialise on one counter. Indices -1 and B (not binned) land in
// pads around the copies (Slots::slot: kHistPad counters before the first, kHistPad after each),
// which flush() never reads: no test per value. Two indices per 64-bit load: with one increment
// (a load and a store) per value, the loads of the indices were a third of the memory operations
// (session 7, v40).
//
// pf (optional): the next rows' values matching these n values, esize bytes each, prefetched into
// L2 over the loop (esize lines per 64 values). Without it the scatter, which loads nothing from
// memory, left the hardware prefetchers idle, and the next rows' statistics then waited on memory:
// that fold was ~45% of 8192 x 4096 float32 statistics + histogram under perf (1 thread, session 14).
static inline void scatter_global(const int32_t* __restrict__ idx, int64_t n, int64_t S, int32_t* __restrict__ sub,
                                  const char* pf = nullptr, int esize = 0) {
  static_assert(kSubHists == 2, "scatter_global interleaves two copies");
  static_assert(std::endian::native == std::endian::little, "two indices per 64-bit word, low one first");
  int32_t* __restrict__ sub2 = sub + S;  // (a base of its own: no add per index)
  auto eight = [&](int64_t at) __attribute__((always_inline)) {  // indices [at, at + 8)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      uint64_t w;
      std::memcpy(&w, idx + at + 2 * k, sizeof(w));
      sub[static_cast<int32_t>(static_cast<uint32_t>(w))] += 1;  // (signed: -1 is the pad before)
      sub2[static_cast<int32_t>(static_cast<uint32_t>(w >> 32))] += 1;
    }
  };
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    // one prefetch per line, spread over the loop (bursts of them stalled it: the fill buffers)
    if (pf != nullptr && ((c * esize) & 63) == 0) __builtin_prefetch(pf + c * esize, 0, 2);
    eight(c);
    eight(c + 8);
  }
  if (pf != nullptr)
    for (int64_t o = (c * esize + 63) / 64 * 64; o < n * esize; o += 64) __builtin_prefetch(pf + o, 0, 2);
  for (; c + 8 <= n; c += 8) eight(c);
  for (; c < n; ++c) sub[idx[c]] += 1;
}

// Table mode (16-bit inputs): counts the bit patterns of |x| of n values (stride cs), one
// increment each, alternating between the kSubHists copies of the pattern table. Contiguous
// values are read four at a time (one 64-bit load, shifts for the rest: fewer loads competing
// with the counters' loads and stores).
// pf (optional, with kUnit): the next rows' values matching these, prefetched into L2 as in
// scatter_global.
template <bool kUnit>
static inline void count_patterns(const uint16_t* __restrict__ p, int64_t n, int64_t cs, int32_t* __restrict__ tab,
                                  const char* pf = nullptr) {
  static_assert(kSubHists == 2, "count_patterns interleaves two copies");
  int64_t c = 0;
  if constexpr (kUnit && std::endian::native == std::endian::little) {
    auto four = [&](int64_t at) __attribute__((always_inline)) {  // values [at, at + 4)
      uint64_t w;
      std::memcpy(&w, p + at, sizeof(w));  // little-endian: value at in the low 16 bits
      tab[w & 0x7fffu] += 1;
      tab[kTab + ((w >> 16) & 0x7fffu)] += 1;
      tab[(w >> 32) & 0x7fffu] += 1;
      tab[kTab + ((w >> 48) & 0x7fffu)] += 1;
    };
    for (; c + 32 <= n; c += 32) {
      if (pf != nullptr) __builtin_prefetch(pf + 2 * c, 0, 2);
#pragma GCC unroll 8
      for (int k = 0; k < 32; k += 4) four(c + k);
    }
    if (pf != nullptr && c < n) __builtin_prefetch(pf + 2 * c, 0, 2);
    for (; c + 4 <= n; c += 4) four(c);
  }
  for (; c + 2 <= n; c += 2) {
    const uint32_t u0 = p[kUnit ? c : c * cs] & 0x7fffu;
    const uint32_t u1 = p[kUnit ? c + 1 : (c + 1) * cs] & 0x7fffu;
    tab[u0] += 1;
    tab[kTab + u1] += 1;
  }
  if (c < n) tab[p[kUnit ? c : c * cs] & 0x7fffu] += 1;
}

// Bins one row into the global histogram: channels [c0, c0 + n) at p (stride cs). next (optional,
// unit stride only): the same channels of a row the caller reads next, prefetched into L2 meanwhile.
template <class Ld, bool kUnit>
static inline void hist_row(const typename Ld::in_t* p, int64_t n, int64_t cs, const Slot<typename Ld::acc_t>& s,
                            const typename Ld::in_t* next = nullptr) {
  constexpr int kSize = sizeof(typename Ld::in_t);
  const char* pf = kUnit ? reinterpret_cast<const char*>(next) : nullptr;
  if constexpr (Ld::kTable) {
    if (s.table) {
      count_patterns<kUnit>(p, n, cs, s.hsub, pf);
      s.note_binned(n);
      return;
    }
  }
  for (int64_t c0 = 0; c0 < n; c0 += kIdxBlock) {
    const int64_t m = std::min(kIdxBlock, n - c0);
    const typename Ld::in_t* q = p + (kUnit ? c0 : c0 * cs);
    const int32_t left_out = bin_indices<Ld, kUnit>(q, m, cs, s.hscale, s.hlo, s.B, s.idx);
    scatter_global(s.idx, m, s.hstride, s.hsub, pf ? pf + c0 * kSize : nullptr, kSize);
    if (left_out && wants_beyond(s)) keep_beyond<Ld, kUnit>(q, m, cs, s);
  }
  s.note_binned(n);
}

// Bins R rows (pointers p[0..R)) of n channels into the global histogram. Short rows are binned
// together (one scatter loop for all of them) so that per-row overheads do not dominate.
// The scratch s.idx holds at least kChunk * kTileC = 8192 indices.
// next (optional): R rows the caller reads next, row i prefetched while row i is binned (unbatched).
template <class Ld, bool kUnit>
static inline void hist_rows(const typename Ld::in_t* const* p, int R, int64_t n, int64_t cs,
                             const Slot<typename Ld::acc_t>& s, const typename Ld::in_t* const* next = nullptr) {
  // (at most kIdxBlock indices: a larger batch would push the counters out of L1)
  bool batch = n * R <= kIdxBlock;
  if constexpr (Ld::kTable) batch = batch && !s.table;
  if (!batch) {
    for (int i = 0; i < R; ++i) hist_row<Ld, kUnit>(p[i], n, cs, s, next ? next[i] : nullptr);
    return;
  }
  int32_t left_out = 0;
  for (int i = 0; i < R; ++i) left_out |= bin_indices<Ld, kUnit>(p[i], n, cs, s.hscale, s.hlo, s.B, s.idx + i * n);
  scatter_global(s.idx, n * R, s.hstride, s.hsub);
  if (left_out && wants_beyond(s))
    for (int i = 0; i < R; ++i) keep_beyond<Ld, kUnit>(p[i], n, cs, s);
  s.note_binned(n * R);
}

// Increments K adjacent channels' histograms (stride S counters each, from h) with R rows of bin
// indices (row r at idx + r * kTileC; -1 and N: not binned, they land in the pads around each
// channel's N counters: no test per value).
template <int K>
static inline void channel_scatter(const int32_t* __restrict__ idx, int64_t R, int32_t* __restrict__ h, int64_t S) {
  for (int64_t r = 0; r < R; ++r) {
    const int32_t* ir = idx + r * kTileC;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) h[k * S + ir[k]] += 1;
  }
}

// Bins rows [r0, r1) (at most kChunk) x channels [c0, c0 + n) into the per-channel histograms,
// a tile of channels at a time: the tile's bin indices for all the rows first, then each
// channel's indices into its own histogram, which stays in L1 while it takes them.
template <class Ld, bool kUnit>
static void channel_hist_rows(const typename Ld::in_t* base, const calibfast::Layout& L, int64_t r0, int64_t r1,
                              int64_t c0, int64_t n, const Slot<typename Ld::acc_t>& s) {
  const int64_t cs = L.channel_stride;
  const int64_t R = r1 - r0;
  for (int64_t t0 = 0; t0 < n; t0 += kTileC) {
    const int64_t tn = std::min(kTileC, n - t0);
    const int64_t ca = c0 + t0;
    for (int64_t r = 0; r < R; ++r) {
      const auto* row = base + L.offsets(r0 + r) + ca * cs;
      const int32_t left_out =
          channel_bin_indices<Ld, kUnit>(row, tn, cs, s.cscale + ca, s.clo + ca, s.N, s.idx + r * kTileC);
      if (left_out && wants_channel_beyond(s)) keep_beyond_channels<Ld, kUnit, false>(row, tn, cs, ca, s);
    }
    // kInterleave channels at a time, their increments interleaved: one channel's values fall
    // in few bins, and back-to-back increments of one counter wait for each other (store to
    // load); independent streams keep the core busy meanwhile. The last tn % 8 one at a time.
    constexpr int kInterleave = 8;
    int64_t c = 0;
    for (; c + kInterleave <= tn; c += kInterleave)
      channel_scatter<kInterleave>(s.idx + c, R, s.csub + (ca + c) * s.cblock(), s.cblock());
    for (; c < tn; ++c) channel_scatter<1>(s.idx + c, R, s.csub + (ca + c) * s.cblock(), s.cblock());
    s.touched(ca, ca + tn);
  }
  s.note_binned(R * n);
}

// One row's per-channel bin indices (n channels, -1 .. N as channel_bin_indices writes them) as
// uint16 offsets into their tile's counters, biased by one: channel c's index i becomes
// (c % kCTile) * S + i + 1 (S: counters per channel; -1 and N, not binned, land in the pads
// around each channel's N counters; the bias makes -1 of the tile's first channel 0).
// A second loop over the int32 indices, not fused into the binning: fused, the running maximum
// was reduced across lanes once per tile.
static inline void tile_offsets(const int32_t* __restrict__ idx, int64_t n, int32_t S, uint16_t* __restrict__ out) {
  static_assert(kCTile == 16, "tile_offsets packs 16 channels into one 32-byte store");
  int64_t c0 = 0;
#if CALIBFAST_VECTOR_VARIANT && CALIBFAST_F16C
  // (GCC's own vectorisation of the loop below assembled the 16-bit words one at a time, with
  // store-forwarding stalls.) The offsets fit uint16 (N <= kTiledMaxN): the saturating pack is exact.
  const __m256i off_lo = _mm256_add_epi32(
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(S)), _mm256_set1_epi32(1));
  const __m256i off_hi = _mm256_add_epi32(off_lo, _mm256_set1_epi32(8 * S));
  for (; c0 + kCTile <= n; c0 += kCTile) {
    const __m256i a = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + c0)), off_lo);
    const __m256i b = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + c0 + 8)), off_hi);
    // packs interleaves 128-bit halves (a0-3 b0-3 a4-7 b4-7); the permute restores channel order
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c0), w);
  }
#endif
  for (; c0 < n; ++c0) out[c0] = static_cast<uint16_t>(idx[c0] + (c0 % kCTile) * S + 1);
}

// Adds m channels' counters (stride S, N bins each, from h) into their int64 histograms (out,
// N apart) and clears them and their pads (kHistPad before h and after each channel).
static inline void drain_tile(int32_t* __restrict__ h, int64_t m, int64_t S, int64_t N, int64_t* __restrict__ out) {
  for (int64_t j = 0; j < m; ++j) {
    const int32_t* __restrict__ hj = h + j * S;
    int64_t* __restrict__ o = out + j * N;
    for (int64_t i = 0; i < N; ++i) o[i] += hj[i];
  }
  std::memset(h - kHistPad, 0, sizeof(int32_t) * (kHistPad + m * S));
}

// Per-channel histograms of rows x channels [c0, c0 + n) for N <= kTiledMaxN, binned in two steps
// so that the counters stay in L1 while they are incremented: add() writes the rows' bin indices
// (as tile offsets, one row after another: sequential stores) while the rows are still in cache
// from the statistics; scatter() then takes the buffered rows a tile of kCTile channels at a
// time (kCTile x (N + kHistPad) int32 counters: 17 KB for 256 bins), prefetching the next tile's
// counters. Session 9: binned a chunk of 64 rows at a time straight into all C channels' counters
// (C = 4096: 4.4 MB per thread, from L3), each channel's counters were fetched for 64 increments.
template <class Ld, bool kUnit>
struct ChannelTiles {
  using in_t = typename Ld::in_t;
  const in_t* base;
  const calibfast::Layout& L;
  int64_t c0, n;
  const Slot<typename Ld::acc_t>& s;
  int64_t width;  // buffer entries per row: tile_row_width(n)
  int64_t cap;    // rows the buffer holds (at least 8)
  int64_t held = 0;
  bool scattered = false;  // scatter() ran (with rows held) since construction

  ChannelTiles(const in_t* base_, const calibfast::Layout& L_, int64_t c0_, int64_t n_,
               const Slot<typename Ld::acc_t>& s_)
      : base(base_), L(L_), c0(c0_), n(n_), s(s_) {
    width = tile_row_width(n);
    cap = s.cidx_len / width;
    TORCH_INTERNAL_ASSERT(cap >= 1, "calibfast: per-channel index buffer of ", s.cidx_len, " for ", n, " channels");
  }

  void add(int64_t r0, int64_t r1) {
    const int64_t cs = L.channel_stride;
    const int32_t S = static_cast<int32_t>(s.cblock());
    for (int64_t r = r0; r < r1; ++r, ++held) {
      if (held == cap) scatter();
      const in_t* row = base + L.offsets(r) + c0 * cs;
      const int32_t left_out = channel_bin_indices<Ld, kUnit>(row, n, cs, s.cscale + c0, s.clo + c0, s.N, s.idx);
      tile_offsets(s.idx, n, S, s.cidx + held * width);
      if (left_out && wants_channel_beyond(s)) keep_beyond_channels<Ld, kUnit, false>(row, n, cs, c0, s);
    }
  }

  // Scatters the buffered rows. last: the task has no more rows for these channels. When this
  // is the task's only scatter and no other task bins its channels (Slot::own_channels), each
  // tile's counters are complete once scattered: they are added into the op's state right away,
  // from L1, and cleared, and every tile reuses the first tile's counters. Otherwise each channel's
  // counters wait for the flush, which reads them back from memory: with few rows and many channels
  // (256 x 65536, 2 threads) that read was a quarter of the call.
  void scatter(bool last = false) {
    if (held == 0) return;
    static_assert(std::endian::native == std::endian::little, "four indices per 64-bit word, low one first");
    const int64_t S = s.cblock();
    const int64_t rows = held, w = width;  // (locals: the stores to h may alias the members)
    const bool direct = last && !scattered && s.own_channels;
    scattered = true;
    for (int64_t t0 = 0; t0 < n; t0 += kCTile) {
      const uint16_t* __restrict__ ix = s.cidx + t0;
      int32_t* __restrict__ h = s.csub + (direct ? c0 : c0 + t0) * S;
      int32_t* __restrict__ hb = h - 1;  // (the offsets' bias)
      const int64_t m = std::min(kCTile, n - t0);
      if (m < kCTile) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < m; ++j) hb[ix[r * w + j]] += 1;
        if (direct) drain_tile(h, m, S, s.N, s.chist_out + (c0 + t0) * s.N);
        continue;
      }
      // the next tile's counters, fetched from L3 while this tile's increments run (the
      // increments' own loads would miss one at a time); direct: the same counters again
      const char* next = reinterpret_cast<const char*>(h + kCTile * S);
      const int64_t next_lines = t0 + kCTile < n && !direct ? kCTile * S * int64_t(sizeof(int32_t)) / 64 : 0;
      const int64_t per_row = (next_lines + rows - 1) / rows;  // lines prefetched a row
      int64_t line = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < per_row && line < next_lines; ++k) __builtin_prefetch(next + 64 * line++, 1, 3);
        const uint16_t* ir = ix + r * w;
        // the kCTile channels' increments interleaved: one channel's values fall in few bins, and
        // back-to-back increments of one counter would wait for each other
#pragma GCC unroll 4
        for (int k = 0; k < kCTile / 4; ++k) {
          uint64_t v;
          std::memcpy(&v, ir + 4 * k, sizeof(v));
          hb[v & 0xffff] += 1;
          hb[(v >> 16) & 0xffff] += 1;
          hb[(v >> 32) & 0xffff] += 1;
          hb[v >> 48] += 1;
        }
      }
      if (direct) drain_tile(h, kCTile, S, s.N, s.chist_out + (c0 + t0) * s.N);
    }
    if (!direct) s.touched(c0, c0 + n);
    s.note_binned(held * n);
    held = 0;
  }
};

// Bins a contiguous run of n values of channel k.
template <class Ld>
static inline void hist_run(const typename Ld::in_t* p, int64_t n, int64_t k, const Slot<typename Ld::acc_t>& s) {
  if (s.B) {
    bool done = false;
    if constexpr (Ld::kTable) {
      if (s.table) {
        count_patterns<true>(p, n, 1, s.hsub);
        done = true;
      }
    }
    if (!done) {
      const int32_t left_out = bin_indices<Ld, true>(p, n, 1, s.hscale, s.hlo, s.B, s.idx);
      scatter_global(s.idx, n, s.hstride, s.hsub);
      if (left_out && wants_beyond(s)) keep_beyond<Ld, true>(p, n, 1, s);
    }
  }
  if (s.N) {
    const int32_t left_out = bin_indices<Ld, true>(p, n, 1, s.cscale[k], s.clo[k], s.N, s.idx);
    if (left_out && wants_channel_beyond(s)) keep_beyond_channels<Ld, true, true>(p, n, 1, k, s);
    int32_t* h = s.csub + k * s.cblock();  // (-1 and N land in the pads)
    s.touched(k, k + 1);
    if (s.ccopies == 2) {
      scatter_global(s.idx, n, s.cstride(), h);  // alternating between the channel's two copies
    } else {
      for (int64_t j = 0; j < n; ++j) h[s.idx[j]] += 1;
    }
  }
  s.note_binned(n);
}

// One value v (a = |v|) into min, max, abs-min and the three sums: the fold every fast path
// shares (scalars, or GCC vector types in rows_pairs), so that they agree value by value.
template <typename T>
static inline __attribute__((always_inline)) void fold_value(T v, T a, T& mn, T& mx, T& amn, T& s, T& sa, T& sq) {
  mn = v < mn ? v : mn;
  mx = v > mx ? v : mx;
  amn = a < amn ? a : amn;
  s += v;
  sa += a;
  sq += v * v;
}

// ---- row kernels: rows of channels, unit or constant channel stride --------------------------

// Folds R rows (pointers p[0..R)) over channels [0, n) into the chunk accumulators, assuming
// finite values. A NaN or +-Inf makes the chunk's sum |x| non-finite, which the caller checks.
template <class Ld, int R, bool kUnit>
static inline void rows_fast(const typename Ld::in_t* const* p, int64_t n, int64_t cs,
                             typename Ld::acc_t* __restrict__ cmn, typename Ld::acc_t* __restrict__ cmx,
                             typename Ld::acc_t* __restrict__ camn, typename Ld::acc_t* __restrict__ csum,
                             typename Ld::acc_t* __restrict__ csabs, typename Ld::acc_t* __restrict__ cssq) {
  using acc_t = typename Ld::acc_t;
  using in_t = typename Ld::in_t;
  const in_t* __restrict__ q[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) q[i] = p[i < R ? i : 0];
  for (int64_t c = 0; c < n; ++c) {
    const int64_t o = kUnit ? c : c * cs;
    acc_t mn = cmn[c], mx = cmx[c], amn = camn[c], s = csum[c], sa = csabs[c], sq = cssq[c];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const acc_t v = load1<Ld>(q[i][o]);
      fold_value(v, std::fabs(v), mn, mx, amn, s, sa, sq);
    }
    cmn[c] = mn;
    cmx[c] = mx;
    camn[c] = amn;
    csum[c] = s;
    csabs[c] = sa;
    cssq[c] = sq;
  }
}

#if CALIBFAST_VECTOR_VARIANT
// bfloat16 rows, 16 channels per step, in GCC vector types (only in the AVX2 / AVX-512 variants:
// the baseline one would lower them to scalars). The generic rows_fast, vectorised by the
// compiler, widens 16 bfloat16 values with an extract and two zero-extensions, and its 12
// accumulator registers for 16 channels spilled to the stack (session 8: perf). Here one 32-byte
// load of 16 channels is read as 8 pairs: (u << 16) is the even channels' floats and
// (u & 0xffff0000) the odd ones' -- one integer op per 8 values -- and each half is folded on its
// own (6 accumulators live). The chunk accumulators of a 16-channel block then hold the even
// channels first and the odd ones after (pair order); unpair() restores channel order once per
// chunk, before anything reads them. Same operations in the same order per value as rows_fast:
// the results are identical.
typedef float cf_vf8 __attribute__((vector_size(32)));
typedef uint32_t cf_vu8 __attribute__((vector_size(32)));
typedef int32_t cf_vi8 __attribute__((vector_size(32)));
// Elements of (a, b) picked by index (0-7 from a, 8-15 from b), in either compiler's spelling
// (GCC's takes the indices as a vector of type I, as wide as a).
#if defined(__clang__)
#define CF_SHUF_I(I, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CF_SHUF_I(I, a, b, ...) __builtin_shuffle(a, b, I{__VA_ARGS__})
#endif
#define CF_SHUF(a, b, ...) CF_SHUF_I(cf_vi8, a, b, __VA_ARGS__)

static inline cf_vf8 cf_abs8(cf_vf8 v) { return reinterpret_cast<cf_vf8>(reinterpret_cast<cf_vi8>(v) & 0x7fffffff); }

// The six accumulators (min, max, abs-min, sum, sum |x|, sum x^2) of a vector's channels or
// lanes (VF floats, VI the integers of the same width), held in vector registers while values are
// folded, loaded from and stored back to six float arrays.
template <class VF, class VI>
struct LanesV {
  static constexpr size_t kBytes = sizeof(VF);
  VF mn, mx, amn, sm, sa, sq;
  inline void load(const float* cmn, const float* cmx, const float* camn, const float* csum, const float* csabs,
                   const float* cssq, int64_t o) {
    std::memcpy(&mn, cmn + o, kBytes);
    std::memcpy(&mx, cmx + o, kBytes);
    std::memcpy(&amn, camn + o, kBytes);
    std::memcpy(&sm, csum + o, kBytes);
    std::memcpy(&sa, csabs + o, kBytes);
    std::memcpy(&sq, cssq + o, kBytes);
  }
  inline void store(float* cmn, float* cmx, float* camn, float* csum, float* csabs, float* cssq, int64_t o) const {
    std::memcpy(cmn + o, &mn, kBytes);
    std::memcpy(cmx + o, &mx, kBytes);
    std::memcpy(camn + o, &amn, kBytes);
    std::memcpy(csum + o, &sm, kBytes);
    std::memcpy(csabs + o, &sa, kBytes);
    std::memcpy(cssq + o, &sq, kBytes);
  }
  inline __attribute__((always_inline)) void fold(VF v) {
    const VF a = reinterpret_cast<VF>(reinterpret_cast<VI>(v) & 0x7fffffff);
    // fold_value's selects spelled as vminps / vmaxps, whose semantics they are (the first operand
    // when it compares less / greater, else the second; NaN included). Left to itself, GCC made the
    // abs-min in the AVX-512 variant a compare into a mask register and a masked AND: a chain of
    // two instructions per row, which held the bfloat16 and float16 statistics back (session 16).
    static_assert(sizeof(VF) == 32 || sizeof(VF) == 64, "LanesV: 8 or 16 float lanes");
#if CALIBFAST_WIDE_VECTORS
    if constexpr (sizeof(VF) == 64) {
      // (the merge-masked form with every lane on, which compiles to the plain instruction: the
      // plain intrinsic's undefined source vector made GCC warn inside its header)
      const __m512 v5 = reinterpret_cast<__m512>(v), a5 = reinterpret_cast<__m512>(a);
      mn = reinterpret_cast<VF>(_mm512_mask_min_ps(v5, 0xffff, v5, reinterpret_cast<__m512>(mn)));
      mx = reinterpret_cast<VF>(_mm512_mask_max_ps(v5, 0xffff, v5, reinterpret_cast<__m512>(mx)));
      amn = reinterpret_cast<VF>(_mm512_mask_min_ps(a5, 0xffff, a5, reinterpret_cast<__m512>(amn)));
    }
#endif
    if constexpr (sizeof(VF) == 32) {
      mn = reinterpret_cast<VF>(_mm256_min_ps(reinterpret_cast<__m256>(v), reinterpret_cast<__m256>(mn)));
      mx = reinterpret_cast<VF>(_mm256_max_ps(reinterpret_cast<__m256>(v), reinterpret_cast<__m256>(mx)));
      amn = reinterpret_cast<VF>(_mm256_min_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(amn)));
    }
    sm += v;
    sa += a;
    sq += v * v;
  }
};
using Lanes8 = LanesV<cf_vf8, cf_vi8>;

// Folds R rows of 8 channels (Lanes8; 16 with Lanes16) into the chunk accumulators at offset o:
// row i's values are load(i) (as floats). Shared by the bfloat16 and float16 row paths.
template <int R, class Load, class Lanes = Lanes8>
static inline void fold_rows8(Load load, int64_t o, float* __restrict__ cmn, float* __restrict__ cmx,
                              float* __restrict__ camn, float* __restrict__ csum, float* __restrict__ csabs,
                              float* __restrict__ cssq) {
  Lanes acc;
  acc.load(cmn, cmx, camn, csum, csabs, cssq, o);
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) acc.fold(load(i));
  acc.store(cmn, cmx, camn, csum, csabs, cssq, o);
}

// The even (kOdd = 0) or odd channels of 2 L at c (L = the lanes of Lanes), from loads of 2 L
// bfloat16 values read as L pairs.
template <int R, int kOdd, class VU = cf_vu8, class Lanes = Lanes8>
static inline void bf16_half(const uint16_t* const* q, int64_t c, float* cmn, float* cmx, float* camn,
                             float* csum, float* csabs, float* cssq) {
  constexpr int64_t L = sizeof(VU) / 4;
  const VU him = VU{} + 0xffff0000u;
  auto load = [&](int i) {
    VU u;
    std::memcpy(&u, q[i] + c, sizeof(VU));
    return reinterpret_cast<decltype(Lanes::mn)>(kOdd ? (u & him) : (u << 16));
  };
  fold_rows8<R, decltype(load), Lanes>(load, c + L * kOdd, cmn, cmx, camn, csum, csabs, cssq);
}

#if CALIBFAST_WIDE_VECTORS
// The AVX-512 variant reads bfloat16 rows 32 channels a step: one 64-byte load as 16 pairs, each
// half folded 16 lanes at a time (half the vector instructions of the 8-lane step; bfloat16
// statistics were compute-bound with it: 8192 x 4096 from L3 at ~2x the x.sum() floor, session 14).
// Pair order within a 32-channel block: the 16 even channels, then the 16 odd ones.
typedef float cf_vf16 __attribute__((vector_size(64)));
typedef uint32_t cf_vu16 __attribute__((vector_size(64)));
typedef int32_t cf_vi16 __attribute__((vector_size(64)));
#define CF_SHUF16(a, b, ...) CF_SHUF_I(cf_vi16, a, b, __VA_ARGS__)  // (0-15 from a, 16-31 from b)

using Lanes16 = LanesV<cf_vf16, cf_vi16>;
#endif

// Prefetches each of R rows at value offset o (one line of each; into L1).
template <int R, class T>
static inline __attribute__((always_inline)) void prefetch_rows(const T* const* p, int64_t o) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) __builtin_prefetch(p[i] + o, 0, 3);
}

// Folds R rows of channels [0, m) (m a multiple of 16) into the accumulators, in pair order:
// blocks of 32 channels first where the variant has them (CALIBFAST_WIDE_VECTORS), then of 16.
// unpair() walks the same blocks.
template <int R, bool kPf = false>
static inline void rows_pairs(const uint16_t* const* p, int64_t m, float* cmn, float* cmx, float* camn,
                              float* csum, float* csabs, float* cssq, int64_t pf_dist = 0) {
  int64_t c = 0;
#if CALIBFAST_WIDE_VECTORS
  for (; c + 32 <= m; c += 32) {
    if constexpr (kPf) prefetch_rows<R>(p, c + pf_dist);
    bf16_half<R, 0, cf_vu16, Lanes16>(p, c, cmn, cmx, camn, csum, csabs, cssq);
    bf16_half<R, 1, cf_vu16, Lanes16>(p, c, cmn, cmx, camn, csum, csabs, cssq);
  }
#endif
  for (; c < m; c += 16) {
    if constexpr (kPf) {
      if (c % 32 == 0) prefetch_rows<R>(p, c + pf_dist);
    }
    bf16_half<R, 0>(p, c, cmn, cmx, camn, csum, csabs, cssq);
    bf16_half<R, 1>(p, c, cmn, cmx, camn, csum, csabs, cssq);
  }
}

// float32 rows with unit channel stride, 16 channels a step (a 64-byte line of each row), each
// row's line pf_dist values ahead prefetched (only the large inputs: see rows_range); m a multiple
// of 16. The same operations in the same order per value as rows_fast.
template <int R>
static inline void rows_f32_pf(const float* const* p, int64_t m, float* cmn, float* cmx, float* camn, float* csum,
                               float* csabs, float* cssq, int64_t pf_dist) {
  for (int64_t c = 0; c < m; c += 16) {
    prefetch_rows<R>(p, c + pf_dist);
#if CALIBFAST_WIDE_VECTORS
    auto load16 = [&](int i) {
      cf_vf16 v;
      std::memcpy(&v, p[i] + c, 64);
      return v;
    };
    fold_rows8<R, decltype(load16), Lanes16>(load16, c, cmn, cmx, camn, csum, csabs, cssq);
#else
#pragma GCC unroll 2
    for (int h = 0; h < 16; h += 8)
      fold_rows8<R>(
          [&](int i) {
            cf_vf8 v;
            std::memcpy(&v, p[i] + c + h, 32);
            return v;
          },
          c + h, cmn, cmx, camn, csum, csabs, cssq);
#endif
  }
}

#if CALIBFAST_WIDE_VECTORS
// float32 rows, unit channel stride, with the global histogram (no lower bound): the statistics and
// the bin indices of 8 rows x 16 channels a step, then the increments of the previous step's 128
// indices, so that the fold's vector work of one step issues while the increments of the other
// (one store each: the store port is the bound) drain. Done phased (8 rows of statistics over all
// channels, then their histogram, as rows_range does otherwise), the two added up. The same
// statistics, in the same order per value, and the same bin indices as rows_fast / bin_indices_impl
// (floor(|x| * scale), B when that is not below B, -1 for NaN and Inf); returns whether an index
// was B (a finite value left out). m: a multiple of 16.
template <int R>
static inline int32_t rows_f32_hist(const float* const* p, int64_t m, float* cmn, float* cmx, float* camn,
                                    float* csum, float* csabs, float* cssq, float scale, int64_t B,
                                    int32_t* __restrict__ sub, int64_t S) {
  alignas(64) int32_t ring[2][R * 16];
  const __m512 sc = _mm512_set1_ps(scale), Bf = _mm512_set1_ps(static_cast<float>(B));
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512i none = _mm512_set1_epi32(-1), absmask = _mm512_set1_epi32(0x7fffffff);
  __m512i top = _mm512_setzero_si512();
  int cur = 0;
  for (int64_t c = 0; c < m; c += 16) {
    Lanes16 acc;
    acc.load(cmn, cmx, camn, csum, csabs, cssq, c);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      cf_vf16 v;
      std::memcpy(&v, p[i] + c, 64);
      acc.fold(v);
      const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(reinterpret_cast<__m512>(v)), absmask));
      const __m512 f = _mm512_mask_min_ps(a, 0xffff, _mm512_mul_ps(a, sc), Bf);  // (f < B ? f : B)
      __m512i b = _mm512_maskz_cvttps_epi32(0xffff, f);
      b = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(a, inf, _CMP_LT_OQ), none, b);  // NaN, Inf: -1
      top = _mm512_maskz_max_epi32(0xffff, top, b);
      _mm512_store_si512(ring[cur] + i * 16, b);
    }
    acc.store(cmn, cmx, camn, csum, csabs, cssq, c);
    if (c > 0) scatter_global(ring[cur ^ 1], R * 16, S, sub);
    cur ^= 1;
  }
  if (m > 0) scatter_global(ring[cur ^ 1], R * 16, S, sub);
  alignas(64) int32_t lanes[16];  // (_mm512_reduce_max_epi32's undefined vector made GCC warn)
  _mm512_store_si512(lanes, top);
  int32_t t = lanes[0];
  for (int l = 1; l < 16; ++l) t = lanes[l] > t ? lanes[l] : t;
  return t >= static_cast<int32_t>(B);
}
#endif

// Pair order -> channel order, for the first m (a multiple of 16) accumulators of each array:
// two vector loads, two interleaving shuffles and two stores per 16 channels.
static inline void unpair(int64_t m, float* const* arrays) {
  for (int k = 0; k < 6; ++k) {
    float* __restrict__ a = arrays[k];
    int64_t c = 0;
#if CALIBFAST_WIDE_VECTORS
    for (; c + 32 <= m; c += 32) {
      cf_vf16 e, o;
      std::memcpy(&e, a + c, 64);
      std::memcpy(&o, a + c + 16, 64);
      const cf_vf16 lo = CF_SHUF16(e, o, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const cf_vf16 hi = CF_SHUF16(e, o, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      std::memcpy(a + c, &lo, 64);
      std::memcpy(a + c + 16, &hi, 64);
    }
#endif
    for (; c < m; c += 16) {
      cf_vf8 e, o;
      std::memcpy(&e, a + c, 32);
      std::memcpy(&o, a + c + 8, 32);
      const cf_vf8 lo = CF_SHUF(e, o, 0, 8, 1, 9, 2, 10, 3, 11);
      const cf_vf8 hi = CF_SHUF(e, o, 4, 12, 5, 13, 6, 14, 7, 15);
      std::memcpy(a + c, &lo, 32);
      std::memcpy(a + c + 8, &hi, 32);
    }
  }
}
#if CALIBFAST_F16C
// 8 float16 values as floats: F16C's vcvtph2ps, exact like LoadF16::load (subnormals, Inf, NaN).
// The compiler vectorises LoadF16's branch-free conversion poorly: float16 statistics took ~7x
// bfloat16's time before (session 8: 8192 x 4096, 1 thread, 61-73 ms against 8.7).
static inline cf_vf8 load8_half(const uint16_t* q) {
  return reinterpret_cast<cf_vf8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

// 8 16-bit values cs apart, gathered into one vector.
static inline __m128i gather8_u16(const uint16_t* q, int64_t cs) {
  return _mm_setr_epi16(static_cast<short>(q[0]), static_cast<short>(q[cs]), static_cast<short>(q[2 * cs]),
                        static_cast<short>(q[3 * cs]), static_cast<short>(q[4 * cs]), static_cast<short>(q[5 * cs]),
                        static_cast<short>(q[6 * cs]), static_cast<short>(q[7 * cs]));
}

// 8 float16 values cs apart, as floats (gathered into one vector for one vcvtph2ps).
static inline cf_vf8 load8_half_strided(const uint16_t* q, int64_t cs) {
  return reinterpret_cast<cf_vf8>(_mm256_cvtph_ps(gather8_u16(q, cs)));
}

// 8 bfloat16 values cs apart, as floats: gathered, zero-extended and shifted (exact, like
// LoadBF16::load). The compiler's own loop for strided bfloat16 rows took ~3.4x the time of
// contiguous rows on x[:, ::2] (session 16, Zen 5), where float32 took 2.3x (twice the bytes read).
static inline cf_vf8 load8_bf16_strided(const uint16_t* q, int64_t cs) {
  return reinterpret_cast<cf_vf8>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(gather8_u16(q, cs)), 16));
}

// Folds R rows of float16 channels [0, m) (m a multiple of 8; channel stride cs, 1 when kUnit)
// into the accumulators, 8 channels a step (channel order). With a channel stride, one conversion
// per value (load1) left the loop scalar: ~1.4 ns a value against ~0.6 for float32 (session 10).
// The AVX-512 variant converts contiguous rows 16 values at a time first (vcvtph2ps to a zmm).
// bfloat16 with a channel stride (kUnit false) goes through the strided loop too, gathered by
// load8_bf16_strided (contiguous bfloat16 rows have rows_pairs).
template <int R, bool kUnit, bool kPf = false, bool kBF16 = false>
static inline void rows_halves(const uint16_t* const* q, int64_t m, int64_t cs, float* cmn, float* cmx,
                               float* camn, float* csum, float* csabs, float* cssq, int64_t pf_dist = 0) {
  static_assert(!(kBF16 && kUnit), "contiguous bfloat16 rows are folded by rows_pairs");
  int64_t c = 0;
#if CALIBFAST_WIDE_VECTORS
  if constexpr (kUnit) {
    for (; c + 16 <= m; c += 16) {
      if constexpr (kPf) {
        if (c % 32 == 0) prefetch_rows<R>(q, c + pf_dist);
      }
      // (the zero-masked form with every lane on: the plain one's undefined source vector made
      // GCC warn about an uninitialised variable inside its header)
      auto load16 = [&](int i) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[i] + c));
        return reinterpret_cast<cf_vf16>(_mm512_maskz_cvtph_ps(0xffff, h));
      };
      fold_rows8<R, decltype(load16), Lanes16>(load16, c, cmn, cmx, camn, csum, csabs, cssq);
    }
  }
#endif
  for (; c < m; c += 8) {
    if constexpr (kPf && kUnit) {
      if (c % 32 == 0) prefetch_rows<R>(q, c + pf_dist);
    }
    fold_rows8<R>(
        [&](int i) {
          if constexpr (kBF16) return load8_bf16_strided(q[i] + c * cs, cs);
          else return kUnit ? load8_half(q[i] + c) : load8_half_strided(q[i] + c * cs, cs);
        },
        c, cmn, cmx, camn, csum, csabs, cssq);
  }
}
#endif
#endif

#if CALIBFAST_VECTOR_VARIANT
// 8 contiguous values of a float-accumulated input (float32, bfloat16, float16) as floats.
template <class Ld>
static inline cf_vf8 load8_as_float(const typename Ld::in_t* q) {
  cf_vf8 v;
  if constexpr (std::is_same<typename Ld::in_t, float>::value) {
    std::memcpy(&v, q, 32);
#if CALIBFAST_F16C
  } else if constexpr (std::is_same<Ld, LoadF16>::value) {
    v = load8_half(q);
#endif
  } else {
    float b[8];  // (bfloat16: the compiler makes this vpmovzxwd and a shift)
    for (int l = 0; l < 8; ++l) b[l] = load1<Ld>(q[l]);
    std::memcpy(&v, b, 32);
  }
  return v;
}

#if CALIBFAST_WIDE_VECTORS
// 16 contiguous 16-bit values (bfloat16 or float16) as floats, in one zmm: bfloat16 zero-extended
// and shifted, float16 by vcvtph2ps (exact, like LoadF16::load). (The zero-masked forms with every
// lane on compile to the plain instructions, whose intrinsics made GCC warn inside its header.)
template <class Ld>
static inline cf_vf16 load16_as_float(const uint16_t* q) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  if constexpr (std::is_same<Ld, LoadBF16>::value)
    return reinterpret_cast<cf_vf16>(_mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, h), 16));
  else
    return reinterpret_cast<cf_vf16>(_mm512_maskz_cvtph_ps(0xffff, h));
}
#endif
#endif

// Masked scalar path: finite values into the slot directly (sums in float64), non-finite counted.
template <class Ld>
static void row_slow(const typename Ld::in_t* p, int64_t c0, int64_t n, int64_t cs, const Slot<typename Ld::acc_t>& s) {
  using acc_t = typename Ld::acc_t;
  for (int64_t c = 0; c < n; ++c) {
    const acc_t v = load1<Ld>(p[c * cs]);
    const int64_t k = s.group == 1 ? c0 + c : (c0 + c) / s.group;
    if (std::isnan(v)) {
      s.nan[k] += 1;
    } else if (std::isinf(v)) {
      s.inf[k] += 1;
    } else {
      const acc_t a = std::fabs(v);
      s.mn[k] = v < s.mn[k] ? v : s.mn[k];
      s.mx[k] = v > s.mx[k] ? v : s.mx[k];
      s.amn[k] = a < s.amn[k] ? a : s.amn[k];
      const double d = static_cast<double>(v);
      s.sum[k] += d;
      s.sabs[k] += std::fabs(d);
      s.ssq[k] += d * d;
    }
  }
}

// Rows [r0, r1) x channels [c0, c0 + n) into slot `s`. `scratch` holds 6 * n acc_t.
template <class Ld, bool kUnit>
static void rows_range(const typename Ld::in_t* base, const calibfast::Layout& L, int64_t r0, int64_t r1,
                       int64_t c0, int64_t n, const Slot<typename Ld::acc_t>& s, typename Ld::acc_t* scratch) {
  using in_t = typename Ld::in_t;
  using acc_t = typename Ld::acc_t;
  const int64_t cs = L.channel_stride;
  acc_t* cmn = scratch;
  acc_t* cmx = scratch + n;
  acc_t* camn = scratch + 2 * n;
  acc_t* csum = scratch + 3 * n;
  acc_t* csabs = scratch + 4 * n;
  acc_t* cssq = scratch + 5 * n;
  std::optional<ChannelTiles<Ld, kUnit>> tiles;
  if (s.N && s.cidx != nullptr) tiles.emplace(base, L, c0, n, s);
  // The statistics alone of a large task read each row kStatsPrefetchValues ahead (with the
  // global histogram, the scatter prefetches the next 8 rows instead: below).
  const bool stats_pf = kUnit && !s.B && (r1 - r0) * n * int64_t(sizeof(in_t)) >= kPrefetchMinBytes;
  [[maybe_unused]] constexpr int64_t pf_dist = kStatsPrefetchValues;
  // float32 with the global histogram (AVX-512 variant): statistics and histogram in one loop
  // (rows_f32_hist) over the first n - n % 16 channels of every 8 rows. (Its increments do not
  // leave the memory idle as the phased scatter did: no prefetch of the next rows.)
  constexpr bool kFusedF32 = CALIBFAST_WIDE_VECTORS && kUnit && std::is_same<Ld, LoadF32>::value;
  [[maybe_unused]] const bool fused = kFusedF32 && s.B && !s.table && !(s.hlo > 0);
  [[maybe_unused]] const int64_t m16 = n / 16 * 16;
  for (int64_t rc = r0; rc < r1; rc += kChunk) {
    const int64_t re = std::min(r1, rc + kChunk);
    init_chunk(n, cmn, cmx, camn, csum, csabs, cssq);
    int64_t r = rc;
    const in_t* p[8];
    // bfloat16 with unit channel stride: the first m channels by rows_pairs (pair order until
    // unpair below), the rest (n % 16) by rows_fast.
    // float16 (with F16C; any channel stride): the first m = n - n % 8 by rows_halves.
    // float32 with unit channel stride, when the statistics read ahead: the first n - n % 16 by
    // rows_f32_pf (otherwise by rows_fast, which GCC vectorises).
    constexpr bool kPairs = CALIBFAST_VECTOR_VARIANT && kUnit && std::is_same<Ld, LoadBF16>::value;
    constexpr bool kStridedBF16 = CALIBFAST_VECTOR_VARIANT && CALIBFAST_F16C && !kUnit && std::is_same<Ld, LoadBF16>::value;
    constexpr bool kHalves = (CALIBFAST_VECTOR_VARIANT && CALIBFAST_F16C && std::is_same<Ld, LoadF16>::value) || kStridedBF16;
    constexpr bool kF32 = CALIBFAST_VECTOR_VARIANT && kUnit && std::is_same<Ld, LoadF32>::value;
    const int64_t m = kPairs ? n / 16 * 16 : kHalves ? n / 8 * 8 : (kF32 && stats_pf) ? n / 16 * 16 : 0;
    auto fold_rows = [&](auto rows) {
      constexpr int R = decltype(rows)::value;
#if CALIBFAST_VECTOR_VARIANT  // (rows_pairs / rows_halves exist only there)
      if constexpr (kPairs) {
        if (m) {
          if (stats_pf) rows_pairs<R, true>(p, m, cmn, cmx, camn, csum, csabs, cssq, pf_dist);
          else rows_pairs<R>(p, m, cmn, cmx, camn, csum, csabs, cssq);
        }
      }
      if constexpr (kF32) {
        if (m) rows_f32_pf<R>(p, m, cmn, cmx, camn, csum, csabs, cssq, pf_dist);
      }
#if CALIBFAST_F16C
      if constexpr (kHalves) {
        if (m) {
          if (stats_pf) rows_halves<R, kUnit, true, kStridedBF16>(p, m, cs, cmn, cmx, camn, csum, csabs, cssq, pf_dist);
          else rows_halves<R, kUnit, false, kStridedBF16>(p, m, cs, cmn, cmx, camn, csum, csabs, cssq);
        }
      }
#endif
#endif
      if (m == n) return;
      const in_t* q[8];
      for (int i = 0; i < R; ++i) q[i] = p[i] + m * cs;
      rows_fast<Ld, R, kUnit>(q, n - m, cs, cmn + m, cmx + m, camn + m, csum + m, csabs + m, cssq + m);
    };
    for (; r + 8 <= re; r += 8) {
      for (int i = 0; i < 8; ++i) p[i] = base + L.offsets(r + i) + c0 * cs;
#if CALIBFAST_WIDE_VECTORS
      if constexpr (kFusedF32) {
        if (fused) {
          const int32_t left_out =
              rows_f32_hist<8>(p, m16, cmn, cmx, camn, csum, csabs, cssq, s.hscale, s.B, s.hsub, s.hstride);
          if (left_out && wants_beyond(s))
            for (int i = 0; i < 8; ++i) keep_beyond<Ld, kUnit>(p[i], m16, cs, s);
          s.note_binned(8 * m16);
          if (m16 < n) {  // the last n % 16 channels: the generic loops
            const in_t* q[8];
            for (int i = 0; i < 8; ++i) q[i] = p[i] + m16;
            rows_fast<Ld, 8, kUnit>(q, n - m16, cs, cmn + m16, cmx + m16, camn + m16, csum + m16, csabs + m16,
                                    cssq + m16);
            hist_rows<Ld, kUnit>(q, 8, n - m16, cs, s);
          }
          if (tiles) tiles->add(r, r + 8);
          continue;
        }
      }
#endif
      fold_rows(std::integral_constant<int, 8>{});
      // the 8 rows are still in cache: bin them now (one read of the input from memory), and
      // meanwhile fetch the next 8 rows into L2 (the scatter leaves the memory idle)
      if (s.B) {
        const in_t* next[8];
        const bool ahead = kUnit && r + 16 <= r1 && (r1 - r0) * n * int64_t(sizeof(in_t)) >= kPrefetchMinBytes;
        if (ahead)
          for (int i = 0; i < 8; ++i) next[i] = base + L.offsets(r + 8 + i) + c0 * cs;
        hist_rows<Ld, kUnit>(p, 8, n, cs, s, ahead ? next : nullptr);
      }
      if (tiles) tiles->add(r, r + 8);
    }
    for (; r < re; ++r) {
      p[0] = base + L.offsets(r) + c0 * cs;
      fold_rows(std::integral_constant<int, 1>{});
      if (s.B) hist_row<Ld, kUnit>(p[0], n, cs, s);
      if (tiles) tiles->add(r, r + 1);
    }
#if CALIBFAST_VECTOR_VARIANT
    if constexpr (kPairs) {
      if (m) {
        float* const arrays[6] = {cmn, cmx, camn, csum, csabs, cssq};
        unpair(m, arrays);
      }
    }
#endif
    // the chunk (kChunk rows) is still in cache for the per-channel histograms
    if (s.N && !tiles) channel_hist_rows<Ld, kUnit>(base, L, rc, re, c0, n, s);
    int64_t nbad = 0;
    for (int64_t c = 0; c < n; ++c) nbad += chunk_bad(csabs[c], cssq[c]);
    if (nbad == 0) {
      fold_chunk(s, c0, n, cmn, cmx, camn, csum, csabs, cssq);
      continue;
    }
    // Only the channels that need it are redone, column by column (from cache): data such as
    // masked attention scores hold -inf in a few channels of every row, and redoing whole chunks
    // cost them ~10x a finite input. When many channels of the chunk are bad, the rows are redone
    // whole (row by row reads the chunk in order).
    if (nbad * 8 > n) {
      for (r = rc; r < re; ++r) row_slow<Ld>(base + L.offsets(r) + c0 * cs, c0, n, cs, s);
      continue;
    }
    for (int64_t c = 0; c < n;) {
      int64_t e = c;
      while (e < n && !chunk_bad(csabs[e], cssq[e])) ++e;
      if (e > c) fold_chunk(s, c0 + c, e - c, cmn + c, cmx + c, camn + c, csum + c, csabs + c, cssq + c);
      if (e < n) {
        for (r = rc; r < re; ++r) row_slow<Ld>(base + L.offsets(r) + (c0 + e) * cs, c0 + e, 1, cs, s);
        ++e;
      }
      c = e;
    }
  }
  if (tiles) tiles->scatter(true);
}

// ---- run kernels: one channel's contiguous run of values -------------------------------------

// Folds one value into lane l of the lane accumulators.
template <class Ld>
static inline void lane_add(typename Ld::in_t x, int l, typename Ld::acc_t* __restrict__ mn,
                            typename Ld::acc_t* __restrict__ mx, typename Ld::acc_t* __restrict__ amn,
                            typename Ld::acc_t* __restrict__ sm, typename Ld::acc_t* __restrict__ sa,
                            typename Ld::acc_t* __restrict__ sq) {
  using acc_t = typename Ld::acc_t;
  const acc_t v = load1<Ld>(x);
  fold_value(v, std::fabs(v), mn[l], mx[l], amn[l], sm[l], sa[l], sq[l]);
}

// Folds the first n - n % kLanes values of q into the kLanes accumulators (value i into lane
// i % kLanes); returns how many it folded.
template <class Ld>
static inline int64_t fold_lanes(const typename Ld::in_t* __restrict__ q, int64_t n,
                                 typename Ld::acc_t* __restrict__ mn, typename Ld::acc_t* __restrict__ mx,
                                 typename Ld::acc_t* __restrict__ amn, typename Ld::acc_t* __restrict__ sm,
                                 typename Ld::acc_t* __restrict__ sa, typename Ld::acc_t* __restrict__ sq) {
  const int64_t full = n - n % kLanes;
#if CALIBFAST_VECTOR_VARIANT
  if constexpr (std::is_same<typename Ld::acc_t, float>::value && sizeof(typename Ld::in_t) == 2) {
    // Lanes 0-7, then lanes 8-15, each a pass over the values with its 6 accumulators in
    // registers (the block is in L1 for the second pass). All 12 at once, with the abs mask and
    // the loaded values, were more than 16 registers: the compiler kept two on the stack, and
    // their chains through memory took half of the long runs' time (session 10, perf); float16
    // went through the scalar conversion. The same lanes get the same values in the same order.
    // (float32 does not spill, and was slower in two passes: it keeps the loop below.)
    static_assert(kLanes == 16, "two passes of 8 lanes");
#if CALIBFAST_WIDE_VECTORS
    // The AVX-512 variant has the registers for all 16 lanes in one zmm each: one pass, 16 values
    // widened a step (session 16: the two 8-lane passes made 16-bit NCHW statistics ~1.45x the
    // linear layout's time per byte on the Zen 5 host).
    Lanes16 acc16;
    acc16.load(mn, mx, amn, sm, sa, sq, 0);
    for (int64_t i = 0; i < full; i += kLanes) {
      __builtin_prefetch(reinterpret_cast<const char*>(q + i) + kRunPrefetch);
      acc16.fold(load16_as_float<Ld>(q + i));
    }
    acc16.store(mn, mx, amn, sm, sa, sq, 0);
    return full;
#else
    for (int h = 0; h < kLanes; h += 8) {
      Lanes8 acc;
      acc.load(mn, mx, amn, sm, sa, sq, h);
      for (int64_t i = h; i < full; i += kLanes) {
        if (h == 0) __builtin_prefetch(reinterpret_cast<const char*>(q + i) + kRunPrefetch);
        acc.fold(load8_as_float<Ld>(q + i));
      }
      acc.store(mn, mx, amn, sm, sa, sq, h);
    }
    return full;
#endif
  }
#endif
  for (int64_t i = 0; i < full; i += kLanes) {
    __builtin_prefetch(reinterpret_cast<const char*>(q + i) + kRunPrefetch);
    for (int l = 0; l < kLanes; ++l) lane_add<Ld>(q[i + l], l, mn, mx, amn, sm, sa, sq);
  }
  return full;
}

// Folds a contiguous run of n values of one channel into channel k of the slot.
template <class Ld>
static void run_fold(const typename Ld::in_t* __restrict__ p, int64_t n, int64_t k, const Slot<typename Ld::acc_t>& s) {
  using acc_t = typename Ld::acc_t;
  // The lane accumulators of a block of q (bn values) are reduced into channel k, or the block is
  // redone by the masked path when they are not usable; its histograms are binned.
  auto finish = [&](const typename Ld::in_t* q, int64_t bn, const acc_t* mn, const acc_t* mx, const acc_t* amn,
                    const acc_t* sm, const acc_t* sa, const acc_t* sq) {
    int any_bad = 0;
    for (int l = 0; l < kLanes; ++l) any_bad |= chunk_bad(sa[l], sq[l]);
    if (s.B || s.N) hist_run<Ld>(q, bn, k, s);
    if (any_bad) {
      for (int64_t j = 0; j < bn; ++j) row_slow<Ld>(q + j, k, 1, 0, s);
      return;
    }
    reduce_into(s, k, kLanes, mn, mx, amn, sm, sa, sq);
  };
  int64_t b0 = 0;
#if CALIBFAST_WIDE_VECTORS
  if constexpr (std::is_same<acc_t, float>::value && sizeof(typename Ld::in_t) == 2) {
    // 16-bit inputs, two full blocks at a time, folded together: each block's lanes take the same
    // values in the same order as below, and the blocks are reduced in order (identical results),
    // but two chains of dependent adds and FMAs are in flight instead of one (session 16, NCHW
    // 64 x 64 x 64 x 64, 2 threads: bfloat16 1.49x, float16 1.42x faster with the one-pass
    // fold_lanes; float32 was 1.19x faster in cache but 0.76x from memory, and keeps one block).
    for (; b0 + 2 * kRunBlock <= n; b0 += 2 * kRunBlock) {
      const typename Ld::in_t* __restrict__ q = p + b0;
      alignas(64) acc_t a[6][kLanes], b[6][kLanes];
      Lanes16 la, lb;
      init_chunk<acc_t>(kLanes, a[0], a[1], a[2], a[3], a[4], a[5]);
      la.load(a[0], a[1], a[2], a[3], a[4], a[5], 0);
      lb = la;
      for (int64_t i = 0; i < kRunBlock; i += kLanes) {
        __builtin_prefetch(reinterpret_cast<const char*>(q + i) + kRunPrefetch);
        __builtin_prefetch(reinterpret_cast<const char*>(q + kRunBlock + i) + kRunPrefetch);
        la.fold(load16_as_float<Ld>(q + i));
        lb.fold(load16_as_float<Ld>(q + kRunBlock + i));
      }
      la.store(a[0], a[1], a[2], a[3], a[4], a[5], 0);
      lb.store(b[0], b[1], b[2], b[3], b[4], b[5], 0);
      finish(q, kRunBlock, a[0], a[1], a[2], a[3], a[4], a[5]);
      finish(q + kRunBlock, kRunBlock, b[0], b[1], b[2], b[3], b[4], b[5]);
    }
  }
#endif
  for (; b0 < n; b0 += kRunBlock) {
    const int64_t bn = std::min(n - b0, kRunBlock);
    const typename Ld::in_t* __restrict__ q = p + b0;
    acc_t mn[kLanes], mx[kLanes], amn[kLanes], sm[kLanes], sa[kLanes], sq[kLanes];
    init_chunk<acc_t>(kLanes, mn, mx, amn, sm, sa, sq);
    int64_t i = fold_lanes<Ld>(q, bn, mn, mx, amn, sm, sa, sq);
    for (int l = 0; i < bn; ++i, ++l) lane_add<Ld>(q[i], l, mn, mx, amn, sm, sa, sq);
    finish(q, bn, mn, mx, amn, sm, sa, sq);
  }
}

// Per-channel histograms of short runs (NCHW with small maps: one copy of each channel's
// counters, N <= kTiledMaxN) in two steps, as ChannelTiles does for rows. The runs' bin indices
// are written as uint16 offsets into their channel tile's counters (channel k's index i becomes
// (k % kCTile) * S + i + 1, as tile_offsets writes them) into this thread's buffer, which holds a
// region per tile of kCTile channels; scatter() then takes the regions one after another, each
// tile's counters (17 KB for 256 bins) in L1 while it takes their increments, the next tile's
// prefetched. Session 11: binned run by run, each channel's counters (C x 1.1 KB a thread: L2 or
// beyond) were fetched for the ~72 increments of one tile of 8 samples, and 3 x 3 maps spent
// more time on per-run set-up than on the values.
template <class Ld>
struct RunTiles {
  const Slot<typename Ld::acc_t>& s;
  int64_t n;       // values a run
  int64_t tiles;   // channel tiles: ceil(C / kCTile)
  int64_t region;  // buffer entries a tile
  std::vector<int64_t> fill;  // entries used in each region
  int64_t jmin, jmax;         // the tiles used

  RunTiles(const Slot<typename Ld::acc_t>& s_, int64_t n_)
      : s(s_), n(n_), tiles((s_.C + kCTile - 1) / kCTile), jmin(tiles), jmax(-1) {
    region = s.cidx_len / tiles;
  }
  // Whether the buffer has room for a tile's runs of one sample in each region.
  bool usable() const { return region >= kCTile * n; }
  void start() { fill.assign(tiles, 0); }

  // Room for len entries in tile j's region (scattering everything first when there is none).
  inline uint16_t* reserve(int64_t j, int64_t len) {
    if (fill[j] + len > region) scatter();
    jmin = j < jmin ? j : jmin;
    jmax = j > jmax ? j : jmax;
    uint16_t* out = s.cidx + j * region + fill[j];
    fill[j] += len;
    return out;
  }

  // One run of channel c at p.
  void add(const typename Ld::in_t* p, int64_t c) {
    uint16_t* out = reserve(c / kCTile, n);
    const int32_t base = static_cast<int32_t>((c % kCTile) * s.cstride() + 1);
    const int32_t left_out = bin_indices<Ld, true>(p, n, 1, s.cscale[c], s.clo[c], s.N, s.idx);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint16_t>(s.idx[i] + base);
    if (left_out && wants_channel_beyond(s)) keep_beyond_channels<Ld, true, true>(p, n, 1, c, s);
  }

  // Expanded per-value scale, lower bound and offset base of channels [ea, eb) (runs of n values,
  // (eb - ea) * n <= kExpand): adjacent runs are then binned by channel_bin_indices across run
  // boundaries, not run by run (two vectors for a 9-value run, and the per-run set-up).
  static constexpr int64_t kExpand = 2048;
  using acc_t = typename Ld::acc_t;
  acc_t esc[kExpand], elo[kExpand];
  int32_t ebase[kExpand];
  int64_t ea = 0, eb = 0;

  // The adjacent runs of channels [ca, cb) of one sample, from p; false (nothing done) when they
  // do not fit the expanded arrays.
  bool add_range(const typename Ld::in_t* __restrict__ p, int64_t ca, int64_t cb) {
    if ((cb - ca) * n > kExpand) return false;
    if (ca < ea || cb > eb) {
      ea = ca;
      eb = cb;
      const int64_t S = s.cstride();
      for (int64_t k = ca; k < cb; ++k) {
        const int64_t o = (k - ca) * n;
        std::fill_n(esc + o, n, s.cscale[k]);
        std::fill_n(elo + o, n, s.clo[k]);
        std::fill_n(ebase + o, n, static_cast<int32_t>((k % kCTile) * S + 1));
      }
    }
    int32_t left_out = 0;
    for (int64_t k0 = ca; k0 < cb;) {  // a tile's part of the range at a time (its own region)
      const int64_t k1 = std::min(cb, (k0 / kCTile + 1) * kCTile);
      const int64_t len = (k1 - k0) * n, e0 = (k0 - ea) * n;
      uint16_t* __restrict__ out = reserve(k0 / kCTile, len);
      left_out |= channel_bin_indices<Ld, true>(p + (k0 - ca) * n, len, 1, esc + e0, elo + e0, s.N, s.idx);
      const int32_t* __restrict__ ix = s.idx;
      const int32_t* __restrict__ eb0 = ebase + e0;
      for (int64_t i = 0; i < len; ++i) out[i] = static_cast<uint16_t>(ix[i] + eb0[i]);
      k0 = k1;
    }
    if (left_out && wants_channel_beyond(s))
      for (int64_t k = ca; k < cb; ++k) keep_beyond_channels<Ld, true, true>(p + (k - ca) * n, n, 1, k, s);
    return true;
  }

  void scatter() {
    if (jmax < jmin) return;
    static_assert(std::endian::native == std::endian::little, "four offsets per 64-bit word, low one first");
    const int64_t S = s.cstride();
    const int64_t lines = kCTile * S * int64_t(sizeof(int32_t)) / 64;  // a tile's counters
    for (int64_t j = jmin; j <= jmax; ++j) {
      const int64_t cnt = fill[j];
      if (cnt == 0) continue;
      const uint16_t* __restrict__ ix = s.cidx + j * region;
      int32_t* __restrict__ hb = s.csub + j * kCTile * S - 1;  // (the offsets' bias)
      // the next tile's counters, fetched while this tile's increments run: a line every
      // `every` increments
      const char* next = reinterpret_cast<const char*>(s.csub + (j + 1) * kCTile * S);
      const int64_t next_lines = j < jmax ? lines : 0;
      const int64_t every = std::max<int64_t>(1, cnt / 4 / std::max<int64_t>(next_lines, 1));  // (in steps of 4)
      int64_t line = 0, wait = 0;
      int64_t i = 0;
      for (; i + 4 <= cnt; i += 4) {
        if (--wait <= 0 && line < next_lines) {
          __builtin_prefetch(next + 64 * line++, 1, 3);
          wait = every;
        }
        uint64_t v;
        std::memcpy(&v, ix + i, sizeof(v));
        hb[v & 0xffff] += 1;
        hb[(v >> 16) & 0xffff] += 1;
        hb[(v >> 32) & 0xffff] += 1;
        hb[v >> 48] += 1;
      }
      for (; i < cnt; ++i) hb[ix[i]] += 1;
      fill[j] = 0;
    }
    s.touched(jmin * kCTile, std::min(s.C, (jmax + 1) * kCTile));
    jmin = tiles;
    jmax = -1;
  }
};

// Short runs (NCHW with small maps, 2 * run <= kRunBlock) taken channel by channel across a tile of
// samples: channel c's runs in samples q0 .. q0 + T - 1 fold into the same kLanes accumulators,
// which are reduced into the slot once per channel (or once every kChunk values a lane), instead
// of once per run as run_fold does (a 7 x 7 map: 49 values against a 16-lane reduction in float64).
// Each lane still sums at most kChunk values in float. The runs of a flush are remembered (at most
// kRunTile, or kChunk when one channel's runs span tiles: C = 1), so that a bad flush (a non-finite
// value, overflow, tiny squares: chunk_bad) is redone by the masked path.
template <class Ld>
struct ShortRuns {
  using acc_t = typename Ld::acc_t;
  using in_t = typename Ld::in_t;
  acc_t mn[kLanes], mx[kLanes], amn[kLanes], sm[kLanes], sa[kLanes], sq[kLanes];
  const in_t* runs[kChunk];
  int nruns = 0;
  int64_t used = 0;  // values a lane took since the last flush
  int64_t k = -1;    // the channel being folded
  acc_t tmn, tmx, tamn;  // the runs' last n % kLanes values
  double ts, tsa, tsq;

  void reset() {
    init_chunk<acc_t>(kLanes, mn, mx, amn, sm, sa, sq);
    tmn = tamn = std::numeric_limits<acc_t>::infinity();
    tmx = -tmn;
    ts = tsa = tsq = 0;
    nruns = 0;
    used = 0;
  }
  // The lanes reduced as a tree of elementwise steps (16 -> 8 -> 4 -> 2 -> 1), which vectorise,
  // unlike a sequential reduction; the validity check runs on the float64 totals (sums of 16
  // finite floats cannot overflow in float64, NaN and Inf carry through; the tiny-squares bound
  // of chunk_bad holds for the total as for a lane).
  void flush(int64_t run, const Slot<acc_t>& s) {
    if (nruns == 0) return;
    static_assert(kLanes == 16, "the tree below is written for 16 lanes");
    double ds[kLanes], da[kLanes], dq[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      ds[l] = static_cast<double>(sm[l]);
      da[l] = static_cast<double>(sa[l]);
      dq[l] = static_cast<double>(sq[l]);
    }
    halve<8>(ds, da, dq);
    halve<4>(ds, da, dq);
    halve<2>(ds, da, dq);
    halve<1>(ds, da, dq);
    const double tiny = static_cast<double>(tiny_sq<acc_t>());
    if (std::isfinite(da[0]) && std::isfinite(dq[0]) && !(dq[0] < tiny && da[0] > 0) && std::isfinite(tsa)) {
      acc_t rmn = tmn < mn[0] ? tmn : mn[0];
      acc_t rmx = tmx > mx[0] ? tmx : mx[0];
      acc_t ramn = tamn < amn[0] ? tamn : amn[0];
      s.mn[k] = rmn < s.mn[k] ? rmn : s.mn[k];
      s.mx[k] = rmx > s.mx[k] ? rmx : s.mx[k];
      s.amn[k] = ramn < s.amn[k] ? ramn : s.amn[k];
      s.sum[k] += ds[0] + ts;
      s.sabs[k] += da[0] + tsa;
      s.ssq[k] += dq[0] + tsq;
    } else {
      for (int i = 0; i < nruns; ++i)
        for (int64_t j = 0; j < run; ++j) row_slow<Ld>(runs[i] + j, k, 1, 0, s);
    }
    reset();
  }
  template <int W>
  void halve(double* __restrict__ ds, double* __restrict__ da, double* __restrict__ dq) {
    for (int l = 0; l < W; ++l) {
      mn[l] = mn[l + W] < mn[l] ? mn[l + W] : mn[l];
      mx[l] = mx[l + W] > mx[l] ? mx[l + W] : mx[l];
      amn[l] = amn[l + W] < amn[l] ? amn[l + W] : amn[l];
      ds[l] += ds[l + W];
      da[l] += da[l + W];
      dq[l] += dq[l + W];
    }
  }
  // Folds one run of channel c (n <= kRunBlock / 2 values).
  void add(const in_t* __restrict__ q, int64_t n, int64_t c, const Slot<acc_t>& s) {
    const int64_t per_lane = n / kLanes;
    if (c != k || used + per_lane > kChunk || nruns == kChunk) {
      flush(n, s);
      k = c;
    }
    runs[nruns++] = q;
    used += per_lane;
    int64_t i = fold_lanes<Ld>(q, n, mn, mx, amn, sm, sa, sq);
    // The last n % kLanes values go to scalar accumulators (sums in float64), not into lanes:
    // scalar stores into the lane arrays stalled the next run's vector loads of them (store
    // forwarding), a third of the time of 7 x 7 maps.
    for (; i < n; ++i) {
      const acc_t v = load1<Ld>(q[i]);
      const acc_t a = std::fabs(v);
      tmn = v < tmn ? v : tmn;
      tmx = v > tmx ? v : tmx;
      tamn = a < tamn ? a : tamn;
      const double d = static_cast<double>(v);
      ts += d;
      tsa += std::fabs(d);
      tsq += d * d;
    }
  }
};

#if CALIBFAST_VECTOR_VARIANT
// Short runs with float accumulation (float32, bfloat16, float16) in the AVX2 / AVX-512 variants
// (session 8, v43): what ShortRuns does, without its per-channel costs. A channel's runs fold into
// 8 lanes held in vector registers (no lane arrays loaded and stored around every run); a run's
// last n % 8 values fold as one masked vector (no scalar float64 tail); and the lanes of 8
// consecutive channels are reduced together -- an 8 x 8 transpose, then 7 elementwise steps per
// statistic, whose 8 results are the 8 channels' -- instead of a 16 -> 1 tree per channel.
// Precision as for every fast path: no value goes through more than kChunk float additions before
// float64. A lane takes at most kChunk - 5 values (used); a run's values go through at most
// ceil(n / 16) additions in their partial, 2 more into the lane, 1 for each later run of the
// channel (T - 1 <= used - ceil(n / 8)), and 3 in the 8-lane tree: at most used + 5 <= kChunk.
// A channel whose float sums are not usable (chunk_bad: NaN / Inf, overflow, tiny squares) is
// redone from its remembered runs by the masked scalar path, like ShortRuns.
template <class Ld>
struct ShortRunsV {
  using in_t = typename Ld::in_t;
  static constexpr int kG = 8;                    // channels reduced together
  static constexpr int64_t kLaneCap = kChunk - 5;  // values a lane sums in float (see add)
  static constexpr int kRunsCap = 64;              // remembered runs (for a redo) per group
  cf_vf8 mn, mx, amn, sm, sa, sq;  // the current channel's lanes
  int64_t used = 0;                // values a lane took since the channel (re)started
  int64_t g0 = -1;                 // the group: channels g0 .. g0 + ng - 1
  int ng = 0;
  cf_vf8 gl[6][kG];                // finished channels' lanes: [statistic][slot]
  const in_t* runs[kRunsCap];
  int nruns = 0;
  int rbeg[kG + 1];                // slot j's runs: runs[rbeg[j] .. rbeg[j + 1])

  void start_lanes() {
    const float inf = std::numeric_limits<float>::infinity();
    mn = cf_vf8{} + inf;
    mx = cf_vf8{} - inf;
    amn = mn;
    sm = sa = sq = cf_vf8{};
    used = 0;
  }
  void reset() {
    start_lanes();
    g0 = -1;
    ng = 0;
    nruns = 0;
    rbeg[0] = 0;
  }
  // The current channel's lanes into its slot (ng - 1).
  void finish_channel() {
    const int j = ng - 1;
    gl[0][j] = mn;
    gl[1][j] = mx;
    gl[2][j] = amn;
    gl[3][j] = sm;
    gl[4][j] = sa;
    gl[5][j] = sq;
    rbeg[ng] = nruns;
  }
  // out[j][i] = in[i][j]
  static inline void transpose8(cf_vf8* r) {
    cf_vf8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = CF_SHUF(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[i + 1] = CF_SHUF(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = CF_SHUF(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 1] = CF_SHUF(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      u[i + 2] = CF_SHUF(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 3] = CF_SHUF(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = CF_SHUF(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      r[i + 4] = CF_SHUF(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
  }
  // min (kOp 0), max (1) or + (2) over r[0..8) as a 3-level tree
  template <int kOp>
  static inline cf_vf8 op8(cf_vf8 x, cf_vf8 y) {
    if constexpr (kOp == 0) return y < x ? y : x;
    if constexpr (kOp == 1) return y > x ? y : x;
    return x + y;
  }
  template <int kOp>
  static inline cf_vf8 tree8(const cf_vf8* r) {
    return op8<kOp>(op8<kOp>(op8<kOp>(r[0], r[1]), op8<kOp>(r[2], r[3])),
                    op8<kOp>(op8<kOp>(r[4], r[5]), op8<kOp>(r[6], r[7])));
  }
  // The group's channels (runs of n values) into the slot: lanes reduced 8 channels at a time.
  void flush_group(int64_t n, const Slot<float>& s) {
    if (ng == 0) return;
    const float inf = std::numeric_limits<float>::infinity();
    const cf_vf8 ident[6] = {cf_vf8{} + inf, cf_vf8{} - inf, cf_vf8{} + inf, cf_vf8{}, cf_vf8{}, cf_vf8{}};
    alignas(32) float res[6][kG];
    for (int st = 0; st < 6; ++st) {
      cf_vf8 r[8];
      for (int j = 0; j < 8; ++j) r[j] = j < ng ? gl[st][j] : ident[st];
      transpose8(r);  // r[l] = lane l of the 8 channels
      const cf_vf8 a = st == 0 || st == 2 ? tree8<0>(r) : st == 1 ? tree8<1>(r) : tree8<2>(r);
      std::memcpy(res[st], &a, 32);
    }
    for (int j = 0; j < ng; ++j) {
      const int64_t k = g0 + j;
      if (chunk_bad(res[4][j], res[5][j])) {
        for (int i = rbeg[j]; i < rbeg[j + 1]; ++i)
          for (int64_t v = 0; v < n; ++v) row_slow<Ld>(runs[i] + v, k, 1, 0, s);
        continue;
      }
      s.mn[k] = res[0][j] < s.mn[k] ? res[0][j] : s.mn[k];
      s.mx[k] = res[1][j] > s.mx[k] ? res[1][j] : s.mx[k];
      s.amn[k] = res[2][j] < s.amn[k] ? res[2][j] : s.amn[k];
      s.sum[k] += static_cast<double>(res[3][j]);
      s.sabs[k] += static_cast<double>(res[4][j]);
      s.ssq[k] += static_cast<double>(res[5][j]);
    }
    ng = 0;
    nruns = 0;
  }
  // Folds one run of channel c (n <= kRunBlock / 2 values).
  void add(const in_t* __restrict__ q, int64_t n, int64_t c, const Slot<float>& s) {
    const int64_t per_lane = (n + 7) / 8;
    const bool same = ng > 0 && c == g0 + ng - 1;
    if (!same || used + per_lane > kLaneCap || nruns == kRunsCap) {
      if (ng > 0) finish_channel();
      if (same || ng == kG || c != g0 + ng || nruns == kRunsCap) {
        flush_group(n, s);
        g0 = c;
      }
      ++ng;
      start_lanes();
      rbeg[ng - 1] = nruns;
    }
    runs[nruns++] = q;
    used += per_lane;
    // The run's sums in two sets of fresh partials (even and odd vectors: two dependency chains,
    // not one through all of a channel's runs), added into the lanes at the end.
    cf_vf8 s0{}, a0{}, q0{}, s1{}, a1{}, q1{};
    const cf_vf8 inf = cf_vf8{} + std::numeric_limits<float>::infinity();
    cf_vf8 mx1 = -inf, mn1 = inf, amn1 = inf;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const cf_vf8 v = load8_as_float<Ld>(q + i), w = load8_as_float<Ld>(q + i + 8);
      fold_value(v, cf_abs8(v), mn, mx, amn, s0, a0, q0);
      fold_value(w, cf_abs8(w), mn1, mx1, amn1, s1, a1, q1);
    }
    if (i + 8 <= n) {
      const cf_vf8 v = load8_as_float<Ld>(q + i);
      fold_value(v, cf_abs8(v), mn, mx, amn, s0, a0, q0);
      i += 8;
    }
    if (i < n) {
      // The last t = n - i values: the run's last 8 (n >= 8), whose first 8 - t lanes were folded
      // already -- min, max and abs-min do not change for them, and the sums take them as 0. (No
      // scalar stores into a buffer read back as a vector: that failed store forwarding, a third
      // of the time of 7 x 7 maps.)
      const int t = static_cast<int>(n - i);
      const cf_vf8 v = load8_as_float<Ld>(q + n - 8);
      const cf_vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
      const cf_vi8 keep = lane >= 8 - t;
      const cf_vf8 a = cf_abs8(v);
      const cf_vf8 z = reinterpret_cast<cf_vf8>(reinterpret_cast<cf_vi8>(v) & keep);
      mn1 = v < mn1 ? v : mn1;
      mx1 = v > mx1 ? v : mx1;
      amn1 = a < amn1 ? a : amn1;
      const cf_vf8 az = reinterpret_cast<cf_vf8>(reinterpret_cast<cf_vi8>(a) & keep);
      s1 += z;
      a1 += az;
      q1 += z * z;
    }
    mn = mn1 < mn ? mn1 : mn;
    mx = mx1 > mx ? mx1 : mx;
    amn = amn1 < amn ? amn1 : amn;
    sm += s0 + s1;
    sa += a0 + a1;
    sq += q0 + q1;
  }
  void flush(int64_t n, const Slot<float>& s) {
    if (ng > 0) finish_channel();
    flush_group(n, s);
    reset();
  }
};
#undef CF_SHUF
#undef CF_SHUF16
#undef CF_SHUF_I
#endif

// ---- entry points ------------------------------------------------------------------------------

// Histogram-only pass (after a range grew): rows [r0, r1) x channels [c0, c0 + n).
template <class Ld, bool kUnit>
static void rows_hist_range(const typename Ld::in_t* base, const calibfast::Layout& L, int64_t r0, int64_t r1,
                            int64_t c0, int64_t n, const Slot<typename Ld::acc_t>& s) {
  const int64_t cs = L.channel_stride;
  std::optional<ChannelTiles<Ld, kUnit>> tiles;
  if (s.N && s.cidx != nullptr) tiles.emplace(base, L, c0, n, s);
  for (int64_t rc = r0; rc < r1; rc += kChunk) {
    const int64_t re = std::min(r1, rc + kChunk);
    if (s.B) {
      int64_t r = rc;
      const typename Ld::in_t* p[8];
      for (; r + 8 <= re; r += 8) {
        for (int i = 0; i < 8; ++i) p[i] = base + L.offsets(r + i) + c0 * cs;
        hist_rows<Ld, kUnit>(p, 8, n, cs, s);
      }
      for (; r < re; ++r) hist_row<Ld, kUnit>(base + L.offsets(r) + c0 * cs, n, cs, s);
    }
    if (s.N) {
      if (tiles) {
        tiles->add(rc, re);
      } else {
        channel_hist_rows<Ld, kUnit>(base, L, rc, re, c0, n, s);
      }
    }
  }
  if (tiles) tiles->scatter(true);
}

// Rows [r0, r1) x channels [c0, c0 + n): statistics and histograms, or (scratch == nullptr)
// histograms alone.
template <class Ld>
static void rows_task(const void* data, const calibfast::Layout& L, int64_t r0, int64_t r1, int64_t c0,
                      int64_t n, const Slot<typename Ld::acc_t>& s, typename Ld::acc_t* scratch) {
  const auto* base = static_cast<const typename Ld::in_t*>(data);
  const bool unit = L.channel_stride == 1;
  if (scratch != nullptr) {
    // Very wide rows are folded kWideBlock channels at a time (all the task's rows for one block,
    // then the next): the chunk accumulators of all C channels (6 x C values) would not stay in
    // L2 beside the 8 rows being folded. Each channel's values are grouped into the same chunks
    // of rows either way, so the results are identical.
    const int64_t step = n > 2 * kWideBlock ? kWideBlock : n;
    for (int64_t cb = 0; cb < n; cb += step) {
      const int64_t m = std::min(step, n - cb);
      unit ? rows_range<Ld, true>(base, L, r0, r1, c0 + cb, m, s, scratch)
           : rows_range<Ld, false>(base, L, r0, r1, c0 + cb, m, s, scratch);
    }
  } else {
    unit ? rows_hist_range<Ld, true>(base, L, r0, r1, c0, n, s) : rows_hist_range<Ld, false>(base, L, r0, r1, c0, n, s);
  }
  s.flush();
}

// Pairs [p0, p1) of (outer row q, channel c): statistics and histograms, or (stats == false)
// histograms alone. Long runs: p = q * C + c (memory order). Short runs (2 * run <= kRunBlock): pairs
// go by tiles of kRunTile samples, channel-major within a tile (p = q0 * C + c * T + (q - q0) for
// the tile of T samples from q0), so that ShortRuns folds a channel's runs of the tile together.
template <class Ld>
static void runs_task(const void* data, const calibfast::Layout& L, int64_t p0, int64_t p1,
                      const Slot<typename Ld::acc_t>& s, bool stats) {
  const auto* base = static_cast<const typename Ld::in_t*>(data);
  const int64_t C = L.channels;
  if (2 * L.run <= kRunBlock) {  // (longer runs: two would not fit in a lane's kChunk values)
    const int64_t Q = L.rows / L.run;
    const int64_t n = L.run;
    // The same loop with either accumulator (ShortRunsV where it applies).
    auto short_runs = [&](auto& acc) {
      acc.reset();
      // Histograms by ranges (the global one, and per-channel ones in two steps, RunTiles): the
      // pairs of up to kHistChannels channels of a tile, once their statistics are folded (the
      // values still in L1), sample by sample: a sample's runs of consecutive channels lie one
      // after another (channel stride = run), and both histograms bin them as one row (the
      // per-channel one with expanded per-value ranges, RunTiles::add_range). Run by run
      // (session 10), binning cost ~4x the statistics for 3 x 3 maps: per-run overheads.
      // Otherwise (per-channel histograms with two copies of the counters or over kTiledMaxN
      // bins) run by run.
      constexpr int64_t kHistChannels = 32;
      RunTiles<Ld> tiles(s, n);
      const bool by_range = (s.B || s.N) && (!s.N || (s.cidx != nullptr && tiles.usable()));
      if (by_range && s.N) tiles.start();
      const bool adjacent = L.channel_stride == n;
      int64_t off[kRunTile];
      int64_t c = 0, j = 0, T = 0;
      int64_t h_lo = 0;  // the tile's pairs [h_lo, ...) are not binned yet
      bool at_tile = true;  // pair pi starts a task or a tile: locate it
      auto locate = [&](int64_t pi) {  // its tile, channel and sample (divisions once per tile)
        const int64_t q0 = pi / (kRunTile * C) * kRunTile;
        T = std::min(kRunTile, Q - q0);
        for (int64_t t = 0; t < T; ++t) off[t] = L.outer(q0 + t);
        const int64_t r = pi - q0 * C;
        c = r / T;
        j = r - c * T;
        h_lo = r;
      };
      // Bins the tile's pairs [h_lo, h_hi) (pair u = c * T + t: channel c of sample t).
      auto bin_range = [&](int64_t h_hi) {
        for (int64_t t = 0; t < T; ++t) {
          const int64_t ca = (h_lo - t + T - 1) / T, cb = (h_hi - t + T - 1) / T;  // c * T + t in range
          if (ca >= cb) continue;
          const typename Ld::in_t* p = base + off[t] + ca * L.channel_stride;
          if (s.B) {
            if (adjacent) {
              hist_row<Ld, true>(p, (cb - ca) * n, 1, s);
            } else {
              for (int64_t k = ca; k < cb; ++k) hist_row<Ld, true>(p + (k - ca) * L.channel_stride, n, 1, s);
            }
          } else {
            s.note_binned((cb - ca) * n);
          }
          if (s.N && !(adjacent && tiles.add_range(p, ca, cb)))
            for (int64_t k = ca; k < cb; ++k) tiles.add(p + (k - ca) * L.channel_stride, k);
        }
        h_lo = h_hi;
      };
      for (int64_t pi = p0; pi < p1; ++pi) {
        if (at_tile) {
          locate(pi);
          at_tile = false;
        }
        const typename Ld::in_t* p = base + off[j] + c * L.channel_stride;
        if (stats) acc.add(p, n, c, s);
        if (!by_range && (s.B || s.N)) hist_run<Ld>(p, n, c, s);
        if (++j == T) {
          j = 0;
          ++c;
          if (by_range && (c % kHistChannels == 0 || c == C)) bin_range(c * T);
          at_tile = c == C;
        }
      }
      if (by_range && !at_tile) bin_range(c * T + j);
      tiles.scatter();
      if (stats) acc.flush(n, s);
      s.flush();
    };
#if CALIBFAST_VECTOR_VARIANT
    if constexpr (std::is_same<typename Ld::acc_t, float>::value) {
      if (n >= 8 && (n + 7) / 8 <= ShortRunsV<Ld>::kLaneCap) {  // (n >= 8: see the tail in add)
        ShortRunsV<Ld> acc;
        short_runs(acc);
        return;
      }
    }
#endif
    ShortRuns<Ld> acc;
    short_runs(acc);
    return;
  }
  for (int64_t pi = p0; pi < p1; ++pi) {
    const int64_t q = pi / C;
    const int64_t c = pi - q * C;
    const typename Ld::in_t* p = base + L.outer(q) + c * L.channel_stride;
    if (stats) {
      run_fold<Ld>(p, L.run, c, s);
    } else {
      for (int64_t b0 = 0; b0 < L.run; b0 += kRunBlock) hist_run<Ld>(p + b0, std::min(L.run - b0, kRunBlock), c, s);
    }
  }
  s.flush();
}
