// The frozen decoder layer's small ops on CPU, each fused into one pass forward and one backward:
// rms_norm, swiglu and rope, registered as fastsoft::{rms_norm,swiglu,rope} with their backward. Implements
// fastsoft/ops/layers.py's contract (the Llama-family formulas of transformers), for fp32 and fp64.
// And fastsoft::frozen_linear: the projections through oneDNN's packed GEMM, with its backward (see there).
//
// Why: at the student step's sizes (a packed row of ~160 tokens, H = 576 on SmolLM2) each of these is
// 4 to 10 ATen elementwise ops, every one a pass over the rows and a kernel launch on the thread pool;
// fused they are one pass each way. Only the gradient of the activations is computed: the model is
// frozen (no d weight), and the callers check that.
//
// Each op is registered with its own autograd (a C++ torch::autograd::Function): one dispatcher call forward, and a
// backward node with no Python in it (an autograd.Function in Python costs more than these kernels at these sizes).
//
// Work split: at::parallel_for over rows (grain: rows of about 32k numbers a task); each row's loop
// is plain arithmetic the compiler vectorises, compiled for AVX2+FMA and the baseline ISA (vec_math.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "vec_math.h"

namespace fastsoft {
namespace {

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width)); }

// ---------------------------------------------------------------- rms_norm
// y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) (transformers' LlamaRMSNorm, in the same order).
// dx = r * (w dy) - x * r^3 / H * sum(w dy x).

template <typename T>
FS_INLINE void rms_norm_rows_impl(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t h, double eps) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* xr = x + n * h;
    T* yr = y + n * h;
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
    const T r = T(1) / std::sqrt(ss / T(h) + T(eps));
    rstd[n] = r;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) yr[i] = w[i] * (xr[i] * r);
  }
}

template <typename T>
FS_INLINE void rms_norm_backward_rows_impl(const T* dy, const T* x, const T* w, const T* rstd, T* dx, int64_t rows,
                                           int64_t h) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* dyr = dy + n * h;
    const T* xr = x + n * h;
    T* dxr = dx + n * h;
    const T r = rstd[n];
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < h; ++i) dot += w[i] * dyr[i] * xr[i];
    const T c = dot * r * r * r / T(h);
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) dxr[i] = r * (w[i] * dyr[i]) - c * xr[i];
  }
}

// ---------------------------------------------------------------- swiglu
// y = silu(g) * u = g s u with s = 1 / (1 + e^-g); dg = dy u s (1 + g (1 - s)), du = dy g s.

template <typename T>
FS_INLINE void swiglu_rows_impl(const T* g, const T* u, T* y, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const T s = T(1) / (T(1) + exp_acc(-g[i]));
    y[i] = g[i] * s * u[i];
  }
}

template <typename T>
FS_INLINE void swiglu_backward_rows_impl(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const T s = T(1) / (T(1) + exp_acc(-g[i]));
    dg[i] = dy[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
    du[i] = dy[i] * g[i] * s;
  }
}

// ---------------------------------------------------------------- rope
// x [rows, heads, D] (a token's heads side by side), cos/sin [rows, D]; with the halves lo = [0, D/2), hi:
// forward  out_lo = x_lo c_lo - x_hi s_lo, out_hi = x_hi c_hi + x_lo s_hi (x * cos + rotate_half(x) * sin);
// backward is the transpose: dx_lo = d_lo c_lo + d_hi s_hi, dx_hi = d_hi c_hi - d_lo s_lo.

template <typename T>
FS_INLINE void rope_rows_impl(const T* x, const T* cos, const T* sin, T* out, int64_t rows, int64_t heads, int64_t d,
                              bool backward) {
  const int64_t half = d / 2;
  for (int64_t n = 0; n < rows; ++n) {
    const T* c = cos + n * d;
    const T* s = sin + n * d;
    for (int64_t hd = 0; hd < heads; ++hd) {
      const T* xr = x + (n * heads + hd) * d;
      T* o = out + (n * heads + hd) * d;
      if (!backward) {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          o[i] = xr[i] * c[i] - xr[i + half] * s[i];
          o[i + half] = xr[i + half] * c[i + half] + xr[i] * s[i + half];
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          o[i] = xr[i] * c[i] + xr[i + half] * s[i + half];
          o[i + half] = xr[i + half] * c[i + half] - xr[i] * s[i];
        }
      }
    }
  }
}

