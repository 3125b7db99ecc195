// Row blocks of the CPU kernels' row-major tensors: byte addressing in any storage dtype, a block as fp32
// (the tensor itself or a converted copy) and the sum of per-thread partial results.
#pragma once
#include <cstdint>
#include <vector>

#include "vec.h"

namespace fastadapters {
namespace cpu {

inline const char* row_ptr(const void* base, int64_t row, int64_t ld, DType dt) {
    return static_cast<const char*>(base) + row * ld * dtype_size(dt);
}
inline char* row_ptr(void* base, int64_t row, int64_t ld, DType dt) {
    return static_cast<char*>(base) + row * ld * dtype_size(dt);
}

// Rows row0 … row0 + rows - 1 of src ([*, cols], row stride src_ld) as fp32, `drop` applied.
struct F32Rows {
    const float* data;
    int64_t ld;
};

// src itself where it is fp32 and nothing is dropped (no copy), else the block converted into buf
// (rows · cols floats, which the caller allocates only when `in_place_f32` is false).
inline bool in_place_f32(DType dt, const Dropout& drop = no_dropout()) { return dt == DType::f32 && !drop.active(); }
inline F32Rows f32_rows(DType dt, const void* src, int64_t src_ld, int64_t row0, int64_t rows, int64_t cols,
                        float* buf, const Dropout& drop = no_dropout()) {
    if (in_place_f32(dt, drop)) return {static_cast<const float*>(src) + row0 * src_ld, src_ld};
    load_rows(dt, row_ptr(src, row0, src_ld, dt), src_ld, rows, cols, buf, cols, drop, row0);
    return {buf, cols};
}

// out[i] = Σ_p parts[p · size + i] over the nt per-thread partial results.
inline void reduce_parts(const std::vector<float>& parts, int nt, int64_t size, float* out) {
#pragma omp parallel for schedule(static) if (size * nt > (1 << 15))
    for (int64_t i = 0; i < size; ++i) {
        float s = 0.0f;
        for (int p = 0; p < nt; ++p) s += parts[p * size + i];
        out[i] = s;
    }
}

}  // namespace cpu
}  // namespace fastadapters
