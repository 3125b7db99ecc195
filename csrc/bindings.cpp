// The one file that registers every op of fastadapters._C with TORCH_LIBRARY.
// Kernels live in csrc/cpu (C++/OpenMP) and csrc/cuda (torch-free .cu behind C launchers).
#include <torch/library.h>
#include <torch/torch.h>

#include "cpu/ops.h"

#define CHECK_DEVICE(x, dev) TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())
#define CHECK_SHAPE(x, ...)                                                                      \
    TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
                "), got ", (x).sizes())

namespace {

at::Tensor dropout_mask_cpu(at::IntArrayRef shape, double p, int64_t seed) {
    TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout p must be in [0, 1), got ", p);
    auto out = at::empty(shape, at::TensorOptions().dtype(at::kBool));
    fastadapters::cpu::dropout_mask(out.data_ptr<bool>(), out.numel(), p, seed);
    return out;
}

}  // namespace

TORCH_LIBRARY(fastadapters_C, m) {
    m.def("dropout_mask(int[] shape, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastadapters_C, CompositeExplicitAutograd, m) {
    m.impl("dropout_mask", &dropout_mask_cpu);
}

// A Python module named _C so that `import fastadapters._C` loads the library and its registrations.
PYBIND11_MODULE(_C, m) { m.doc() = "fastadapters compiled kernels; ops live under torch.ops.fastadapters_C"; }
