// The vectorised building blocks of the CPU kernels (see vec.h). Written with GCC vector extensions
// so that the compiler emits AVX2/FMA code in the haswell clone and SSE code in the default clone.
#include "vec.h"

#include "../dropout_hash.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#define FA_INLINE inline __attribute__((always_inline))

// The 32-byte vector type is only passed between always-inlined helpers, so the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// The Fortran BLAS entry point exported by torch's libtorch_cpu (MKL or OpenBLAS). Weak, so the extension
// still loads, on the gemm() fallback, where a torch build does not export it.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace fastadapters {
namespace cpu {

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));  // unaligned access

FA_INLINE v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
FA_INLINE void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
FA_INLINE v8 splat(float a) { return v8{a, a, a, a, a, a, a, a}; }

// The register tile: C[MR, 8·NV] = init + A[MR, K] · B[K, 8·NV]. 6×16 keeps 12 accumulators, two B
// vectors and one broadcast in the 16 AVX2 registers.
template <int MR, int NV>
FA_INLINE void micro_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                          int64_t ldc, bool accumulate, const float* bias) {
    v8 c[MR][NV];
    for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v)
            c[m][v] = accumulate ? load8(C + m * ldc + 8 * v) : (bias ? load8(bias + 8 * v) : splat(0.0f));
    for (int64_t k = 0; k < K; ++k) {
        v8 b[NV];
        for (int v = 0; v < NV; ++v) b[v] = load8(B + k * ldb + 8 * v);
        for (int m = 0; m < MR; ++m) {
            const v8 a = splat(A[m * lda + k]);
            for (int v = 0; v < NV; ++v) c[m][v] += a * b[v];
        }
    }
    for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) store8(C + m * ldc + 8 * v, c[m][v]);
}

template <int NV>
FA_INLINE void column_panel(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                            int64_t ldc, bool accumulate, const float* bias) {
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) micro_tile<6, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, accumulate, bias);
    const float* a = A + m * lda;
    float* c = C + m * ldc;
    switch (M - m) {
        case 5: micro_tile<5, NV>(K, a, lda, B, ldb, c, ldc, accumulate, bias); break;
        case 4: micro_tile<4, NV>(K, a, lda, B, ldb, c, ldc, accumulate, bias); break;
        case 3: micro_tile<3, NV>(K, a, lda, B, ldb, c, ldc, accumulate, bias); break;
        case 2: micro_tile<2, NV>(K, a, lda, B, ldb, c, ldc, accumulate, bias); break;
        case 1: micro_tile<1, NV>(K, a, lda, B, ldb, c, ldc, accumulate, bias); break;
        default: break;
    }
}

inline float half_to_float(uint16_t h) {
#if defined(__FLT16_MAX__)
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return static_cast<float>(f);
#else
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else {
        float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // subnormal: man · 2^-24
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__FLT16_MAX__)
    _Float16 h = static_cast<_Float16>(f);
    uint16_t out;
    std::memcpy(&out, &h, 2);
    return out;
#else
    // Round to nearest even through the float's bits (used only where the compiler lacks _Float16).
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);
    if (x >= 0x477ff000u) return sign | 0x7c00u;  // overflows to inf
    if (x < 0x38800000u) {                          // subnormal or zero
        float a;
        std::memcpy(&a, &x, 4);
        return sign | static_cast<uint16_t>(static_cast<uint32_t>(a * 16777216.0f + 0.5f));
    }
    x += 0xc8000fffu + ((x >> 13) & 1u);
    return sign | static_cast<uint16_t>(x >> 13);
#endif
}

FA_INLINE float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

FA_INLINE uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);                   // round to nearest even
    return static_cast<uint16_t>(bits >> 16);
}