// fp32 kernels twice (AVX2+FMA, baseline), chosen at run time; fp64 baseline only.
#define FS_LAYER_KERNEL(NAME, PARAMS, ARGS)                                   \
  void NAME##_base PARAMS(float) { NAME##_impl<float> ARGS; }                 \
  FS_AVX2_ATTR void NAME##_avx2 PARAMS(float) { NAME##_impl<float> ARGS; }    \
  void NAME PARAMS(float) {                                                   \
    if (cpu_has_avx2()) NAME##_avx2 ARGS;                                     \
    else NAME##_base ARGS;                                                    \
  }                                                                           \
  void NAME PARAMS(double) { NAME##_impl<double> ARGS; }

#define FS_P_rms(T) (const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t h, double eps)
#define FS_P_rms_bwd(T) (const T* dy, const T* x, const T* w, const T* rstd, T* dx, int64_t rows, int64_t h)
#define FS_P_swiglu(T) (const T* g, const T* u, T* y, int64_t count)
#define FS_P_swiglu_bwd(T) (const T* dy, const T* g, const T* u, T* dg, T* du, int64_t count)
#define FS_P_rope(T) (const T* x, const T* cos, const T* sin, T* out, int64_t rows, int64_t heads, int64_t d, bool backward)
FS_LAYER_KERNEL(rms_norm_rows, FS_P_rms, (x, w, y, rstd, rows, h, eps))
FS_LAYER_KERNEL(rms_norm_backward_rows, FS_P_rms_bwd, (dy, x, w, rstd, dx, rows, h))
FS_LAYER_KERNEL(swiglu_rows, FS_P_swiglu, (g, u, y, count))
FS_LAYER_KERNEL(swiglu_backward_rows, FS_P_swiglu_bwd, (dy, g, u, dg, du, count))
FS_LAYER_KERNEL(rope_rows, FS_P_rope, (x, cos, sin, out, rows, heads, d, backward))

// ---------------------------------------------------------------- host side

void check(bool ok, const char* what) { TORCH_CHECK(ok, "fastsoft layers: ", what); }

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  check(a.device().is_cpu() && b.device().is_cpu(), "CPU tensors only");
  check(a.scalar_type() == b.scalar_type(), what);
  check(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, "fp32 or fp64 tensors only");
}

// x [N, H] rows, weight [H] -> (y [N, H], rstd [N])
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  check_same(x_in, w_in, "x and weight must share a dtype");
  check(x_in.dim() == 2 && w_in.dim() == 1 && w_in.size(0) == x_in.size(1), "x [N, H] and weight [H]");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t rows = x.size(0), h = x.size(1);
  at::Tensor y = at::empty_like(x), rstd = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t a, int64_t b) {
      rms_norm_rows(xp + a * h, wp, yp + a * h, rp + a, b - a, h, eps);
    });
  });
  return {y, rstd};
}

at::Tensor rms_norm_backward(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w_in,
                             const at::Tensor& rstd_in) {
  check_same(dy_in, x_in, "dy and x must share a dtype");
  check_same(x_in, w_in, "x and weight must share a dtype");
  check(dy_in.sizes() == x_in.sizes() && x_in.dim() == 2 && rstd_in.numel() == x_in.size(0), "dy, x [N, H], rstd [N]");
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous(),
                   rstd = rstd_in.to(x.scalar_type()).contiguous();
  const int64_t rows = x.size(0), h = x.size(1);
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_backward", [&] {
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(),
                   *rp = rstd.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t a, int64_t b) {
      rms_norm_backward_rows(dyp + a * h, xp + a * h, wp, rp + a, dxp + a * h, b - a, h);
    });
  });
  return dx;
}

// gate, up: the same shape -> silu(gate) * up
at::Tensor swiglu_forward(const at::Tensor& g_in, const at::Tensor& u_in) {
  check_same(g_in, u_in, "gate and up must share a dtype");
  check(g_in.sizes() == u_in.sizes(), "gate and up must have the same shape");
  const at::Tensor g = g_in.contiguous(), u = u_in.contiguous();
  at::Tensor y = at::empty_like(g);
  const int64_t count = g.numel();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "swiglu", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *up = u.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, count, 32768, [&](int64_t a, int64_t b) { swiglu_rows(gp + a, up + a, yp + a, b - a); });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dy_in, const at::Tensor& g_in,
                                                   const at::Tensor& u_in) {
  check_same(dy_in, g_in, "dy and gate must share a dtype");
  check_same(g_in, u_in, "gate and up must share a dtype");
  check(dy_in.sizes() == g_in.sizes() && g_in.sizes() == u_in.sizes(), "dy, gate and up must have the same shape");
  const at::Tensor dy = dy_in.contiguous(), g = g_in.contiguous(), u = u_in.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const int64_t count = g.numel();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "swiglu_backward", [&] {
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(), *up = u.data_ptr<scalar_t>();
    scalar_t *dgp = dg.data_ptr<scalar_t>(), *dup = du.data_ptr<scalar_t>();
    at::parallel_for(0, count, 32768, [&](int64_t a, int64_t b) {
      swiglu_backward_rows(dyp + a, gp + a, up + a, dgp + a, dup + a, b - a);
    });
  });
  return {dg, du};
}

