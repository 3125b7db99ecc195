// Multi-LoRA on the CPU: every adapter's tokens in blocks, x read once per token for all members, each
// output row written once (bias + delta) before the base GEMM accumulates into it. Work is proportional to
// each token's own rank; tokens are reached through the sorted order, never copied into adapter groups.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops.h"

namespace fastadapters {
namespace cpu {

namespace {

constexpr int64_t kRows = 128;  // tokens per work item (one segment of a prefill adapter)

struct Item {
    int64_t adapter;  // -1: tokens with no adapter
    int64_t begin, end;  // positions in the sorted order
};

}  // namespace

void multi_lora_forward(DType dt, const void* x, int64_t x_ld, int64_t n, int64_t d_in, const float* bank_a,
                        const int64_t* a_off, const int64_t* a_rows, int64_t n_adapters, const int64_t* order,
                        const int64_t* starts, const MultiLoraMember* members, int k) {
    if (n == 0) return;
    std::vector<Item> items;
    double work = 0.0;
    int64_t max_rows = 1, max_dout = 1;
    for (int m = 0; m < k; ++m) max_dout = std::max(max_dout, members[m].d_out);
    for (int64_t a = -1; a < n_adapters; ++a) {
        const int64_t s = a < 0 ? 0 : starts[a], e = a < 0 ? starts[0] : starts[a + 1];
        const bool lora = a >= 0 && a_rows[a] > 0;
        if (lora) {
            max_rows = std::max(max_rows, a_rows[a]);
            double per_token = static_cast<double>(d_in) * a_rows[a];
            for (int m = 0; m < k; ++m) per_token += static_cast<double>(members[m].d_out) * members[m].ranks[a];
            work += per_token * (e - s);
        }
        for (int64_t p = s; p < e; p += kRows) items.push_back({lora ? a : -1, p, std::min(e, p + kRows)});
    }
    const int nt = std::max(1, std::min<int>(threads_for(work), static_cast<int>(items.size())));
    const int64_t es = dtype_size(dt);

#pragma omp parallel num_threads(nt)
    {
        std::vector<float> xbuf(kRows * d_in), tbuf(kRows * max_rows), ybuf(kRows * max_dout);
        std::vector<int64_t> toks(kRows);
#pragma omp for schedule(dynamic, 1)
        for (size_t it = 0; it < items.size(); ++it) {
            const Item& item = items[it];
            const int64_t rows = item.end - item.begin;
            for (int64_t i = 0; i < rows; ++i) toks[i] = order ? order[item.begin + i] : item.begin + i;
            const int64_t a = item.adapter;
            // Sorted ids (no order) and fp32: the block's rows of x and y are contiguous, used in place.
            const bool contiguous = order == nullptr && dt == DType::f32;
            if (a >= 0) {  // shrink: t = x_tok · A_aᵀ for all members at once
                const float* xp = static_cast<const float*>(x) + item.begin * x_ld;
                int64_t ldx = x_ld;
                if (!contiguous) {
                    for (int64_t i = 0; i < rows; ++i)
                        load_rows(dt, static_cast<const char*>(x) + toks[i] * x_ld * es, x_ld, 1, d_in,
                                  xbuf.data() + i * d_in, d_in);
                    xp = xbuf.data();
                    ldx = d_in;
                }
                blas_gemm(false, true, rows, a_rows[a], d_in, 1.0f, xp, ldx, bank_a + a_off[a] * d_in, d_in, 0.0f,
                          tbuf.data(), a_rows[a]);
            }
            for (int m = 0; m < k; ++m) {
                const MultiLoraMember& mem = members[m];
                const int64_t r = a >= 0 ? mem.ranks[a] : 0;
                float* yp = contiguous ? static_cast<float*>(mem.y) + item.begin * mem.d_out : ybuf.data();
                for (int64_t i = 0; i < rows; ++i) {
                    float* yr = yp + i * mem.d_out;
                    if (mem.bias)
                        std::memcpy(yr, mem.bias, sizeof(float) * mem.d_out);
                    else if (r == 0)
                        std::fill(yr, yr + mem.d_out, 0.0f);
                }
                if (r > 0)  // y = bias + scale · t[:, t_col : t_col + r] · B_aᵀ
                    blas_gemm(false, false, rows, mem.d_out, r, mem.scales[a], tbuf.data() + mem.t_col[a], a_rows[a],
                              mem.bank_b + mem.b_off[a] * mem.d_out, mem.d_out, mem.bias ? 1.0f : 0.0f, yp, mem.d_out);
                if (!contiguous)
                    for (int64_t i = 0; i < rows; ++i)
                        store_rows(dt, yp + i * mem.d_out, mem.d_out, 1, mem.d_out,
                                   static_cast<char*>(mem.y) + toks[i] * mem.d_out * es, mem.d_out);
            }
        }
    }
}

}  // namespace cpu
}  // namespace fastadapters
