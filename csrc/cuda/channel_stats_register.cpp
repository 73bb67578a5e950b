// Registers the CUDA kernels of channel_stats.cu for the CUDA dispatch key. Kept apart from the
// .cu file so that nvcc never sees torch/library.h (it doubles the CUDA compile time).

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace calibfast {
namespace cuda {
void channel_stats_update_cuda(const at::Tensor& x, int64_t axis, at::Tensor& fstate, at::Tensor& dstate,
                               at::Tensor& istate, at::Tensor& hist, at::Tensor& hexp,
                               at::Tensor& chist, at::Tensor& chexp);
}  // namespace cuda
}  // namespace calibfast

TORCH_LIBRARY_IMPL(calibfast, CUDA, m) {
  m.impl("channel_stats_update", &calibfast::cuda::channel_stats_update_cuda);
}
