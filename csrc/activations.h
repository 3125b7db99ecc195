// The bottleneck adapter's activations in the order of their integer codes, for the CPU and CUDA kernels.
// The one table is fastadapters.kernels.ACTIVATIONS (Python): tests/test_extension.py checks this list (and
// fastadapters._C.ACTIVATIONS, built from it) against it. Plain preprocessor: C, C++ and CUDA include it.
#pragma once

// X(UPPER, lower) for each activation, code 0 first.
#define FA_ACTIVATIONS(X) X(TANH, tanh) X(RELU, relu) X(GELU, gelu) X(SILU, silu) X(SIGMOID, sigmoid)
