// The counter-based dropout mask shared by the CPU and CUDA kernels, so both devices draw the same bits:
// element (row, col) of a row-major [n, d] input is kept when hash(seed, row, col) >= p·2³². The hash
// depends on the logical position only: forward and backward regenerate one mask without storing it,
// and parallel blocks need no shared state. Plain C++ (no torch, no CUDA header).
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fastadapters {

FA_HD uint64_t fa_mix64(uint64_t z) {  // SplitMix64's finaliser
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

FA_HD uint32_t fa_fmix32(uint32_t h) {  // MurmurHash3's finaliser: a bijection built from 32-bit ops
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

// The row's 32-bit key: a 64-bit mix of (seed, row), so rows never share a mask pattern.
FA_HD uint32_t fa_row_key(int64_t seed, int64_t row) {
    const uint64_t key = fa_mix64(static_cast<uint64_t>(seed) + 0x9e3779b97f4a7c15ULL);
    return static_cast<uint32_t>(fa_mix64(key + static_cast<uint64_t>(row) * 0xd1b54a32d192ed03ULL) >> 32);
}

// The column's draw within a row (vectorises: 32-bit multiplies only).
FA_HD uint32_t fa_col_hash(uint32_t row_key, int64_t col) {
    return fa_fmix32(row_key ^ (static_cast<uint32_t>(col) * 0x9e3779b9u));
}

FA_HD uint32_t fa_drop_threshold(float p) {
    const double t = static_cast<double>(p) * 4294967296.0;
    return t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
}

}  // namespace fastadapters
