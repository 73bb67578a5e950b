// Shared helpers for the calibfast kernels: argument checks and the layout analysis that lets
// every kernel read its input once, in place, whatever its strides.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define CALIBFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CALIBFAST_HOST_DEVICE inline
#endif

namespace calibfast {

// Histogram exponents (calibfast/_reference.py holds the same): a histogram of B bins covers
// [0, 2^e); e only grows, to the smallest exponent with absmax < 2^e.
constexpr int64_t kEmptyExp = -(int64_t(1) << 30);  // no range yet
constexpr int64_t kMinExp = -100;
constexpr int64_t kMaxExp = 128;
constexpr int64_t kMaxBins = int64_t(1) << 24;

// The most non-channel dims a kernel walks after collapsing; anything with more (after
// collapsing adjacent dims that are contiguous with each other) is first made contiguous.
constexpr int kMaxDims = 8;

// Rows of the per-channel problem: every index over the non-channel dims names one "row" of C
// values, at offset(row) + c * channel_stride (in elements).
struct RowOffsets {
  int nd = 0;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];

  // Offset of row r, dims walked innermost first.
  CALIBFAST_HOST_DEVICE int64_t operator()(int64_t r) const {
    if (nd == 1) return r * strides[0];  // the common case (2-D inputs): no division
    int64_t off = 0;
    for (int d = nd - 1; d >= 0; --d) {
      const int64_t s = sizes[d];
      const int64_t q = r / s;
      off += (r - q * s) * strides[d];
      r = q;
    }
    return off;
  }
};

enum class Mode : int {
  // Channels at unit stride: each row is C contiguous values (Linear activations, channels-last).
  kRows = 0,
  // The innermost non-channel dim is contiguous: each (outer row, channel) pair is a contiguous
  // run of `run` values (NCHW conv activations, transposed matrices).
  kRuns = 1,
  // Anything else: rows with strided channels.
  kStrided = 2,
};

struct Layout {
  int64_t channels = 0;        // C
  int64_t channel_stride = 0;  // elements
  int64_t rows = 0;            // product of the non-channel sizes
  RowOffsets offsets;          // all non-channel dims (kRows, kStrided)
  // kRuns: the innermost non-channel dim split off.
  int64_t run = 1;             // its size
  RowOffsets outer;            // the remaining non-channel dims
  Mode mode = Mode::kRows;
  // CPU kernels: consecutive "virtual" channels per channel of the state (NCHW inputs with small
  // maps read as rows of C x H x W virtual channels; 1 otherwise).
  int64_t group = 1;
};

// Collapse the non-channel dims of `x` (in memory order of their position), returning false when
// more than kMaxDims remain.
inline bool analyse_layout(const at::Tensor& x, int64_t axis, Layout& L) {
  const int64_t nd = x.dim();
  L.channels = x.size(axis);
  L.channel_stride = x.stride(axis);
  L.rows = 1;
  // Gather non-channel dims of size != 1, outermost first.
  int64_t sizes[64];
  int64_t strides[64];
  int n = 0;
  for (int64_t d = 0; d < nd; ++d) {
    if (d == axis) continue;
    L.rows *= x.size(d);
    if (x.size(d) == 1) continue;
    sizes[n] = x.size(d);
    strides[n] = x.stride(d);
    ++n;
  }
  // Collapse neighbours: dim i (outer) and i+1 (inner) merge when stride[i] == size[i+1] *
  // stride[i+1].
  int m = 0;
  for (int i = 0; i < n; ++i) {
    if (m > 0 && strides[m - 1] == sizes[i] * strides[i]) {
      sizes[m - 1] *= sizes[i];
      strides[m - 1] = strides[i];
    } else {
      sizes[m] = sizes[i];
      strides[m] = strides[i];
      ++m;
    }
  }
  if (m > kMaxDims) return false;
  L.offsets.nd = m;
  for (int i = 0; i < m; ++i) {
    L.offsets.sizes[i] = sizes[i];
    L.offsets.strides[i] = strides[i];
  }
  if (L.channel_stride == 1 || L.channels == 1) {
    L.mode = Mode::kRows;
    L.channel_stride = 1;  // C == 1: the stride is irrelevant
  } else if (m > 0 && strides[m - 1] == 1 && sizes[m - 1] >= 4) {
    L.mode = Mode::kRuns;
    L.run = sizes[m - 1];
    L.outer.nd = m - 1;
    for (int i = 0; i < m - 1; ++i) {
      L.outer.sizes[i] = sizes[i];
      L.outer.strides[i] = strides[i];
    }
  } else {
    L.mode = Mode::kStrided;
  }
  return true;
}