template <DType DT>
FA_INLINE float to_float(const void* p, int64_t i) {
    if constexpr (DT == DType::f32) return static_cast<const float*>(p)[i];
    if constexpr (DT == DType::bf16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    if constexpr (DT == DType::f16) return half_to_float(static_cast<const uint16_t*>(p)[i]);
}

template <DType DT>
FA_INLINE void from_float(void* p, int64_t i, float v) {
    if constexpr (DT == DType::f32) static_cast<float*>(p)[i] = v;
    if constexpr (DT == DType::bf16) static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
    if constexpr (DT == DType::f16) static_cast<uint16_t*>(p)[i] = float_to_half(v);
}

// The dropout multiplier of element (row, col): 1/(1-p) or 0, recomputed from the hash wherever needed.
struct DropRow {
    uint32_t key, thr;
    float inv;
    FA_INLINE float mult(int64_t col) const { return fa_col_hash(key, col) >= thr ? inv : 0.0f; }
};

template <DType DT, bool DROP>
FA_INLINE void load_rows_t(const void* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst, int64_t dst_ld,
                           const Dropout& drop, int64_t row0) {
    const int64_t es = dtype_size(DT);
    const uint32_t thr = fa_drop_threshold(drop.p);
    const float inv = 1.0f / (1.0f - drop.p);
    for (int64_t r = 0; r < rows; ++r) {
        const void* s = static_cast<const char*>(src) + r * src_ld * es;
        float* d = dst + r * dst_ld;
        if constexpr (DROP) {
            const DropRow dr{fa_row_key(drop.seed, row0 + r), thr, inv};
            for (int64_t c = 0; c < cols; ++c) d[c] = to_float<DT>(s, c) * dr.mult(c);
        } else {
            for (int64_t c = 0; c < cols; ++c) d[c] = to_float<DT>(s, c);
        }
    }
}

template <DType DT, bool DROP>
FA_INLINE void store_rows_t(const float* src, int64_t src_ld, int64_t rows, int64_t cols, void* dst, int64_t dst_ld,
                            const Dropout& drop, int64_t row0, bool accumulate) {
    const int64_t es = dtype_size(DT);
    const uint32_t thr = fa_drop_threshold(drop.p);
    const float inv = 1.0f / (1.0f - drop.p);
    for (int64_t r = 0; r < rows; ++r) {
        const float* s = src + r * src_ld;
        void* d = static_cast<char*>(dst) + r * dst_ld * es;
        const DropRow dr{DROP ? fa_row_key(drop.seed, row0 + r) : 0u, thr, inv};
        for (int64_t c = 0; c < cols; ++c) {
            float v = DROP ? s[c] * dr.mult(c) : s[c];
            if (accumulate) v += to_float<DT>(d, c);
            from_float<DT>(d, c, v);
        }
    }
}

}  // namespace

FA_MULTIVERSION void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                          float* C, int64_t ldc, bool accumulate, const float* bias) {
    if (M <= 0 || N <= 0) return;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16)
        column_panel<2>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate, bias ? bias + n : nullptr);
    for (; n + 8 <= N; n += 8)
        column_panel<1>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate, bias ? bias + n : nullptr);
    const int64_t w = N - n;
    if (w == 0) return;
    // Column tail: pack the last w < 8 columns of B (and C, bias) into zero-padded 8-wide panels.
    std::vector<float> bp(static_cast<size_t>(K) * 8, 0.0f), cp(6 * 8, 0.0f), biasp(8, 0.0f);
    for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < w; ++j) bp[k * 8 + j] = B[k * ldb + n + j];
    if (bias)
        for (int64_t j = 0; j < w; ++j) biasp[j] = bias[n + j];
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
        const int64_t mr = std::min<int64_t>(6, M - m0);
        for (int64_t m = 0; m < mr; ++m)
            for (int64_t j = 0; j < 8; ++j) cp[m * 8 + j] = (accumulate && j < w) ? C[(m0 + m) * ldc + n + j] : 0.0f;
        column_panel<1>(mr, K, A + m0 * lda, lda, bp.data(), 8, cp.data(), 8, accumulate,
                        bias ? biasp.data() : nullptr);
        for (int64_t m = 0; m < mr; ++m)
            for (int64_t j = 0; j < w; ++j) C[(m0 + m) * ldc + n + j] = cp[m * 8 + j];
    }
}

