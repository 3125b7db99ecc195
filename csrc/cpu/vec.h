// Building blocks shared by the CPU kernels: a small fp32 GEMM, dtype conversion of row blocks and the
// counter-based dropout mask. Plain C++ on raw pointers (no torch header), so this folder compiles in
// seconds. The functions defined in vec.cpp are compiled twice (AVX2+FMA and baseline) and picked at
// load time, so one binary runs on any x86-64 and is fast where AVX2 exists.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// One clone per ISA level, chosen once by the dynamic loader (an ifunc), so a binary built here runs
// on any x86-64. OpenMP regions stay outside these functions: GCC outlines them before cloning.
#define FA_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define FA_MULTIVERSION
#endif

namespace fastadapters {
namespace cpu {

// Storage dtypes of the tensors the kernels read and write; all arithmetic is fp32.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int64_t dtype_size(DType dt) { return dt == DType::f32 ? 4 : 2; }

// Dropout on the rows of a [n, d] input: element (row, col) is kept when hash(seed, row, col) >= p·2³².
// The hash depends on the logical position only, so forward and backward regenerate one mask, the
// row blocks of a parallel loop need no shared state, and `dropout_keep` reproduces it for tests.
struct Dropout {
    float p = 0.0f;
    int64_t seed = -1;  // < 0: no dropout
    bool active() const { return p > 0.0f && seed >= 0; }
};

// C[M×N] = init + A[M×K] · B[K×N], all fp32 and row-major with leading dimensions lda, ldb, ldc.
// init is C itself when `accumulate`, else `bias` broadcast over rows (length N), else zero.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate, const float* bias);

// C = beta·C + alpha·op(A)·op(B) (beta 0 or 1), row-major: op(A) is A [M×K], or Aᵀ for A stored [K×M] when
// trans_a; op(B) is B [K×N], or Bᵀ for B stored [N×K] when trans_b. Calls the BLAS sgemm that torch itself
// links (MKL on x86; single-threaded inside a parallel region) where the symbol exists, else gemm().
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
bool have_blas();

// No dropout: pass this as `drop` to load_rows/store_rows.
inline const Dropout& no_dropout() {
    static const Dropout none;
    return none;
}

// dst[r, c] = float(src[r, c]) for a block of `rows` rows that starts at row `row0` of the whole tensor, times
// the dropout multiplier of (row0 + r, c) (1/(1-p) or 0) when `drop` is active.
void load_rows(DType dt, const void* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst, int64_t dst_ld,
               const Dropout& drop = no_dropout(), int64_t row0 = 0);

// dst[r, c] = T(src[r, c] · multiplier(row0 + r, c)) (plus dst's old value when accumulate).
void store_rows(DType dt, const float* src, int64_t src_ld, int64_t rows, int64_t cols, void* dst, int64_t dst_ld,
                const Dropout& drop = no_dropout(), int64_t row0 = 0, bool accumulate = false);

// keep[i] for the n·d elements of a row-major [n, d] tensor: the bits load_rows/store_rows apply.
void dropout_keep(const Dropout& drop, int64_t n, int64_t d, bool* keep);

// dst[c, r] = src[r, c] for a rows×cols block (fp32), small blocks only.
void transpose(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst, int64_t dst_ld);

// Threads a parallel region should use for `work` multiply-adds (small calls stay on one thread).
int threads_for(double work);

}  // namespace cpu
}  // namespace fastadapters