// Checks shared by every device's implementation of channel_stats_update. The state is packed in
// three tensors so that one op call carries it all:
//   fstate float32 [3, C]: min, max, absmin (over finite values; absmax = max(max, -min))
//   dstate float64 [3, C]: sum, sum of |x|, sum of x^2 (over finite values)
//   istate int64   [3, C]: values seen, NaN count, +-Inf count
inline void check_hist_arg(const at::Tensor& h, const at::Tensor& e, const at::Tensor& x, const char* hname,
                           const char* ename, int64_t erows, int64_t ecols) {
  const int64_t B = h.size(h.dim() - 1);
  TORCH_CHECK(h.scalar_type() == at::kLong, "calibfast: ", hname, " must be torch.int64, got ", h.scalar_type());
  TORCH_CHECK(B >= 2 && B <= kMaxBins && (B & (B - 1)) == 0, "calibfast: ", hname,
              " needs a power-of-two bin count in [2, ", kMaxBins, "], got ", B);
  const bool eshape = ecols < 0 ? (e.dim() == 1 && e.size(0) == erows)
                                : (e.dim() == 2 && e.size(0) == erows && e.size(1) == ecols);
  TORCH_CHECK(e.scalar_type() == at::kLong && eshape, "calibfast: ", ename, " must be int64 of shape [", erows,
              ecols < 0 ? "" : ", ", ecols < 0 ? "" : std::to_string(ecols), "], got ", e.scalar_type(), " ",
              e.sizes());
  TORCH_CHECK(h.is_contiguous() && e.is_contiguous(), "calibfast: ", hname, " and ", ename, " must be contiguous");
  TORCH_CHECK(h.device() == x.device() && e.device() == x.device(), "calibfast: ", hname, " is on ", h.device(),
              " but the input is on ", x.device());
}

// Checks shared by every device's implementation of channel_stats_update. The state is packed in
// three tensors so that one op call carries it all:
//   fstate float32 [3, C]: min, max, absmin (over finite values; absmax = max(max, -min))
//   dstate float64 [3, C]: sum, sum of |x|, sum of x^2 (over finite values)
//   istate int64   [3, C]: values seen, NaN count, +-Inf count
// and the histograms (empty tensors: off):
//   hist int64 [B], hexp int64 [2]: counts of |x| over [0, 2^hexp[0]); hexp[1] = the exponent
//     before the last update
//   chist int64 [C, N], chexp int64 [2, C]: the same per channel
inline int64_t check_channel_stats_args(const at::Tensor& x, int64_t axis, const at::Tensor& fstate,
                                        const at::Tensor& dstate, const at::Tensor& istate, const at::Tensor& hist,
                                        const at::Tensor& hexp, const at::Tensor& chist, const at::Tensor& chexp) {
  TORCH_CHECK(x.dim() >= 1, "calibfast: channel statistics need a tensor of rank >= 1, got a 0-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
              "calibfast: expected a floating-point tensor (float32, float16, bfloat16 or float64), got ",
              x.scalar_type());
  TORCH_CHECK(axis >= -x.dim() && axis < x.dim(), "calibfast: channel axis ", axis,
              " is out of range for a tensor of rank ", x.dim());
  const int64_t ax = axis < 0 ? axis + x.dim() : axis;
  const int64_t C = x.size(ax);
  auto check_state = [&](const at::Tensor& s, at::ScalarType t, const char* name) {
    TORCH_CHECK(s.scalar_type() == t, "calibfast: ", name, " must be ", t, ", got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == 3 && s.size(1) == C, "calibfast: ", name,
                " must have shape [3, ", C, "] for a tensor with ", C, " channels along axis ", axis,
                ", got ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), "calibfast: ", name, " must be contiguous");
    TORCH_CHECK(s.device() == x.device(), "calibfast: ", name, " is on ", s.device(),
                " but the input is on ", x.device());
  };
  check_state(fstate, at::kFloat, "fstate");
  check_state(dstate, at::kDouble, "dstate");
  check_state(istate, at::kLong, "istate");
  if (hist.numel() > 0) {
    TORCH_CHECK(hist.dim() == 1, "calibfast: hist must be 1-d, got ", hist.sizes());
    check_hist_arg(hist, hexp, x, "hist", "hexp", 2, -1);
  }
  if (chist.numel() > 0) {
    TORCH_CHECK(chist.dim() == 2 && chist.size(0) == C, "calibfast: chist must have shape [", C,
                ", bins] for a tensor with ", C, " channels, got ", chist.sizes());
    check_hist_arg(chist, chexp, x, "chist", "chexp", 2, C);
  }
  return ax;
}

}  // namespace calibfast
