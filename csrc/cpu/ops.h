// Declarations of the CPU kernels; plain C++ on raw pointers, no torch types.
#pragma once
#include <cstdint>

namespace fastadapters {
namespace cpu {

// keep[i] = hash(seed, i) >= p, a counter-based Bernoulli draw: the same (seed, i) always gives the
// same bit, so backward regenerates the forward's mask without storing it.
void dropout_mask(bool* keep, int64_t n, double p, int64_t seed);

}  // namespace cpu
}  // namespace fastadapters