// x [N, heads, D] (contiguous), cos/sin [N, D] -> [N, heads, D]; backward=true applies the transpose.
at::Tensor rope_rows_op(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward) {
  check_same(x_in, cos_in, "x and cos must share a dtype");
  check_same(cos_in, sin_in, "cos and sin must share a dtype");
  check(x_in.dim() == 3 && x_in.size(2) % 2 == 0, "x [N, heads, D] with an even D");
  check(cos_in.dim() == 2 && cos_in.size(0) == x_in.size(0) && cos_in.size(1) == x_in.size(2) &&
            sin_in.sizes() == cos_in.sizes(),
        "cos and sin [N, D]");
  const at::Tensor x = x_in.contiguous(), c = cos_in.contiguous(), s = sin_in.contiguous();
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rope", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>(), *sp = s.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(heads * d), [&](int64_t a, int64_t b) {
      rope_rows(xp + a * heads * d, cp + a * d, sp + a * d, op + a * heads * d, b - a, heads, d, backward);
    });
  });
  return out;
}

// ---------------------------------------------------------------- autograd

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check(!weight.requires_grad(), "rms_norm's weight is frozen (no gradient for it)");
    const at::Tensor rows = x.reshape({-1, x.size(-1)});
    auto [y, rstd] = rms_norm_forward(rows, weight, eps);
    ctx->save_for_backward({rows, weight, rstd});
    return y.view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor dx = rms_norm_backward(grads[0].reshape(saved[0].sizes()), saved[0], saved[1], saved[2]);
    return {dx.view(grads[0].sizes()), at::Tensor(), at::Tensor()};
  }
};

struct SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up});
    return swiglu_forward(gate, up);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [dg, du] = swiglu_backward(grads[0], saved[0], saved[1]);
    return {dg, du};
  }
};

// q [B, H, L, D], k [B, KV, L, D] (any strides; the projections give transposed views of [B, L, heads, D]),
// cos/sin [B, L, D]; outputs keep the [B, L, heads, D] memory layout.
at::Tensor rope_heads(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, bool backward) {
  const at::Tensor rows = x.transpose(1, 2).reshape({-1, x.size(1), x.size(3)});
  return rope_rows_op(rows, c, s, backward).view({x.size(0), x.size(2), x.size(1), x.size(3)}).transpose(1, 2);
}

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check(!cos.requires_grad() && !sin.requires_grad(), "rope's cos and sin are frozen (no gradient for them)");
    check(q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && cos.size(0) == q.size(0) && cos.size(1) == q.size(2) &&
              k.size(2) == q.size(2),
          "q [B, H, L, D], k [B, KV, L, D] and cos/sin [B, L, D]");
    const at::Tensor c = cos.reshape({-1, cos.size(2)}), s = sin.reshape({-1, sin.size(2)});
    ctx->save_for_backward({c, s});
    return {rope_heads(q, c, s, false), rope_heads(k, c, s, false)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    variable_list out(4);
    for (int i = 0; i < 2; ++i)
      if (grads[i].defined()) out[i] = rope_heads(grads[i], saved[0], saved[1], true);
    return out;
  }
};

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RMSNormFunction::apply(x, weight, eps);
}
at::Tensor swiglu_op(const at::Tensor& gate, const at::Tensor& up) { return SwiGLUFunction::apply(gate, up); }
std::tuple<at::Tensor, at::Tensor> rope_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                           const at::Tensor& sin) {
  variable_list out = RopeFunction::apply(q, k, cos, sin);
  return {out[0], out[1]};
}

}  // namespace

// ---------------------------------------------------------------- frozen_linear
// y = x Wᵀ + b, dx = dy W (no dW, db: frozen), both through torch's oneDNN op mkldnn::_linear_pointwise with the
// weight packed once by mkldnn::_reorder_linear_weight: W for the forward, Wᵀ (contiguous, then packed) for the
// backward. Why: torch's CPU mm calls MKL, whose fp32 GEMMs at ~180 rows ran slower than oneDNN's packed ones
// on this project's AMD CPU (benchmarks/bench_student.py: 2.05x -> 2.16x PEFT's speed). fp32 only (the caller checks, and packs).

at::Tensor packed_matmul(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), c10::IValue("none"),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

struct FrozenLinearFunction : public torch::autograd::Function<FrozenLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& packed_t, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check(!packed.requires_grad() && !packed_t.requires_grad() && !(bias.has_value() && bias->requires_grad()),
          "frozen_linear's weight and bias are frozen (no gradient for them)");
    ctx->saved_data["packed_t"] = packed_t;
    return packed_matmul(x, packed, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {packed_matmul(grads[0], ctx->saved_data["packed_t"].toTensor(), std::nullopt), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor frozen_linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& packed_t,
                            const std::optional<at::Tensor>& bias) {
  return FrozenLinearFunction::apply(x, packed, packed_t, bias);
}

TORCH_LIBRARY_FRAGMENT(fastsoft, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("frozen_linear(Tensor x, Tensor packed, Tensor packed_t, Tensor? bias) -> Tensor");
}

// The Autograd key runs the C++ autograd functions above for CPU tensors (the only device implemented).
TORCH_LIBRARY_IMPL(fastsoft, Autograd, m) {
  m.impl("rms_norm", &rms_norm_op);
  m.impl("swiglu", &swiglu_op);
  m.impl("rope", &rope_op);
  m.impl("frozen_linear", &frozen_linear_op);
}

}  // namespace fastsoft
