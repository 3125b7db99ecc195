#include <omp.h>

#include <cstdint>

#include "ops.h"

namespace fastadapters {
namespace cpu {

// SplitMix64 finaliser: a cheap, well-mixed hash of the element index and the seed.
static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void dropout_mask(bool* keep, int64_t n, double p, int64_t seed) {
    const uint64_t threshold = static_cast<uint64_t>(p * 4294967296.0);  // p scaled to 32 bits
    const uint64_t key = mix(static_cast<uint64_t>(seed) + 0x9e3779b97f4a7c15ULL);
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        keep[i] = (mix(key ^ static_cast<uint64_t>(i)) >> 32) >= threshold;
    }
}

}  // namespace cpu
}  // namespace fastadapters
