// The bottleneck adapter on the CPU, one row block at a time: the down-projection, the activation, the
// up-projection with scale and residual run while the block is in cache, and backward recomputes f(z)
// from the saved pre-activation. The projections call the BLAS sgemm torch links (single-threaded per
// block); the activations are polynomial approximations (|error| < 2e-7) that the compiler vectorises.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"
#include "rows.h"

namespace fastadapters {
namespace cpu {

namespace {

constexpr int64_t kRows = 128;

inline float fast_exp(float x) {  // Cephes-style expf: range reduction by ln2 and a degree-6 polynomial
    x = std::min(88.3762626647949f, std::max(-87.3365447504f, x));
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

inline float fast_erf(float x) {  // Abramowitz & Stegun 7.1.26, |error| < 1.5e-7
    const float ax = std::fabs(x);
    const float t = 1.0f / (1.0f + 0.3275911f * ax);
    const float y =
        1.0f - (((((1.061405429f * t - 1.453152027f) * t) + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) *
                   t * fast_exp(-ax * ax);
    return std::copysign(y, x);
}

inline float sigmoid(float z) { return 1.0f / (1.0f + fast_exp(-z)); }

inline float activate(Activation act, float z) {
    switch (act) {
        case Activation::tanh: return 2.0f * sigmoid(2.0f * z) - 1.0f;
        case Activation::relu: return z > 0.0f ? z : 0.0f;
        case Activation::gelu: return 0.5f * z * (1.0f + fast_erf(z * 0.70710678118654752f));
        case Activation::silu: return z * sigmoid(z);
        case Activation::sigmoid: return sigmoid(z);
    }
    return z;
}

// f(z) and f'(z) together.
inline void activate_grad(Activation act, float z, float* f, float* df) {
    switch (act) {
        case Activation::tanh: {
            const float t = 2.0f * sigmoid(2.0f * z) - 1.0f;
            *f = t;
            *df = 1.0f - t * t;
            return;
        }
        case Activation::relu:
            *f = z > 0.0f ? z : 0.0f;
            *df = z > 0.0f ? 1.0f : 0.0f;
            return;
        case Activation::gelu: {
            const float cdf = 0.5f * (1.0f + fast_erf(z * 0.70710678118654752f));
            *f = z * cdf;
            *df = cdf + z * 0.39894228040143268f * fast_exp(-0.5f * z * z);
            return;
        }
        case Activation::silu: {
            const float s = sigmoid(z);
            *f = z * s;
            *df = s * (1.0f + z * (1.0f - s));
            return;
        }
        case Activation::sigmoid: {
            const float s = sigmoid(z);
            *f = s;
            *df = s * (1.0f - s);
            return;
        }
    }
}

// a = f(z) over a block (vectorised per activation: the switch is outside the loop).
template <Activation ACT>
inline void activate_block(const float* z, float* a, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) a[i] = activate(ACT, z[i]);
}

// a = f(z), dz = scale · g ⊙ f'(z); returns Σ g ⊙ f(z) (for d_scale).
template <Activation ACT>
inline double activate_grad_block(const float* z, const float* g, float scale, float* a, float* dz, int64_t count) {
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < count; ++i) {
        float f, df;
        activate_grad(ACT, z[i], &f, &df);
        a[i] = f;
        dz[i] = scale * g[i] * df;
        dot += static_cast<double>(g[i]) * f;
    }
    return dot;
}

}  // namespace

FA_MULTIVERSION void activation_rows(Activation act, const float* z, float* a, int64_t count) {
    switch (act) {
        case Activation::tanh: return activate_block<Activation::tanh>(z, a, count);
        case Activation::relu: return activate_block<Activation::relu>(z, a, count);
        case Activation::gelu: return activate_block<Activation::gelu>(z, a, count);
        case Activation::silu: return activate_block<Activation::silu>(z, a, count);
        case Activation::sigmoid: return activate_block<Activation::sigmoid>(z, a, count);
    }
}

FA_MULTIVERSION double activation_grad_rows(Activation act, const float* z, const float* g, float scale, float* a,
                                            float* dz, int64_t count) {
    switch (act) {
        case Activation::tanh: return activate_grad_block<Activation::tanh>(z, g, scale, a, dz, count);
        case Activation::relu: return activate_grad_block<Activation::relu>(z, g, scale, a, dz, count);
        case Activation::gelu: return activate_grad_block<Activation::gelu>(z, g, scale, a, dz, count);
        case Activation::silu: return activate_grad_block<Activation::silu>(z, g, scale, a, dz, count);
        case Activation::sigmoid: return activate_grad_block<Activation::sigmoid>(z, g, scale, a, dz, count);
    }
    return 0.0;
}

namespace {

int block_threads(int64_t n, double work) {
    const int64_t nblocks = (n + kRows - 1) / kRows;
    return std::max(1, std::min<int>(threads_for(work), static_cast<int>(std::max<int64_t>(nblocks, 1))));
}

}  // namespace

void bottleneck_forward(DType dt, const void* h, int64_t h_ld, int64_t n, int64_t d_in, const float* down,
                        int64_t b, const float* up, int64_t d_out, float scale, Activation act, const Dropout& drop,
                        const void* residual, int64_t res_ld, void* out, void* z) {
    if (n == 0) return;
    const int64_t nblocks = (n + kRows - 1) / kRows;
    const int nt = block_threads(n, static_cast<double>(n) * b * (d_in + d_out));
    const bool f32 = dt == DType::f32;
    const bool direct_h = in_place_f32(dt, drop);
    const void* res = residual ? residual : h;
    const int64_t rld = residual ? res_ld : h_ld;

#pragma omp parallel num_threads(nt)
    {
        std::vector<float> hbuf(direct_h ? 0 : kRows * d_in);
        std::vector<float> zbuf(f32 ? 0 : kRows * b), abuf(kRows * b), obuf(f32 ? 0 : kRows * d_out);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t r0 = blk * kRows, rows = std::min(kRows, n - r0);
            const F32Rows hr = f32_rows(dt, h, h_ld, r0, rows, d_in, hbuf.data(), drop);
            float* zp = f32 ? static_cast<float*>(z) + r0 * b : zbuf.data();
            blas_gemm(false, true, rows, b, d_in, 1.0f, hr.data, hr.ld, down, d_in, 0.0f, zp, b);
            if (!f32) {
                store_rows(dt, zp, b, rows, b, row_ptr(z, r0, b, dt), b);
                // What backward will see is the rounded z: compute f from the same values.
                load_rows(dt, row_ptr(z, r0, b, dt), b, rows, b, zp, b);
            }
            activation_rows(act, zp, abuf.data(), rows * b);
            float* op = f32 ? static_cast<float*>(out) + r0 * d_out : obuf.data();
            load_rows(dt, row_ptr(res, r0, rld, dt), rld, rows, d_out, op, d_out);
            blas_gemm(false, true, rows, d_out, b, scale, abuf.data(), b, up, b, 1.0f, op, d_out);
            if (!f32) store_rows(dt, op, d_out, rows, d_out, row_ptr(out, r0, d_out, dt), d_out);
        }
    }
}

void bottleneck_backward(DType dt, const void* grad, int64_t g_ld, const void* h, int64_t h_ld, int64_t n,
                         int64_t d_in, const float* down, int64_t b, const float* up, int64_t d_out, const void* z,
                         float scale, Activation act, const Dropout& drop, bool residual_is_h, void* dh,
                         float* d_down, float* d_up, double* d_scale) {
    const int64_t nblocks = (n + kRows - 1) / kRows;
    const int nt = block_threads(n, static_cast<double>(n) * b * (2.0 * d_in + 2.0 * d_out));
    const bool f32 = dt == DType::f32;
    const bool need_h_rows = d_down != nullptr;
    const bool direct_h = in_place_f32(dt, drop);
    const bool direct_g = in_place_f32(dt);

    // Weight gradients: where grad (and h) are fp32 rows already, one full-size GEMM each after the pass (MKL
    // runs a [d × N]·[N × b] product far better than per-block rank-256 updates); else per-thread partial sums.
    const bool full_up = d_up && direct_g, full_down = d_down && direct_h;
    std::vector<float> a_all(full_up ? n * b : 0), dz_all(full_down ? n * b : 0);
    std::vector<float> down_parts(d_down && !full_down ? nt * b * d_in : 0, 0.0f);
    std::vector<float> up_parts(d_up && !full_up ? nt * d_out * b : 0, 0.0f);
    std::vector<double> scale_parts(nt, 0.0);

#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        std::vector<float> gbuf(direct_g ? 0 : kRows * d_out), zbuf(kRows * b), gu(kRows * b), abuf(kRows * b);
        std::vector<float> dz(kRows * b), hbuf(need_h_rows && !direct_h ? kRows * d_in : 0);
        std::vector<float> dhbuf(dh ? kRows * d_in : 0);
        float* my_down = d_down && !full_down ? down_parts.data() + static_cast<int64_t>(tid) * b * d_in : nullptr;
        float* my_up = d_up && !full_up ? up_parts.data() + static_cast<int64_t>(tid) * d_out * b : nullptr;
        double my_scale = 0.0;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t r0 = blk * kRows, rows = std::min(kRows, n - r0);
            const F32Rows g = f32_rows(dt, grad, g_ld, r0, rows, d_out, gbuf.data());
            const float* gp = g.data;
            const int64_t ldg = g.ld;
            // gu = grad · U: the gradient reaching a = f(z), before the scale.
            blas_gemm(false, false, rows, b, d_out, 1.0f, gp, ldg, up, b, 0.0f, gu.data(), b);
            load_rows(dt, row_ptr(z, r0, b, dt), b, rows, b, zbuf.data(), b);
            float* ap = full_up ? a_all.data() + r0 * b : abuf.data();
            float* dzp = full_down ? dz_all.data() + r0 * b : dz.data();
            my_scale += activation_grad_rows(act, zbuf.data(), gu.data(), scale, ap, dzp, rows * b);
            if (my_up) blas_gemm(true, false, d_out, b, rows, scale, gp, ldg, ap, b, 1.0f, my_up, b);
            if (my_down) {
                const F32Rows hr = f32_rows(dt, h, h_ld, r0, rows, d_in, hbuf.data(), drop);
                blas_gemm(true, false, b, d_in, rows, 1.0f, dzp, b, hr.data, hr.ld, 1.0f, my_down, d_in);
            }
            if (dh) {
                float* dp = f32 ? static_cast<float*>(dh) + r0 * d_in : dhbuf.data();
                blas_gemm(false, false, rows, d_in, b, 1.0f, dzp, b, down, d_in, 0.0f, dp, d_in);
                if (drop.active()) store_rows(DType::f32, dp, d_in, rows, d_in, dp, d_in, drop, r0);
                if (residual_is_h)  // out = h + …: the residual path adds grad itself (d_out == d_in)
                    for (int64_t r = 0; r < rows; ++r)
                        for (int64_t c = 0; c < d_in; ++c) dp[r * d_in + c] += gp[r * ldg + c];
                if (!f32) store_rows(dt, dp, d_in, rows, d_in, row_ptr(dh, r0, d_in, dt), d_in);
            }
        }
        scale_parts[tid] = my_scale;
    }
    if (full_up)
        blas_gemm(true, false, d_out, b, n, scale, static_cast<const float*>(grad), g_ld, a_all.data(), b, 0.0f, d_up,
                  b);
    else if (d_up)
        reduce_parts(up_parts, nt, d_out * b, d_up);
    if (full_down)
        blas_gemm(true, false, b, d_in, n, 1.0f, dz_all.data(), b, static_cast<const float*>(h), h_ld, 0.0f, d_down,
                  d_in);
    else if (d_down)
        reduce_parts(down_parts, nt, b * d_in, d_down);
    if (d_scale) {
        double s = 0.0;
        for (int p = 0; p < nt; ++p) s += scale_parts[p];
        *d_scale = s;
    }
}

}  // namespace cpu
}  // namespace fastadapters
