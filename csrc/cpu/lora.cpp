// LoRA linear on the CPU: the shrink with dropout fused, the expand written with the bias before the base
// GEMM accumulates into it, and a backward that reads dy, t and x once per row block.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops.h"
#include "rows.h"

namespace fastadapters {
namespace cpu {

namespace {

// Rows per block: the block's fp32 copies of x, the mask and dx stay in L2 (3 · 32 · d_in · 4 bytes).
constexpr int64_t kRows = 64;

}  // namespace

void lora_forward(DType dt, const void* x, int64_t x_ld, int64_t n, int64_t d_in, const float* a, int64_t R,
                  void* t, const LoraOut* outs, int k, const Dropout& drop) {
    if (n == 0) return;
    int64_t max_dout = 0;
    double work = static_cast<double>(d_in) * R;
    for (int i = 0; i < k; ++i) {
        max_dout = std::max(max_dout, outs[i].d_out);
        work += static_cast<double>(outs[i].d_out) * outs[i].rank;
    }
    const int64_t nblocks = (n + kRows - 1) / kRows;
    const int nt = std::max(1, std::min<int>(threads_for(work * n), static_cast<int>(nblocks)));
    const bool direct_x = in_place_f32(dt, drop);  // read fp32 x in place

#pragma omp parallel num_threads(nt)
    {
        std::vector<float> xbuf(direct_x ? 0 : kRows * d_in);
        std::vector<float> tbuf(kRows * R), ybuf(dt == DType::f32 ? 0 : kRows * max_dout);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t r0 = b * kRows, rows = std::min(kRows, n - r0);
            const F32Rows xr = f32_rows(dt, x, x_ld, r0, rows, d_in, xbuf.data(), drop);
            blas_gemm(false, true, rows, R, d_in, 1.0f, xr.data, xr.ld, a, d_in, 0.0f, tbuf.data(), R);
            store_rows(dt, tbuf.data(), R, rows, R, row_ptr(t, r0, R, dt), R);
            for (int i = 0; i < k; ++i) {
                const LoraOut& o = outs[i];
                float* y = dt == DType::f32 ? static_cast<float*>(o.y) + r0 * o.d_out : ybuf.data();
                if (o.bias)
                    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * o.d_out, o.bias, sizeof(float) * o.d_out);
                blas_gemm(false, false, rows, o.d_out, o.rank, 1.0f, tbuf.data() + o.offset, R, o.bt, o.d_out,
                          o.bias ? 1.0f : 0.0f, y, o.d_out);
                if (dt != DType::f32)
                    store_rows(dt, y, o.d_out, rows, o.d_out, row_ptr(o.y, r0, o.d_out, dt), o.d_out);
            }
        }
    }
}

void lora_backward(DType dt, const void* x, int64_t x_ld, int64_t n, int64_t d_in, const void* t, int64_t R,
                   const float* a, const LoraGrad* grads, int k, const Dropout& drop, float* da, void* dx) {
    int64_t max_dout = 0;
    bool any_db = false;
    double work = 0.0;
    for (int i = 0; i < k; ++i) {
        max_dout = std::max(max_dout, grads[i].d_out);
        any_db = any_db || grads[i].dbt != nullptr;
        work += static_cast<double>(grads[i].d_out) * grads[i].rank * (grads[i].dbt ? 2 : 1);
    }
    work += static_cast<double>(d_in) * R * ((da ? 1 : 0) + (dx ? 1 : 0));
    const int64_t nblocks = (n + kRows - 1) / kRows;
    const int nt = std::max(1, std::min<int>(threads_for(work * n), static_cast<int>(std::max<int64_t>(nblocks, 1))));

    // Per-thread partial sums of the weight gradients, reduced after the pass.
    std::vector<float> da_parts(da ? nt * R * d_in : 0, 0.0f);
    std::vector<std::vector<float>> dbt_parts(k);
    for (int i = 0; i < k; ++i)
        if (grads[i].dbt) dbt_parts[i].assign(nt * grads[i].rank * grads[i].d_out, 0.0f);
    const bool need_xd = da != nullptr;  // dA needs the dropped x rows
    const bool direct_x = in_place_f32(dt, drop);

#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        std::vector<float> dybuf(dt == DType::f32 ? 0 : kRows * max_dout), tbuf(any_db ? kRows * R : 0);
        std::vector<float> ds(kRows * R);
        std::vector<float> xbuf(need_xd && !direct_x ? kRows * d_in : 0);
        std::vector<float> dxbuf(dx && dt != DType::f32 ? kRows * d_in : 0);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t r0 = b * kRows, rows = std::min(kRows, n - r0);
            if (any_db) load_rows(dt, row_ptr(t, r0, R, dt), R, rows, R, tbuf.data(), R);
            for (int i = 0; i < k; ++i) {
                const LoraGrad& g = grads[i];
                const F32Rows dy = f32_rows(dt, g.dy, g.dy_ld, r0, rows, g.d_out, dybuf.data());
                blas_gemm(false, false, rows, g.rank, g.d_out, 1.0f, dy.data, dy.ld, g.bs, g.rank, 0.0f,
                          ds.data() + g.offset, R);
                if (g.dbt) {
                    float* part = dbt_parts[i].data() + static_cast<int64_t>(tid) * g.rank * g.d_out;
                    blas_gemm(true, false, g.rank, g.d_out, rows, 1.0f, tbuf.data() + g.offset, R, dy.data, dy.ld,
                              1.0f, part, g.d_out);
                }
            }
            if (need_xd) {
                const F32Rows xr = f32_rows(dt, x, x_ld, r0, rows, d_in, xbuf.data(), drop);
                float* part = da_parts.data() + static_cast<int64_t>(tid) * R * d_in;
                blas_gemm(true, false, R, d_in, rows, 1.0f, ds.data(), R, xr.data, xr.ld, 1.0f, part, d_in);
            }
            if (dx) {
                if (dt == DType::f32) {
                    float* out = static_cast<float*>(dx) + r0 * d_in;
                    blas_gemm(false, false, rows, d_in, R, 1.0f, ds.data(), R, a, d_in, 0.0f, out, d_in);
                    if (drop.active()) store_rows(dt, out, d_in, rows, d_in, out, d_in, drop, r0);
                } else {
                    blas_gemm(false, false, rows, d_in, R, 1.0f, ds.data(), R, a, d_in, 0.0f, dxbuf.data(), d_in);
                    store_rows(dt, dxbuf.data(), d_in, rows, d_in, row_ptr(dx, r0, d_in, dt), d_in, drop, r0);
                }
            }
        }
    }
    if (da) reduce_parts(da_parts, nt, R * d_in, da);
    for (int i = 0; i < k; ++i)
        if (grads[i].dbt) reduce_parts(dbt_parts[i], nt, grads[i].rank * grads[i].d_out, grads[i].dbt);
}

}  // namespace cpu
}  // namespace fastadapters