FA_MULTIVERSION void load_rows(DType dt, const void* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst,
                               int64_t dst_ld, const Dropout& drop, int64_t row0) {
#define FA_LOAD(DT)                                                                                  \
    return drop.active() ? load_rows_t<DT, true>(src, src_ld, rows, cols, dst, dst_ld, drop, row0) \
                         : load_rows_t<DT, false>(src, src_ld, rows, cols, dst, dst_ld, drop, row0)
    switch (dt) {
        case DType::f32: FA_LOAD(DType::f32);
        case DType::f16: FA_LOAD(DType::f16);
        case DType::bf16: FA_LOAD(DType::bf16);
    }
#undef FA_LOAD
}

FA_MULTIVERSION void store_rows(DType dt, const float* src, int64_t src_ld, int64_t rows, int64_t cols, void* dst,
                                int64_t dst_ld, const Dropout& drop, int64_t row0, bool accumulate) {
#define FA_STORE(DT)                                                                                             \
    return drop.active() ? store_rows_t<DT, true>(src, src_ld, rows, cols, dst, dst_ld, drop, row0, accumulate) \
                         : store_rows_t<DT, false>(src, src_ld, rows, cols, dst, dst_ld, drop, row0, accumulate)
    switch (dt) {
        case DType::f32: FA_STORE(DType::f32);
        case DType::f16: FA_STORE(DType::f16);
        case DType::bf16: FA_STORE(DType::bf16);
    }
#undef FA_STORE
}

void dropout_keep(const Dropout& drop, int64_t n, int64_t d, bool* keep) {
    const uint32_t thr = fa_drop_threshold(drop.p);
#pragma omp parallel for schedule(static) if (n * d > (1 << 16))
    for (int64_t r = 0; r < n; ++r) {
        const uint32_t rk = fa_row_key(drop.seed, r);
        bool* k = keep + r * d;
        for (int64_t c = 0; c < d; ++c) k[c] = fa_col_hash(rk, c) >= thr;
    }
}

void transpose(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst, int64_t dst_ld) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
}

bool have_blas() { return sgemm_ != nullptr; }

void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (sgemm_ != nullptr && K > 0) {
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands, no copies.
        const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
        const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
        sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &m, &n, &k, &alpha, B, &ia, A, &ib, &beta, C, &ic);
        return;
    }
    std::vector<float> at, bt, tmp;
    if (trans_a) {  // gemm() takes A as [M×K]
        at.resize(static_cast<size_t>(M) * K);
        transpose(A, lda, K, M, at.data(), K);
        A = at.data();
        lda = K;
    }
    if (trans_b) {  // gemm() takes B as [K×N]
        bt.resize(static_cast<size_t>(K) * N);
        transpose(B, ldb, N, K, bt.data(), N);
        B = bt.data();
        ldb = N;
    }
    if (alpha == 1.0f) {
        gemm(M, N, K, A, lda, B, ldb, C, ldc, beta != 0.0f, nullptr);
        return;
    }
    tmp.resize(static_cast<size_t>(M) * N);
    gemm(M, N, K, A, lda, B, ldb, tmp.data(), N, false, nullptr);
    for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j)
            C[i * ldc + j] = (beta != 0.0f ? C[i * ldc + j] : 0.0f) + alpha * tmp[i * N + j];
}

int threads_for(double work) {
    const int n = omp_get_max_threads();
    // Below ~0.2 M multiply-adds a parallel region's start-up costs more than it saves.
    if (work < 2e5) return 1;
    return std::max(1, std::min<int>(n, static_cast<int>(work / 1e5)));
}

}  // namespace cpu
}  // namespace fastadapters
