// The one file that registers every op of fastadapters._C with TORCH_LIBRARY (namespace fastadapters_C).
// Kernels live in csrc/cpu (C++/OpenMP, no torch header) and csrc/cuda (.cu files with no torch header,
// behind the C launchers of csrc/cuda/launchers.h). This file checks the tensors, prepares the small fp32
// operands, calls a kernel and leaves the big GEMMs to ATen. Only light headers, to keep the build short.
#include <Python.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/ops.h"
#ifdef FASTADAPTERS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#endif

#define CHECK_DEVICE(x, dev) \
    TORCH_CHECK((x).device().type() == (dev), #x " must be on ", c10::DeviceTypeName(dev), ", got ", (x).device())
#define CHECK_SAME_DEVICE(x, y) \
    TORCH_CHECK((x).device() == (y).device(), #x " must be on ", (y).device(), " like " #y ", got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())
#define CHECK_ROWS(x) \
    TORCH_CHECK((x).dim() == 2 && (x).stride(1) == 1, #x " must be 2-D with unit column stride, got ", (x).strides())
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())
#define CHECK_FLOAT(x)                                                                                         \
    TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                          \
                    (x).scalar_type() == at::kBFloat16,                                                        \
                #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
#define CHECK_SHAPE(x, ...)                                                                                \
    TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ",                      \
                at::IntArrayRef({__VA_ARGS__}), " (" #__VA_ARGS__ "), got ", (x).sizes())
// The same for the i-th tensor of a list argument, named in the message as `list[i]`.
#define CHECK_SHAPE_AT(x, list, i, ...)                                                                    \
    TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), list "[", i, "] must have shape ",            \
                at::IntArrayRef({__VA_ARGS__}), " (" #__VA_ARGS__ "), got ", (x).sizes())
#define CHECK_LIKE_AT(x, list, i, ref)                                                                     \
    TORCH_CHECK((x).device() == (ref).device() && (x).scalar_type() == (ref).scalar_type(), list "[", i,    \
                "] must be on ", (ref).device(), " with dtype ", (ref).scalar_type(), " like x, got ", (x).device(), \
                " and ", (x).scalar_type())

namespace {

namespace fc = fastadapters::cpu;

fc::DType kernel_dtype(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return fc::DType::f32;
        case at::kHalf: return fc::DType::f16;
        case at::kBFloat16: return fc::DType::bf16;
        default: TORCH_CHECK(false, "fastadapters_C: unsupported dtype ", t.scalar_type());
    }
}

// Rows of x as the kernels read them: unit column stride, any row stride.
at::Tensor as_rows(const at::Tensor& x) { return x.stride(-1) == 1 && x.stride(0) >= 1 ? x : x.contiguous(); }

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Whether an optional bias is given (None and empty tensors mean no bias).
bool present(const std::optional<at::Tensor>& bias) { return bias.has_value() && bias->defined() && bias->numel() > 0; }

// The fp32 copy of a bias of length d_out, kept alive in `keep`; nullptr when there is none.
const float* bias_f32(const std::optional<at::Tensor>& bias, int64_t d_out, std::vector<at::Tensor>& keep) {
    if (!present(bias)) return nullptr;
    CHECK_SHAPE(*bias, d_out);
    keep.push_back(f32(*bias));
    return keep.back().data_ptr<float>();
}

fc::Dropout make_dropout(double p, int64_t seed) {
    TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
    fc::Dropout d;
    d.p = static_cast<float>(p);
    d.seed = p > 0.0 ? seed : -1;
    return d;
}

// ---------------------------------------------------------------------------------------------------
// dropout

at::Tensor dropout_mask(at::IntArrayRef shape, double p, int64_t seed) {
    auto keep = at::empty(shape, at::TensorOptions().dtype(at::kBool));
    const int64_t d = shape.empty() ? 1 : shape.back();
    const int64_t n = d == 0 ? 0 : keep.numel() / d;
    const fc::Dropout drop = make_dropout(p, seed);
    if (!drop.active()) return keep.fill_(true);
    fc::dropout_keep(drop, n, d, keep.data_ptr<bool>());
    return keep;
}

// ---------------------------------------------------------------------------------------------------
// LoRA linear (CPU): ys[i] = x W_iᵀ + b_i + s_i · (drop(x) A_iᵀ) B_iᵀ, t = drop(x) [A_1; …; A_k]ᵀ

void check_lora_members(const at::Tensor& x, at::TensorList weights, at::TensorList lora_as, at::TensorList lora_bs,
                        at::ArrayRef<double> scales) {
    const auto k = weights.size();
    TORCH_CHECK(k >= 1 && lora_as.size() == k && lora_bs.size() == k && scales.size() == k,
                "weights, lora_as, lora_bs and scales must have one length >= 1");
    for (size_t i = 0; i < k; ++i) {
        const auto &w = weights[i], &a = lora_as[i], &b = lora_bs[i];
        CHECK_LIKE_AT(w, "weights", i, x);
        CHECK_LIKE_AT(a, "lora_as", i, x);
        CHECK_LIKE_AT(b, "lora_bs", i, x);
        const int64_t d_in = x.size(1), d_out = w.size(0), rank = a.size(0);
        TORCH_CHECK(w.dim() == 2 && w.size(1) == d_in, "weights[", i, "] must be [d_out, ", d_in, "], got ", w.sizes());
        CHECK_SHAPE_AT(a, "lora_as", i, rank, d_in);
        CHECK_SHAPE_AT(b, "lora_bs", i, d_out, rank);
    }
}

// The LoRA kernels' x: a 2-D floating CPU tensor, as rows (unit column stride).
at::Tensor lora_input(const at::Tensor& x_in) {
    CHECK_DEVICE(x_in, at::kCPU);
    CHECK_FLOAT(x_in);
    TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [n, d_in], got ", x_in.sizes());
    const at::Tensor x = as_rows(x_in);
    CHECK_ROWS(x);
    return x;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> lora_forward(const at::Tensor& x_in, at::TensorList weights,
                                                             const c10::List<std::optional<at::Tensor>>& biases,
                                                             at::TensorList lora_as, at::TensorList lora_bs,
                                                             at::ArrayRef<double> scales, double p, int64_t seed) {
    const at::Tensor x = lora_input(x_in);
    check_lora_members(x, weights, lora_as, lora_bs, scales);
    TORCH_CHECK(biases.size() == weights.size(), "biases must have one entry per weight");
    const int k = static_cast<int>(weights.size());
    const int64_t n = x.size(0), d_in = x.size(1);

    const at::Tensor a32 = f32(at::cat(lora_as));  // [R, d_in]
    const int64_t R = a32.size(0);
    at::Tensor t = at::empty({n, R}, x.options());
    std::vector<at::Tensor> ys, bts, bias32;
    std::vector<fc::LoraOut> outs(k);
    int64_t offset = 0;
    for (int i = 0; i < k; ++i) {
        const int64_t d_out = weights[i].size(0), rank = lora_as[i].size(0);
        ys.push_back(at::empty({n, d_out}, x.options()));
        bts.push_back(f32(lora_bs[i].t().to(at::kFloat).mul(scales[i])));
        const float* bias_ptr = bias_f32(biases.get(i), d_out, bias32);
        outs[i] = {ys.back().data_ptr(), bts.back().data_ptr<float>(), bias_ptr, d_out, rank, offset};
        offset += rank;
    }
    fc::lora_forward(kernel_dtype(x), x.data_ptr(), x.stride(0), n, d_in, a32.data_ptr<float>(), R, t.data_ptr(),
                     outs.data(), k, make_dropout(p, seed));
    for (int i = 0; i < k; ++i) ys[i].addmm_(x, weights[i].t());  // the base GEMM accumulates (beta = 1)
    return {ys, t};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
lora_backward(at::TensorList dys_in, const at::Tensor& x_in, at::TensorList weights, at::TensorList lora_as,
              at::TensorList lora_bs, const at::Tensor& t_in, at::ArrayRef<double> scales, double p, int64_t seed,
              at::IntArrayRef needs) {
    const at::Tensor x = lora_input(x_in);
    check_lora_members(x, weights, lora_as, lora_bs, scales);
    const int k = static_cast<int>(weights.size());
    TORCH_CHECK(static_cast<int>(dys_in.size()) == k, "dys must have one entry per weight");
    TORCH_CHECK(static_cast<int>(needs.size()) == 1 + 4 * k, "needs must have 1 + 4k flags, got ", needs.size());
    const int64_t n = x.size(0), d_in = x.size(1);
    const at::Tensor t = t_in.contiguous();
    CHECK_DTYPE(t, x.scalar_type());
    const bool need_x = needs[0] != 0;
    auto need = [&](int group, int i) { return needs[1 + group * k + i] != 0; };  // 0 w, 1 b, 2 A, 3 B

    const at::Tensor a32 = f32(at::cat(lora_as));  // [R, d_in]
    const int64_t R = a32.size(0);
    CHECK_SHAPE(t, n, R);
    bool any_a = false;
    for (int i = 0; i < k; ++i) any_a = any_a || need(2, i);
    at::Tensor da = any_a ? at::empty({R, d_in}, x.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor dx = need_x ? at::empty({n, d_in}, x.options()) : at::Tensor();

    std::vector<at::Tensor> dys, bss, dbts(k);
    std::vector<fc::LoraGrad> grads(k);
    int64_t offset = 0;
    for (int i = 0; i < k; ++i) {
        const int64_t d_out = weights[i].size(0), rank = lora_as[i].size(0);
        dys.push_back(as_rows(dys_in[i]));
        CHECK_DTYPE(dys.back(), x.scalar_type());
        CHECK_SHAPE(dys.back(), n, d_out);
        bss.push_back(f32(lora_bs[i].to(at::kFloat).mul(scales[i])));
        if (need(3, i)) dbts[i] = at::empty({rank, d_out}, x.options().dtype(at::kFloat));
        grads[i] = {dys.back().data_ptr(), dys.back().stride(0), bss.back().data_ptr<float>(),
                    need(3, i) ? dbts[i].data_ptr<float>() : nullptr, d_out, rank, offset};
        offset += rank;
    }
    fc::lora_backward(kernel_dtype(x), x.data_ptr(), x.stride(0), n, d_in, t.data_ptr(), R, a32.data_ptr<float>(),
                      grads.data(), k, make_dropout(p, seed), any_a ? da.data_ptr<float>() : nullptr,
                      need_x ? dx.data_ptr() : nullptr);
    const at::Tensor none = at::empty({0}, x.options());
    if (need_x)
        for (int i = 0; i < k; ++i) dx.addmm_(dys[i], weights[i]);
    std::vector<at::Tensor> dws(k, none), dbs(k, none), das(k, none), dlbs(k, none);
    offset = 0;
    for (int i = 0; i < k; ++i) {
        const int64_t rank = lora_as[i].size(0);
        if (need(0, i)) dws[i] = at::mm(dys[i].t(), x);
        if (need(1, i)) dbs[i] = dys[i].sum(0);
        // Copies, never views: the outputs of a custom op must not alias each other.
        if (need(2, i)) das[i] = da.narrow(0, offset, rank).to(x.scalar_type(), false, true);
        if (need(3, i)) dlbs[i] = dbts[i].t().mul(scales[i]).contiguous().to(x.scalar_type());
        offset += rank;
    }
    return {need_x ? dx : none, dws, dbs, das, dlbs};
}

// ---------------------------------------------------------------------------------------------------
// multi-LoRA (serving): ys[m][i] = x[i] W_mᵀ + b_m + s_{m,a} · (x[i] A_{m,a}ᵀ) B_{m,a}ᵀ, a = adapter_ids[i]
// Bank layout: see fastadapters/ops/multi_lora.py (bank_a: each adapter's block stacks its members' A;
// bank_bs[m]: member m's B_{m,a}ᵀ in adapter order). ranks/scales are member-major (ranks[m·n + a]).

struct MultiLoraMeta {
    int64_t k = 0, n = 0, max_rows = 0;
    std::vector<int64_t> a_off, a_rows, b_off, t_col;  // a_*: [n]; b_off, t_col: [k·n]
};

MultiLoraMeta multi_lora_meta(int64_t k, at::IntArrayRef ranks) {
    TORCH_CHECK(k >= 1 && static_cast<int64_t>(ranks.size()) % k == 0, "ranks must hold k·n entries, got ",
                ranks.size(), " for k = ", k);
    MultiLoraMeta meta;
    meta.k = k;
    meta.n = static_cast<int64_t>(ranks.size()) / k;
    meta.a_off.resize(meta.n);
    meta.a_rows.resize(meta.n);
    meta.b_off.resize(k * meta.n);
    meta.t_col.resize(k * meta.n);
    std::vector<int64_t> b_row(k, 0);
    int64_t row = 0;
    for (int64_t a = 0; a < meta.n; ++a) {
        meta.a_off[a] = row;
        int64_t col = 0;
        for (int64_t m = 0; m < k; ++m) {
            const int64_t r = ranks[m * meta.n + a];
            TORCH_CHECK(r >= 0, "ranks must be >= 0, got ", r);
            meta.t_col[m * meta.n + a] = col;
            meta.b_off[m * meta.n + a] = b_row[m];
            col += r;
            b_row[m] += r;
        }
        meta.a_rows[a] = col;
        meta.max_rows = std::max(meta.max_rows, col);
        row += col;
    }
    return meta;
}

void check_multi_lora(const at::Tensor& x, at::TensorList weights, const at::Tensor& bank_a, at::TensorList bank_bs,
                      const MultiLoraMeta& meta, at::IntArrayRef ranks, at::ArrayRef<double> scales,
                      const at::Tensor& adapter_ids,
                      const at::Tensor& starts) {
    CHECK_FLOAT(x);
    TORCH_CHECK(x.dim() == 2, "x must be 2-D [n, d_in], got ", x.sizes());
    TORCH_CHECK(static_cast<int64_t>(bank_bs.size()) == meta.k, "bank_bs must have one entry per weight");
    TORCH_CHECK(scales.size() == static_cast<size_t>(meta.k * meta.n), "scales must have k·n entries");
    CHECK_SAME_DEVICE(bank_a, x);
    CHECK_DTYPE(bank_a, x.scalar_type());
    CHECK_SHAPE(bank_a, meta.n ? meta.a_off.back() + meta.a_rows.back() : 0, x.size(1));
    for (int64_t m = 0; m < meta.k; ++m) {
        const auto &w = weights[m], &bb = bank_bs[m];
        CHECK_SAME_DEVICE(w, x);
        CHECK_SAME_DEVICE(bb, x);
        CHECK_DTYPE(w, x.scalar_type());
        CHECK_DTYPE(bb, x.scalar_type());
        TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "weight must be [d_out, ", x.size(1), "], got ",
                    w.sizes());
        int64_t rows = 0;
        for (int64_t a = 0; a < meta.n; ++a) rows += ranks[m * meta.n + a];
        TORCH_CHECK(bb.dim() == 2 && bb.size(0) == rows && bb.size(1) == w.size(0), "bank_b must be [", rows, ", ",
                    w.size(0), "] (Σ ranks, d_out), got ", bb.sizes());
    }
    CHECK_SAME_DEVICE(adapter_ids, x);
    CHECK_DTYPE(adapter_ids, at::kLong);
    TORCH_CHECK(adapter_ids.numel() == x.size(0), "adapter_ids must have one entry per row of x");
    CHECK_DTYPE(starts, at::kLong);
    TORCH_CHECK(starts.numel() == meta.n + 1, "starts must have n_adapters + 1 entries, got ", starts.numel());
}

std::vector<at::Tensor> multi_lora_forward(const at::Tensor& x_in, at::TensorList weights,
                                           const c10::List<std::optional<at::Tensor>>& biases,
                                           const at::Tensor& bank_a_in,
                                           at::TensorList bank_bs, at::IntArrayRef ranks, at::ArrayRef<double> scales,
                                           const at::Tensor& adapter_ids, const at::Tensor& order_in,
                                           const at::Tensor& starts_in) {
    CHECK_DEVICE(x_in, at::kCPU);
    const at::Tensor x = as_rows(x_in);
    const MultiLoraMeta meta = multi_lora_meta(static_cast<int64_t>(weights.size()), ranks);
    check_multi_lora(x, weights, bank_a_in, bank_bs, meta, ranks, scales, adapter_ids, starts_in);
    TORCH_CHECK(biases.size() == weights.size(), "biases must have one entry per weight");
    const int k = static_cast<int>(meta.k);
    const int64_t n = x.size(0);
    const at::Tensor bank_a = f32(bank_a_in);
    const at::Tensor starts = starts_in.contiguous();
    const at::Tensor order = order_in.contiguous();
    TORCH_CHECK(order.numel() == 0 || order.numel() == n, "order must be empty or have one entry per row");
    std::vector<float> scale32(scales.begin(), scales.end());
    std::vector<at::Tensor> ys, bank_b32, bias32;
    std::vector<fc::MultiLoraMember> members(k);
    for (int m = 0; m < k; ++m) {
        const int64_t d_out = weights[m].size(0);
        ys.push_back(at::empty({n, d_out}, x.options()));
        bank_b32.push_back(f32(bank_bs[m]));
        const float* bias_ptr = bias_f32(biases.get(m), d_out, bias32);
        members[m] = {ys.back().data_ptr(), bank_b32.back().data_ptr<float>(), bias_ptr, d_out,
                      ranks.data() + m * meta.n,  scale32.data() + m * meta.n,   meta.b_off.data() + m * meta.n,
                      meta.t_col.data() + m * meta.n};
    }
    fc::multi_lora_forward(kernel_dtype(x), x.data_ptr(), x.stride(0), n, x.size(1), bank_a.data_ptr<float>(),
                           meta.a_off.data(), meta.a_rows.data(), meta.n,
                           order.numel() ? order.data_ptr<int64_t>() : nullptr, starts.data_ptr<int64_t>(),
                           members.data(), k);
    for (int m = 0; m < k; ++m) ys[m].addmm_(x, weights[m].t());
    return ys;
}

// ---------------------------------------------------------------------------------------------------
// bottleneck adapter: out = residual + scale · f(drop(h) Dᵀ) Uᵀ (residual = h when absent); saved z = drop(h) Dᵀ

// "tanh, relu, …": the activations in code order, for error messages.
std::string activation_names() {
    std::string names;
    for (int i = 0; i < fc::kNumActivations; ++i) names += (i ? ", " : "") + std::string(fc::kActivationNames[i]);
    return names;
}

// The one range check of an activation code (the CPU and the CUDA bindings both call it).
fc::Activation cpu_activation(int64_t act) {
    TORCH_CHECK(act >= 0 && act < fc::kNumActivations, "activation must be a code 0..", fc::kNumActivations - 1,
                " (", activation_names(), "), got ", act);
    return static_cast<fc::Activation>(act);
}

void check_bottleneck(const at::Tensor& h, const at::Tensor& down, const at::Tensor& up) {
    CHECK_FLOAT(h);
    TORCH_CHECK(h.dim() == 2, "h must be 2-D [n, d_in], got ", h.sizes());
    CHECK_SAME_DEVICE(down, h);
    CHECK_SAME_DEVICE(up, h);
    CHECK_DTYPE(down, h.scalar_type());
    CHECK_DTYPE(up, h.scalar_type());
    TORCH_CHECK(down.dim() == 2 && down.size(1) == h.size(1), "down must be [b, ", h.size(1), "], got ", down.sizes());
    TORCH_CHECK(up.dim() == 2 && up.size(1) == down.size(0), "up must be [d_out, ", down.size(0), "], got ",
                up.sizes());
}

// The residual the op adds: rows of h's dtype, [n, d_out]. Undefined in the series form (the residual is h
// itself), which needs d_out == d_in.
at::Tensor bottleneck_residual(const std::optional<at::Tensor>& residual_in, const at::Tensor& h, int64_t d_out) {
    if (!residual_in.has_value() || !residual_in->defined()) {
        TORCH_CHECK(d_out == h.size(1), "without a residual (series form) d_out must equal d_in");
        return at::Tensor();
    }
    const at::Tensor residual = as_rows(*residual_in);
    const int64_t n = h.size(0);
    CHECK_DTYPE(residual, h.scalar_type());
    CHECK_SHAPE(residual, n, d_out);
    return residual;
}

float scale_value(const std::optional<at::Tensor>& scale_tensor, double scale) {
    return scale_tensor.has_value() && scale_tensor->defined() ? scale_tensor->to(at::kFloat).item<float>()
                                                                : static_cast<float>(scale);
}

std::tuple<at::Tensor, at::Tensor> bottleneck_forward(const at::Tensor& h_in, const at::Tensor& down,
                                                      const at::Tensor& up,
                                                      const std::optional<at::Tensor>& scale_tensor,
                                                      double scale, int64_t activation, double p, int64_t seed,
                                                      const std::optional<at::Tensor>& residual_in) {
    CHECK_DEVICE(h_in, at::kCPU);
    const at::Tensor h = as_rows(h_in);
    check_bottleneck(h, down, up);
    const int64_t n = h.size(0), d_in = h.size(1), b = down.size(0), d_out = up.size(0);
    const at::Tensor residual = bottleneck_residual(residual_in, h, d_out);
    const at::Tensor down32 = f32(down), up32 = f32(up);
    at::Tensor out = at::empty({n, d_out}, h.options()), z = at::empty({n, b}, h.options());
    fc::bottleneck_forward(kernel_dtype(h), h.data_ptr(), h.stride(0), n, d_in, down32.data_ptr<float>(), b,
                           up32.data_ptr<float>(), d_out, scale_value(scale_tensor, scale), cpu_activation(activation),
                           make_dropout(p, seed), residual.defined() ? residual.data_ptr() : nullptr,
                           residual.defined() ? residual.stride(0) : 0, out.data_ptr(), z.data_ptr());
    return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& down, const at::Tensor& up,
    const at::Tensor& z_in, const std::optional<at::Tensor>& scale_tensor, double scale, int64_t activation, double p,
    int64_t seed, bool has_residual, at::IntArrayRef needs) {
    CHECK_DEVICE(h_in, at::kCPU);
    const at::Tensor h = as_rows(h_in), grad = as_rows(grad_in), z = z_in.contiguous();
    check_bottleneck(h, down, up);
    TORCH_CHECK(needs.size() == 4, "needs must have 4 flags (h, down, up, scale)");
    const int64_t n = h.size(0), d_in = h.size(1), b = down.size(0), d_out = up.size(0);
    CHECK_DTYPE(grad, h.scalar_type());
    CHECK_SHAPE(grad, n, d_out);
    CHECK_SHAPE(z, n, b);
    const at::Tensor down32 = f32(down), up32 = f32(up);
    const auto f32opts = h.options().dtype(at::kFloat);
    at::Tensor dh = needs[0] ? at::empty({n, d_in}, h.options()) : at::Tensor();
    at::Tensor d_down = needs[1] ? at::empty({b, d_in}, f32opts) : at::Tensor();
    at::Tensor d_up = needs[2] ? at::empty({d_out, b}, f32opts) : at::Tensor();
    double d_scale = 0.0;
    fc::bottleneck_backward(kernel_dtype(h), grad.data_ptr(), grad.stride(0), h.data_ptr(), h.stride(0), n, d_in,
                            down32.data_ptr<float>(), b, up32.data_ptr<float>(), d_out, z.data_ptr(),
                            scale_value(scale_tensor, scale), cpu_activation(activation), make_dropout(p, seed),
                            !has_residual, needs[0] ? dh.data_ptr() : nullptr,
                            needs[1] ? d_down.data_ptr<float>() : nullptr, needs[2] ? d_up.data_ptr<float>() : nullptr,
                            needs[3] ? &d_scale : nullptr);
    const at::Tensor none = at::empty({0}, h.options());
    return {needs[0] ? dh : none, needs[1] ? d_down.to(h.scalar_type()) : none,
            needs[2] ? d_up.to(h.scalar_type()) : none,
            needs[3] ? at::scalar_tensor(d_scale, h.options()) : none};
}

#ifdef FASTADAPTERS_WITH_CUDA
// ---------------------------------------------------------------------------------------------------
// CUDA: checks and ATen (cuBLAS) here, kernels behind csrc/cuda/launchers.h

#define CUDA_LAUNCH(call)                                                                   \
    do {                                                                                    \
        const int err_ = (call);                                                            \
        TORCH_CHECK(err_ == 0, "fastadapters_C CUDA kernel failed: ", fa_cuda_error_string(err_)); \
    } while (0)

int cuda_dtype(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return FA_F32;
        case at::kHalf: return FA_F16;
        case at::kBFloat16: return FA_BF16;
        default: TORCH_CHECK(false, "fastadapters_C: unsupported dtype ", t.scalar_type());
    }
}

void* current_stream(const at::Tensor& t) {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

std::vector<at::Tensor> multi_lora_forward_cuda(const at::Tensor& x_in, at::TensorList weights,
                                                const c10::List<std::optional<at::Tensor>>& biases,
                                                const at::Tensor& bank_a_in, at::TensorList bank_bs,
                                                at::IntArrayRef ranks, at::ArrayRef<double> scales,
                                                const at::Tensor& adapter_ids_in, const at::Tensor& order_in,
                                                const at::Tensor& starts) {
    CHECK_DEVICE(x_in, at::kCUDA);
    const c10::cuda::CUDAGuard guard(x_in.device());
    const at::Tensor x = as_rows(x_in);
    const MultiLoraMeta meta = multi_lora_meta(static_cast<int64_t>(weights.size()), ranks);
    const at::Tensor adapter_ids = adapter_ids_in.contiguous();
    check_multi_lora(x, weights, bank_a_in, bank_bs, meta, ranks, scales, adapter_ids, starts);
    TORCH_CHECK(biases.size() == weights.size(), "biases must have one entry per weight");
    const int64_t k = meta.k, n = x.size(0), na = meta.n;
    TORCH_CHECK(k <= FA_MAX_MEMBERS, "at most ", FA_MAX_MEMBERS, " members, got ", k);
    const at::Tensor bank_a = bank_a_in.contiguous();
    const at::Tensor order = order_in.contiguous();
    CHECK_ROWS(x);
    CHECK_CONTIGUOUS(adapter_ids);
    std::vector<at::Tensor> ys;
    for (int64_t m = 0; m < k; ++m) {
        const std::optional<at::Tensor> bias = biases.get(m);
        ys.push_back(present(bias) ? at::addmm(*bias, x, weights[m].t()) : at::mm(x, weights[m].t()));
    }
    if (n == 0 || na == 0 || meta.max_rows == 0) return ys;
    // One host-to-device copy of the per-adapter tables: [a_off | a_rows | ranks | b_off | t_col].
    std::vector<int64_t> table;
    table.reserve(2 * na + 3 * k * na);
    table.insert(table.end(), meta.a_off.begin(), meta.a_off.end());
    table.insert(table.end(), meta.a_rows.begin(), meta.a_rows.end());
    table.insert(table.end(), ranks.begin(), ranks.end());
    table.insert(table.end(), meta.b_off.begin(), meta.b_off.end());
    table.insert(table.end(), meta.t_col.begin(), meta.t_col.end());
    std::vector<float> scale32(scales.begin(), scales.end());
    const auto cpu_long = at::TensorOptions().dtype(at::kLong);
    const at::Tensor table_d =
        at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, cpu_long).to(x.device());
    const at::Tensor scales_d =
        at::from_blob(scale32.data(), {static_cast<int64_t>(scale32.size())}, at::TensorOptions().dtype(at::kFloat))
            .to(x.device());
    const int64_t* tp = table_d.data_ptr<int64_t>();
    at::Tensor t = at::empty({n, meta.max_rows}, x.options().dtype(at::kFloat));
    void* stream = current_stream(x);
    const int64_t* order_ptr = order.numel() ? order.data_ptr<int64_t>() : nullptr;
    CUDA_LAUNCH(fa_multi_lora_shrink(cuda_dtype(x), x.data_ptr(), x.stride(0), n, x.size(1),
                                     adapter_ids.data_ptr<int64_t>(), order_ptr, bank_a.data_ptr(), tp, tp + na, na,
                                     meta.max_rows, t.data_ptr<float>(), meta.max_rows, stream));
    fa_expand_members members{};
    std::vector<at::Tensor> bank_b_c;
    int64_t max_dout = 0;
    for (int64_t m = 0; m < k; ++m) {
        bank_b_c.push_back(bank_bs[m].contiguous());
        members.y[m] = ys[m].data_ptr();
        members.bank_b[m] = bank_b_c.back().data_ptr();
        members.d_out[m] = ys[m].size(1);
        members.y_ld[m] = ys[m].stride(0);
        max_dout = std::max(max_dout, ys[m].size(1));
    }
    CUDA_LAUNCH(fa_multi_lora_expand(cuda_dtype(x), t.data_ptr<float>(), meta.max_rows, n,
                                     adapter_ids.data_ptr<int64_t>(), order_ptr, na, static_cast<int>(k), &members,
                                     tp + 2 * na, scales_d.data_ptr<float>(), tp + 2 * na + k * na,
                                     tp + 2 * na + 2 * k * na, max_dout, stream));
    return ys;
}

// Batches up to this many rows take the two fused small-batch launches; larger ones run on cuBLAS.
constexpr int64_t kBottleneckSmallRows = 64;

const void* scale_ptr(const std::optional<at::Tensor>& scale_tensor, const at::Tensor& h) {
    if (!(scale_tensor.has_value() && scale_tensor->defined())) return nullptr;
    CHECK_SAME_DEVICE(*scale_tensor, h);
    CHECK_DTYPE(*scale_tensor, h.scalar_type());
    return scale_tensor->data_ptr();
}

at::Tensor dropped(const at::Tensor& h, double p, int64_t seed, void* stream) {
    const fc::Dropout drop = make_dropout(p, seed);
    if (!drop.active()) return h;
    at::Tensor out = at::empty({h.size(0), h.size(1)}, h.options());
    CUDA_LAUNCH(fa_dropout_apply(cuda_dtype(h), h.data_ptr(), h.stride(0), h.size(0), h.size(1), drop.p, drop.seed,
                                 out.data_ptr(), out.stride(0), stream));
    return out;
}

std::tuple<at::Tensor, at::Tensor> bottleneck_forward_cuda(const at::Tensor& h_in, const at::Tensor& down_in,
                                                           const at::Tensor& up_in,
                                                           const std::optional<at::Tensor>& scale_tensor, double scale,
                                                           int64_t activation, double p, int64_t seed,
                                                           const std::optional<at::Tensor>& residual_in) {
    CHECK_DEVICE(h_in, at::kCUDA);
    const c10::cuda::CUDAGuard guard(h_in.device());
    const at::Tensor h = as_rows(h_in), down = down_in.contiguous(), up = up_in.contiguous();
    CHECK_ROWS(h);
    check_bottleneck(h, down, up);
    cpu_activation(activation);  // range check
    const int64_t n = h.size(0), d_in = h.size(1), b = down.size(0), d_out = up.size(0);
    at::Tensor residual = bottleneck_residual(residual_in, h, d_out);
    if (!residual.defined()) residual = h;
    void* stream = current_stream(h);
    const void* sp = scale_ptr(scale_tensor, h);
    const fc::Dropout drop = make_dropout(p, seed);
    at::Tensor z = at::empty({n, b}, h.options());
    if (n <= kBottleneckSmallRows) {
        at::Tensor a = at::empty({n, b}, h.options().dtype(at::kFloat));
        at::Tensor out = at::empty({n, d_out}, h.options());
        CUDA_LAUNCH(fa_bottleneck_down(cuda_dtype(h), static_cast<int>(activation), h.data_ptr(), h.stride(0), n, d_in,
                                       down.data_ptr(), b, drop.p, drop.seed, z.data_ptr(), a.data_ptr<float>(),
                                       stream));
        CUDA_LAUNCH(fa_bottleneck_up(cuda_dtype(h), a.data_ptr<float>(), n, b, up.data_ptr(), d_out, sp,
                                     static_cast<float>(scale), residual.data_ptr(), residual.stride(0),
                                     out.data_ptr(), stream));
        return {out, z};
    }
    at::mm_out(z, dropped(h, p, seed, stream), down.t());
    at::Tensor a = at::empty_like(z);
    CUDA_LAUNCH(fa_activation(cuda_dtype(h), static_cast<int>(activation), z.data_ptr(), a.data_ptr(), z.numel(),
                              stream));
    if (sp != nullptr) {
        a.mul_(*scale_tensor);
        return {at::addmm(residual, a, up.t()), z};
    }
    return {at::addmm(residual, a, up.t(), 1.0, scale), z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& down_in, const at::Tensor& up_in,
    const at::Tensor& z_in, const std::optional<at::Tensor>& scale_tensor, double scale, int64_t activation, double p,
    int64_t seed, bool has_residual, at::IntArrayRef needs) {
    CHECK_DEVICE(h_in, at::kCUDA);
    const c10::cuda::CUDAGuard guard(h_in.device());
    const at::Tensor h = as_rows(h_in), grad = grad_in.contiguous(), z = z_in.contiguous();
    const at::Tensor down = down_in.contiguous(), up = up_in.contiguous();
    CHECK_ROWS(h);
    CHECK_CONTIGUOUS(z);
    check_bottleneck(h, down, up);
    cpu_activation(activation);
    TORCH_CHECK(needs.size() == 4, "needs must have 4 flags (h, down, up, scale)");
    const int64_t n = h.size(0), b = down.size(0), d_out = up.size(0);
    CHECK_DTYPE(grad, h.scalar_type());
    CHECK_SHAPE(grad, n, d_out);
    CHECK_SHAPE(z, n, b);
    void* stream = current_stream(h);
    const void* sp = scale_ptr(scale_tensor, h);
    const at::Tensor g_up = at::mm(grad, up);  // the gradient reaching a = f(z), before the scale
    at::Tensor dz = at::empty_like(g_up);
    const bool need_a = needs[2] || needs[3];
    at::Tensor a = need_a ? at::empty_like(g_up) : at::Tensor();
    CUDA_LAUNCH(fa_activation_backward(cuda_dtype(h), static_cast<int>(activation), g_up.data_ptr(), z.data_ptr(), sp,
                                       static_cast<float>(scale), dz.data_ptr(), need_a ? a.data_ptr() : nullptr,
                                       z.numel(), stream));
    const at::Tensor none = at::empty({0}, h.options());
    at::Tensor d_scale = none, d_up = none, d_down = none, dh = none;
    if (needs[3])
        d_scale = at::dot(g_up.reshape({-1}).to(at::kFloat), a.reshape({-1}).to(at::kFloat)).to(h.scalar_type());
    if (needs[2]) {
        d_up = at::mm(grad.t(), a);
        if (sp != nullptr)
            d_up.mul_(*scale_tensor);
        else
            d_up.mul_(scale);
    }
    if (needs[1]) d_down = at::mm(dz.t(), dropped(h, p, seed, stream));
    if (needs[0]) {
        const fc::Dropout drop = make_dropout(p, seed);
        if (drop.active()) {
            dh = at::mm(dz, down);
            CUDA_LAUNCH(fa_dropout_apply(cuda_dtype(h), dh.data_ptr(), dh.stride(0), n, dh.size(1), drop.p, drop.seed,
                                         dh.data_ptr(), dh.stride(0), stream));
            if (!has_residual) dh.add_(grad);
        } else {
            dh = has_residual ? at::mm(dz, down) : at::addmm(grad, dz, down);
        }
    }
    return {dh, d_down, d_up, d_scale};
}
#endif  // FASTADAPTERS_WITH_CUDA

}  // namespace

TORCH_LIBRARY(fastadapters_C, m) {
    m.def("dropout_mask(int[] shape, float p, int seed) -> Tensor");
    m.def(
        "lora_forward(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] lora_as, Tensor[] lora_bs, "
        "float[] scales, float dropout_p, int seed) -> (Tensor[], Tensor)");
    m.def(
        "lora_backward(Tensor[] dys, Tensor x, Tensor[] weights, Tensor[] lora_as, Tensor[] lora_bs, Tensor t, "
        "float[] scales, float dropout_p, int seed, int[] needs) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
    m.def(
        "multi_lora_forward(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor bank_a, Tensor[] bank_bs, "
        "int[] ranks, float[] scales, Tensor adapter_ids, Tensor order, Tensor starts) -> Tensor[]");
    m.def(
        "bottleneck_forward(Tensor h, Tensor down, Tensor up, Tensor? scale_tensor, float scale, int activation, "
        "float dropout_p, int seed, Tensor? residual) -> (Tensor, Tensor)");
    m.def(
        "bottleneck_backward(Tensor grad, Tensor h, Tensor down, Tensor up, Tensor z, Tensor? scale_tensor, "
        "float scale, int activation, float dropout_p, int seed, bool has_residual, int[] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastadapters_C, CompositeExplicitAutograd, m) { m.impl("dropout_mask", &dropout_mask); }

TORCH_LIBRARY_IMPL(fastadapters_C, CPU, m) {
    m.impl("lora_forward", &lora_forward);
    m.impl("lora_backward", &lora_backward);
    m.impl("multi_lora_forward", &multi_lora_forward);
    m.impl("bottleneck_forward", &bottleneck_forward);
    m.impl("bottleneck_backward", &bottleneck_backward);
}

#ifdef FASTADAPTERS_WITH_CUDA
TORCH_LIBRARY_IMPL(fastadapters_C, CUDA, m) {
    m.impl("multi_lora_forward", &multi_lora_forward_cuda);
    m.impl("bottleneck_forward", &bottleneck_forward_cuda);
    m.impl("bottleneck_backward", &bottleneck_backward_cuda);
}
#endif

// `import fastadapters._C` loads the library and runs the registrations above; no pybind11 needed.
PyMODINIT_FUNC PyInit__C(void) {
    static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                              "fastadapters compiled kernels; the ops live under torch.ops.fastadapters_C", -1,
                              nullptr, nullptr, nullptr, nullptr, nullptr};
    PyObject* mod = PyModule_Create(&def);
    if (mod == nullptr) return nullptr;
    // The activation names in code order, which tests check against fastadapters.kernels.ACTIVATIONS.
    PyObject* names = PyTuple_New(fc::kNumActivations);
    for (int i = 0; i < fc::kNumActivations; ++i)
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(fc::kActivationNames[i]));
    PyModule_AddObject(mod, "ACTIVATIONS", names);
#ifdef FASTADAPTERS_WITH_CUDA
    PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
    PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
    return mod;
}
