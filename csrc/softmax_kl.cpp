// softmax_kl on CPU: fused lm_head matmul + streaming softmax + KL / cross-entropy, gradient for the
// hidden states only (W is frozen: no dW). Implements the row contract of
// fastsoft/ops/reference.py::softmax_kl_rows for the four teacher kinds, registered as
// fastsoft::softmax_kl_rows_{dense,sparse,hidden,compact} (and compact_filtered), and the reverse KL / JSD of dense and hidden teachers
// as fastsoft::softmax_kl_rows_divergence (two passes over the vocabulary: see divergence_rows).
//
// Work split: tasks of up to BN token rows run in parallel (at::parallel_for; MKL single-threaded
// inside); each task streams the vocabulary once, in tiles of BV columns, so scratch memory is
// O(threads * BN * (BV + H)) and [N, V] is never allocated. Logit tiles and the gradient sums are
// at::mm / addmm on tiles (MKL); the softmax maths runs in vectorisable loops compiled twice (AVX2+FMA
// and the baseline ISA) and picked at run time. Accumulation is fp32 (fp64 for fp64 hidden or
// lm_weight, the tests' ground truth); bf16/fp16 inputs are upcast per tile.
//
// One pass, flash-attention style: with running maxima m, the sums S = sum_v e^{z_v - m} and
// O = sum_v e^{z_v - m} W_v are rescaled by e^{m_old - m_new} whenever m grows, so at the end
// sum_v p_v W_v = O / S without a second pass or kept logits.
// - dense / hidden teachers: the same for the teacher's softmax q (its logits read from the cache,
//   or from the same GEMM as the student's for a hidden teacher: [h; h_t] @ W_tile^T), then
//   dh = (sum_v p_v W_v - sum_v q_v W_v) / T and KL = E_q[(a - m_a) - (z - m_z)] + log(S_z / S_a)
//   (no large terms cancel when q ~ p). Per token 3 GEMMs (dense) or 4 (hidden), against the
//   reference's 2 (3), which keeps a chunk of [C, V] logits instead.
// - sparse teachers: O sums only the vocabulary outside the row's ids (their columns are zeroed in
//   the tile), which gives the tail bucket exactly; the ids' own terms come from gathered W rows:
//   dh = [((sum w + r) / S - r / S_tail) O + sum_ids ((sum w + r) p_v - w_v) W_v] / T. 2 GEMMs.
// - compact teachers (wbar = sum q W, sum q log q): the sparse pass with no ids gives lse and O / S = sum p W;
//   KL = sum q log q - h . wbar / T + lse, dh = (O / S - wbar) / T. 2 GEMMs, no teacher read over V. With at most BN
//   rows the threads split the vocabulary instead (compact_rows_vocab_split).
//   Optional gradient filtering (softmax_kl_rows_compact_filtered): a tile's O GEMM is skipped when every row's
//   final mass there is provably tiny (see compact_rows); the skipped part's norm bound is returned per row.
// The loss and gradient formulas are those of fastsoft/ops/reference.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace fastsoft {
namespace {

// ---------------------------------------------------------------- constants and heuristics

constexpr int64_t BN = 256;  // token rows per task: GEMMs with M = 256 run near MKL's peak
constexpr int64_t BV = 256;  // vocab columns per tile: a [BV, H] fp32 W tile stays in L2

template <typename T>
constexpr T NEG_INF = -std::numeric_limits<T>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- vectorisable maths

// exp_acc (a vectorisable fp32 exp), cpu_has_avx2 and FS_AVX2_ATTR: vec_math.h.

template <typename T>
FS_INLINE T row_max(const T* x, int64_t n, T scale) {
  T mx = NEG_INF<T>;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i] * scale);
  return mx;
}

template <typename T>
FS_INLINE void scale_row(T* x, int64_t n, T scale) {
  if (scale == T(1)) return;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= scale;
}

// ---------------------------------------------------------------- tile kernels

template <typename T>
struct TwoSoftmaxStats {
  T m_z, s_z;     // running max and sum e^{z - m_z} of the student logits z
  T m_a, s_a, c;  // the same for the teacher logits a, and c = sum e^{a - m_a} ((a - m_a) - (z - m_z))
};

// Dense or hidden teacher, one tile: za = [z; e] [2 * rows, cols] holds the student's h W^T, and the
// teacher's logits are read from a (row stride lda; a may alias e); both are divided by T here
// (times inv_t). Leaves [e^{z - m_z}; e^{a - m_a}] in za, updates the online stats and gives each
// row's rescale factor in alpha.
template <typename T>
FS_INLINE void two_softmax_tile_impl(T* za, const T* a, int64_t lda, T inv_t, int64_t rows, int64_t cols,
                                     const uint8_t* keep, TwoSoftmaxStats<T>* st, T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = za + r * cols;
    T* er = za + (rows + r) * cols;
    alpha[r] = alpha[rows + r] = T(1);
    if (!keep[r]) {
      std::memset(zr, 0, sizeof(T) * cols);
      std::memset(er, 0, sizeof(T) * cols);
      continue;
    }
    const T* ar = a + r * lda;
    TwoSoftmaxStats<T>& s = st[r];
    scale_row(zr, cols, inv_t);
    const T mz = std::max(s.m_z, row_max(zr, cols, T(1)));
    const T ma = std::max(s.m_a, row_max(ar, cols, inv_t));
    T sa = 0, c = 0, sz = 0;
    if (ma != NEG_INF<T>) {  // else no teacher mass yet (log-probs of -inf): e = 0
#pragma omp simd reduction(+ : sa, c)
      for (int64_t i = 0; i < cols; ++i) {
        const T av = ar[i] * inv_t;
        const T e = exp_acc(av - ma);
        sa += e;
        c += e > T(0) ? e * ((av - ma) - (zr[i] - mz)) : T(0);  // q = 0 contributes 0, never 0 * -inf
        er[i] = e;
      }
    } else {
      std::memset(er, 0, sizeof(T) * cols);
    }
#pragma omp simd reduction(+ : sz)
    for (int64_t i = 0; i < cols; ++i) {
      zr[i] = exp_acc(zr[i] - mz);
      sz += zr[i];
    }
    if (s.s_a > T(0)) {  // the earlier terms of c, (a - m_a) - (z - m_z), move with the maxima
      const T shift = (ma - s.m_a) - (mz - s.m_z);
      alpha[rows + r] = exp_acc(s.m_a - ma);
      s.c = (s.c - shift * s.s_a) * alpha[rows + r];
      s.s_a *= alpha[rows + r];
    }
    s.s_a += sa, s.c += c;
    s.m_a = ma;
    alpha[r] = exp_acc(s.m_z - mz);
    s.s_z = s.s_z * alpha[r] + sz;
    s.m_z = mz;
  }
}

// Sparse teacher, one tile starting at vocab id v0: z = h W^T tile -> e^{z / T - m} in place with the
// columns of the row's ids zeroed (so the tile's GEMM accumulates the tail only); captures z / T at
// the ids, updates the running max m and tail sum, and gives each row's rescale factor in alpha.
template <typename T>
FS_INLINE void sparse_tile_impl(T* z, T inv_t, int64_t rows, int64_t cols, int64_t v0, const uint8_t* keep,
                                const int64_t* uid, const int64_t* ucount, int64_t kstride, int64_t* cursor, T* zu, T* m,
                                T* s_tail, T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = z + r * cols;
    alpha[r] = T(1);
    if (!keep[r]) {
      std::memset(zr, 0, sizeof(T) * cols);
      continue;
    }
    scale_row(zr, cols, inv_t);
    const T mn = std::max(m[r], row_max(zr, cols, T(1)));
    const int64_t* ids = uid + r * kstride;
    const int64_t first = cursor[r];
    int64_t last = first;
    for (; last < ucount[r] && ids[last] < v0 + cols; ++last) zu[r * kstride + last] = zr[ids[last] - v0];
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) zr[i] = exp_acc(zr[i] - mn);
    for (int64_t j = first; j < last; ++j) zr[ids[j] - v0] = T(0);
    T st = 0;
#pragma omp simd reduction(+ : st)
    for (int64_t i = 0; i < cols; ++i) st += zr[i];
    alpha[r] = exp_acc(m[r] - mn);
    s_tail[r] = s_tail[r] * alpha[r] + st;
    m[r] = mn;
    cursor[r] = last;
  }
}

// Each fp32 kernel is compiled for AVX2+FMA and for the baseline ISA and chosen once at run time (vec_math.h).

#define FS_PARAMS_sparse_tile(T)                                                                               \
  T *z, T inv_t, int64_t rows, int64_t cols, int64_t v0, const uint8_t *keep, const int64_t *uid,                 \
      const int64_t *ucount, int64_t kstride, int64_t *cursor, T *zu, T *m, T *s_tail, T *alpha
#define FS_ARGS_sparse_tile z, inv_t, rows, cols, v0, keep, uid, ucount, kstride, cursor, zu, m, s_tail, alpha

#define FS_PARAMS_two_softmax_tile(T) \
  T *za, const T *a, int64_t lda, T inv_t, int64_t rows, int64_t cols, const uint8_t *keep, TwoSoftmaxStats<T> *st, T *alpha
#define FS_ARGS_two_softmax_tile za, a, lda, inv_t, rows, cols, keep, st, alpha

#define FS_KERNEL(NAME)                                                                                            \
  void NAME##_base(FS_PARAMS_##NAME(float)) { NAME##_impl<float>(FS_ARGS_##NAME); }                                \
  FS_AVX2_ATTR void NAME##_avx2(FS_PARAMS_##NAME(float)) { NAME##_impl<float>(FS_ARGS_##NAME); }                   \
  void NAME(FS_PARAMS_##NAME(float)) {                                                                             \
    if (cpu_has_avx2()) NAME##_avx2(FS_ARGS_##NAME);                                                               \
    else NAME##_base(FS_ARGS_##NAME);                                                                              \
  }                                                                                                                \
  void NAME(FS_PARAMS_##NAME(double)) { NAME##_impl<double>(FS_ARGS_##NAME); }

FS_KERNEL(sparse_tile)
FS_KERNEL(two_softmax_tile)

// ---------------------------------------------------------------- host helpers

at::Tensor matrix(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// src in the compute dtype: src itself, or an upcast copy into buf (ATen's vectorised copy).
at::Tensor as_compute(const at::Tensor& src, const at::Tensor& buf) {
  if (src.scalar_type() == buf.scalar_type()) return src;
  at::Tensor dst = matrix(buf, src.size(0), src.size(1));
  dst.copy_(src);
  return dst;
}

// The W tile [bv, H] in the compute dtype: a view of W, or an upcast copy in a per-task buffer.
struct WeightTiles {
  const at::Tensor& weight;  // [V, H]
  at::Tensor buf;            // [BV * H] when W is not in the compute dtype

  WeightTiles(const at::Tensor& w, at::ScalarType acc) : weight(w) {
    if (w.scalar_type() != acc) buf = at::empty({BV * w.size(1)}, w.options().dtype(acc));
  }
  at::Tensor operator()(int64_t v0, int64_t bv) {
    if (!buf.defined()) return weight.narrow(0, v0, bv);
    at::Tensor tile = matrix(buf, bv, weight.size(1));
    tile.copy_(weight.narrow(0, v0, bv));
    return tile;
  }
};

// o[r] *= alpha[r] on the rows whose running max grew, so o keeps summing e^{x - m} W_v for the new m.
template <typename T>
void rescale_rows(at::Tensor& o, const T* alpha) {
  const int64_t rows = o.size(0), H = o.size(1);
  T* op = o.mutable_data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r)
    if (alpha[r] != T(1))
      for (int64_t j = 0; j < H; ++j) op[r * H + j] *= alpha[r];
}

struct Plan {
  int64_t bn, tasks;
};

// Tasks of at most BN rows, as many as a multiple of the thread count so that threads get equal work.
Plan plan_rows(int64_t n) {
  if (n == 0) return {1, 0};
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tasks = std::min(n, ceil_div(ceil_div(n, BN), threads) * threads);
  const int64_t bn = ceil_div(n, tasks);
  return {bn, ceil_div(n, bn)};
}

// ---------------------------------------------------------------- dense and hidden teachers

// Dense or hidden teacher, one pass over the vocabulary (flash style): the student's and the
// teacher's softmax-weighted sums of W rows are accumulated with their running maxima, and
// grad = sum_v p_v W_v - sum_v q_v W_v. A hidden teacher's logits come from the same GEMM as the
// student's ([h; h_t] @ W_tile^T); per token 3 GEMMs (dense) or 4 (hidden), no logits kept.
template <typename T>
void two_softmax_rows(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& teacher,
                      bool teacher_is_hidden, double temperature, const uint8_t* keep, bool need_grad, at::Tensor& loss,
                      at::Tensor& grad) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const T inv_t = T(1) / static_cast<T>(temperature);
  const bool teacher_direct = !teacher_is_hidden && teacher.scalar_type() == acc;
  const Plan plan = plan_rows(N);
  T* loss_out = loss.mutable_data_ptr<T>();

  at::parallel_for(0, plan.tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    const auto opts = hidden.options().dtype(acc);
    const int64_t bn = plan.bn;
    WeightTiles w_tile(weight, acc);
    // [h; h_t] for a hidden teacher (one GEMM gives both logits), h upcast when it is bf16/fp16, else h itself
    const bool copy_lhs = teacher_is_hidden || hidden.scalar_type() != acc;
    at::Tensor lhs_buf = copy_lhs ? at::empty({(teacher_is_hidden ? 2 : 1) * bn * H}, opts) : at::Tensor();
    at::Tensor za_buf = at::empty({2 * bn * BV}, opts);
    at::Tensor a_buf = teacher_is_hidden || teacher_direct ? at::Tensor() : at::empty({bn * BV}, opts);
    at::Tensor o_acc = need_grad ? at::empty({2 * bn * H}, opts) : at::Tensor();
    std::vector<TwoSoftmaxStats<T>> st(bn);
    std::vector<T> alpha(2 * bn);

    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t n0 = task * bn, m = std::min(bn, N - n0);
      const uint8_t* kp = keep + n0;
      at::Tensor lhs = hidden.narrow(0, n0, m);  // [m, H], or [2m, H] = [h; h_t] for a hidden teacher
      if (copy_lhs) {
        lhs = matrix(lhs_buf, teacher_is_hidden ? 2 * m : m, H);
        lhs.narrow(0, 0, m).copy_(hidden.narrow(0, n0, m));
        if (teacher_is_hidden) {
          lhs.narrow(0, m, m).copy_(teacher.narrow(0, n0, m));
          for (int64_t r = 0; r < m; ++r)
            if (!kp[r]) lhs[m + r].zero_();  // an ignored row's teacher is never trusted
        }
      }
      at::Tensor o = need_grad ? matrix(o_acc, 2 * m, H) : at::Tensor();  // [sum e^{z-m_z} W; sum e^{a-m_a} W]
      if (need_grad) o.zero_();
      std::fill(st.begin(), st.begin() + m, TwoSoftmaxStats<T>{NEG_INF<T>, T(0), NEG_INF<T>, T(0), T(0)});

      for (int64_t v0 = 0; v0 < V; v0 += BV) {
        const int64_t bv = std::min(BV, V - v0);
        const at::Tensor w_t = w_tile(v0, bv);
        at::Tensor za = matrix(za_buf, 2 * m, bv);
        const T* a;  // the tile's teacher logits before the 1/T, row stride lda
        int64_t lda;
        if (teacher_is_hidden) {
          at::mm_out(za, lhs, w_t.t());  // [2m, bv]: student and teacher logits
          a = za.const_data_ptr<T>() + m * bv, lda = bv;
        } else {
          at::Tensor z = za.narrow(0, 0, m);
          at::mm_out(z, lhs, w_t.t());  // [m, bv]
          if (teacher_direct) {
            a = teacher.const_data_ptr<T>() + n0 * V + v0, lda = V;
          } else {
            at::Tensor a_mat = matrix(a_buf, m, bv);
            a_mat.copy_(teacher.narrow(0, n0, m).narrow(1, v0, bv));
            a = a_mat.const_data_ptr<T>(), lda = bv;
          }
        }
        two_softmax_tile(za.mutable_data_ptr<T>(), a, lda, inv_t, m, bv, kp, st.data(), alpha.data());
        if (!need_grad) continue;
        rescale_rows(o, alpha.data());
        o.addmm_(za, w_t);  // [2m, H] += [2m, bv] @ [bv, H]
      }

      for (int64_t r = 0; r < m; ++r) {
        // KL = E_q[(a - lse_a) - (z - lse_z)] with lse = m + log s: no large terms cancel when q ~ p
        const TwoSoftmaxStats<T>& s = st[r];
        loss_out[n0 + r] = kp[r] ? s.c / s.s_a + std::log(s.s_z / s.s_a) : T(0);
      }
      if (!need_grad) continue;
      T* op = o.mutable_data_ptr<T>();
      for (int64_t r = 0; r < m; ++r) {
        const T cz = kp[r] ? inv_t / st[r].s_z : T(0), ca = kp[r] ? inv_t / st[r].s_a : T(0);
        for (int64_t j = 0; j < H; ++j) op[r * H + j] = op[r * H + j] * cz - op[(m + r) * H + j] * ca;
      }
      grad.narrow(0, n0, m).copy_(o.narrow(0, 0, m));
    }
  });
}

// ---------------------------------------------------------------- sparse teachers

template <typename T>
T xlogy(T x, T y) { return x == T(0) ? T(0) : x * std::log(y); }

template <typename T>
void sparse_rows(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& probs,
                 const at::Tensor& tail, double temperature, const uint8_t* keep, bool need_grad, at::Tensor& loss,
                 at::Tensor& grad) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0), K = ids.size(1);
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const T inv_t = T(1) / static_cast<T>(temperature);
  const Plan plan = plan_rows(N);
  const int64_t* id_p = ids.const_data_ptr<int64_t>();  // int64 [N, K], checked in range on kept rows
  const T* w_p = probs.const_data_ptr<T>();            // [N, K] in the compute dtype
  const T* tail_p = tail.defined() ? tail.const_data_ptr<T>() : nullptr;
  T* loss_out = loss.mutable_data_ptr<T>();

  at::parallel_for(0, plan.tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    const auto opts = hidden.options().dtype(acc);
    const int64_t bn = plan.bn;
    WeightTiles w_tile(weight, acc);
    at::Tensor h_buf = at::empty({hidden.scalar_type() == acc ? 0 : bn * H}, opts);  // h upcast if bf16/fp16
    at::Tensor z_buf = at::empty({bn * BV}, opts);
    // the tail sum accumulates in the gradient rows themselves when they are in the compute dtype
    at::Tensor o_buf = need_grad && grad.scalar_type() != acc ? at::empty({bn * H}, opts) : at::Tensor();
    std::vector<int64_t> uid(bn * K), ucount(bn), cursor(bn);
    std::vector<T> wu(bn * K), zu(bn * K), m(bn), s_tail(bn), alpha(bn), sum_w(bn), xlogx(bn);
    std::vector<std::pair<int64_t, T>> pairs(K);

    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t n0 = task * bn, rows = std::min(bn, N - n0);
      const uint8_t* kp = keep + n0;
      const at::Tensor h_mat = as_compute(hidden.narrow(0, n0, rows), h_buf);
      for (int64_t r = 0; r < rows; ++r) {
        m[r] = NEG_INF<T>, s_tail[r] = T(0), cursor[r] = 0, ucount[r] = 0, sum_w[r] = T(0), xlogx[r] = T(0);
        if (!kp[r]) continue;
        // The row's ids sorted, duplicates merged: the set of ids and the summed weight of each.
        for (int64_t k = 0; k < K; ++k) {
          const T w = w_p[(n0 + r) * K + k];
          pairs[k] = {id_p[(n0 + r) * K + k], w};
          sum_w[r] += w, xlogx[r] += xlogy(w, w);
        }
        std::sort(pairs.begin(), pairs.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
        int64_t u = -1;
        for (int64_t k = 0; k < K; ++k) {
          if (u < 0 || uid[r * K + u] != pairs[k].first) uid[r * K + ++u] = pairs[k].first, wu[r * K + u] = T(0);
          wu[r * K + u] += pairs[k].second;
        }
        ucount[r] = u + 1;
      }
      at::Tensor o;  // [rows, H]: sum_{v not in ids} e^{z_v - m} W_v
      if (need_grad) {
        o = o_buf.defined() ? matrix(o_buf, rows, H) : grad.narrow(0, n0, rows);
        o.zero_();
      }

      for (int64_t v0 = 0; v0 < V; v0 += BV) {
        const int64_t bv = std::min(BV, V - v0);
        const at::Tensor w_t = w_tile(v0, bv);
        at::Tensor z = matrix(z_buf, rows, bv);
        at::mm_out(z, h_mat, w_t.t());
        sparse_tile(z.mutable_data_ptr<T>(), inv_t, rows, bv, v0, kp, uid.data(), ucount.data(), K, cursor.data(), zu.data(),
                    m.data(), s_tail.data(), alpha.data());
        if (!need_grad) continue;
        rescale_rows(o, alpha.data());
        o.addmm_(z, w_t);  // tail: sum_{v not in ids} e^{z_v - m} W_v
      }

      T* op = need_grad ? o.mutable_data_ptr<T>() : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        if (!kp[r]) {
          loss_out[n] = T(0);
          if (need_grad) std::fill(op + r * H, op + (r + 1) * H, T(0));
          continue;
        }
        const T* zr = zu.data() + r * K;
        const T* wr = wu.data() + r * K;
        const int64_t* ur = uid.data() + r * K;
        T s_ids = 0;
        for (int64_t u = 0; u < ucount[r]; ++u) s_ids += std::exp(zr[u] - m[r]);
        const T s_all = s_tail[r] + s_ids;
        const T lse = m[r] + std::log(s_all);
        const T rt = tail_p ? tail_p[n] : T(0);
        const bool has_tail = rt > T(0);
        T l = xlogx[r];
        for (int64_t u = 0; u < ucount[r]; ++u) l -= wr[u] * (zr[u] - lse);
        if (has_tail) l += xlogy(rt, rt) - rt * (std::log(s_tail[r]) - std::log(s_all));  // log P_tail, no 1 - sum
        loss_out[n] = l;
        if (!need_grad) continue;
        // dL/dz_v = (sum w + r) p_v - w_v [v in ids] - (r / P_tail) p_v [v not in ids]
        const T mass = sum_w[r] + rt;
        T* g = op + r * H;
        const T c_tail = mass / s_all - (has_tail ? rt / s_tail[r] : T(0));
        for (int64_t j = 0; j < H; ++j) g[j] *= c_tail;
        // W rows of the ids in the compute dtype (gathered and upcast by ATen when W is bf16/fp16).
        const bool direct = weight.scalar_type() == acc;
        const at::Tensor w_ids =
            direct ? at::Tensor() : weight.index_select(0, at::from_blob(const_cast<int64_t*>(ur), {ucount[r]}, at::kLong)).to(acc);
        for (int64_t u = 0; u < ucount[r]; ++u) {
          const T coef = mass * std::exp(zr[u] - lse) - wr[u];
          const T* w_row = direct ? weight.const_data_ptr<T>() + ur[u] * H : w_ids.const_data_ptr<T>() + u * H;
          for (int64_t j = 0; j < H; ++j) g[j] += coef * w_row[j];
        }
      }
      if (need_grad) {
        o.mul_(inv_t);
        if (o_buf.defined()) grad.narrow(0, n0, rows).copy_(o);
      }
    }
  });
}

// ---------------------------------------------------------------- compact teachers

// Compact teacher (wbar = sum_v q_v W_v, nq = sum_v q_v log q_v, built at this temperature): the loss is
// cross-entropy-shaped, KL = nq - h . wbar / T + lse, and dh = (sum_v p_v W_v - wbar) / T. One pass over
// the vocabulary with the sparse tile kernel and no ids (its "tail" is the whole vocabulary): running max m,
// S = sum e^{z - m} and O = sum e^{z - m} W_v. 2 GEMMs a token, no teacher read over the vocabulary.
//
// Filtering (wnorm = ||W_v|| [V] given, scale >= 0): after a tile's exponentials e = e^{z - m}, the final mass of
// the tile in row r, sum_tile p = sum_tile e * e^{m - lse}, is bounded with what is known so far: lse >= m + log S
// (the running normaliser, this tile included) and lse >= h . wbar / T - sum q log q (KL >= 0). The tile's GEMM is
// skipped when every kept row's bound times the tile's max ||W_v|| is at most scale * bv; the skipped
// sum_v e_v ||W_v|| is kept per row in the same running frame as O and S, so at the end
// dropped[r] = D / (S T) >= ||what the skipped tiles would have added to dh|| exactly (triangle inequality).
template <typename T>
void compact_rows(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& wbar,
                  const at::Tensor& neg_entropy, double temperature, const uint8_t* keep, bool need_grad,
                  at::Tensor& loss, at::Tensor& grad, const T* wnorm = nullptr, T scale = T(0),
                  T* dropped = nullptr, int64_t* skipped_products = nullptr) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const T inv_t = T(1) / static_cast<T>(temperature);
  const Plan plan = plan_rows(N);
  const T* wbar_p = wbar.const_data_ptr<T>();  // [N, H] in the compute dtype
  const T* nq_p = neg_entropy.const_data_ptr<T>();
  T* loss_out = loss.mutable_data_ptr<T>();

  at::parallel_for(0, plan.tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    const auto opts = hidden.options().dtype(acc);
    const int64_t bn = plan.bn;
    WeightTiles w_tile(weight, acc);
    at::Tensor h_buf = at::empty({hidden.scalar_type() == acc ? 0 : bn * H}, opts);  // h upcast if bf16/fp16
    at::Tensor z_buf = at::empty({bn * BV}, opts);
    // the sum accumulates in the gradient rows themselves when they are in the compute dtype
    at::Tensor o_buf = need_grad && grad.scalar_type() != acc ? at::empty({bn * H}, opts) : at::Tensor();
    std::vector<int64_t> ucount(bn, 0), cursor(bn, 0);
    std::vector<T> m(bn), s(bn), alpha(bn), lse_low(bn), skipped_sum(bn);
    std::vector<double> dots(bn);
    const bool filter = need_grad && wnorm != nullptr;
    int64_t task_skipped = 0;

    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t n0 = task * bn, rows = std::min(bn, N - n0);
      const uint8_t* kp = keep + n0;
      const at::Tensor h_mat = as_compute(hidden.narrow(0, n0, rows), h_buf);
      const T* hp = h_mat.const_data_ptr<T>();
      std::fill(m.begin(), m.begin() + rows, NEG_INF<T>);
      std::fill(s.begin(), s.begin() + rows, T(0));
      std::fill(skipped_sum.begin(), skipped_sum.begin() + rows, T(0));
      for (int64_t r = 0; r < rows; ++r) {
        // h . wbar and the sum of the O(|z|) terms in fp64: only the logits' own rounding is left in the loss
        double dot = 0;
        if (kp[r])
          for (int64_t j = 0; j < H; ++j) dot += static_cast<double>(hp[r * H + j]) * wbar_p[(n0 + r) * H + j];
        dots[r] = dot;
        lse_low[r] = static_cast<T>(dot / temperature - static_cast<double>(nq_p[n0 + r]));  // KL >= 0
      }
      at::Tensor o;  // [rows, H]: sum_v e^{z_v - m} W_v
      if (need_grad) {
        o = o_buf.defined() ? matrix(o_buf, rows, H) : grad.narrow(0, n0, rows);
        o.zero_();
      }

      for (int64_t v0 = 0; v0 < V; v0 += BV) {
        const int64_t bv = std::min(BV, V - v0);
        const at::Tensor w_t = w_tile(v0, bv);
        at::Tensor z = matrix(z_buf, rows, bv);
        at::mm_out(z, h_mat, w_t.t());
        T* zp = z.mutable_data_ptr<T>();
        sparse_tile(zp, inv_t, rows, bv, v0, kp, nullptr, ucount.data(), 0, cursor.data(), nullptr, m.data(), s.data(),
                    alpha.data());
        if (!need_grad) continue;
        rescale_rows(o, alpha.data());
        if (filter) {
          T w_max = 0;
          for (int64_t i = 0; i < bv; ++i) w_max = std::max(w_max, wnorm[v0 + i]);
          bool skip = true;
          for (int64_t r = 0; r < rows && skip; ++r) {
            if (!kp[r]) continue;
            T st = 0;
#pragma omp simd reduction(+ : st)
            for (int64_t i = 0; i < bv; ++i) st += zp[r * bv + i];
            // final mass <= st e^{m - lse}, with lse >= max(m + log S, lse_low)
            const T mass = std::min(st / s[r], st * std::exp(m[r] - lse_low[r]));
            skip = mass * w_max <= scale * static_cast<T>(bv);
          }
          for (int64_t r = 0; r < rows; ++r) skipped_sum[r] *= alpha[r];
          if (skip) {
            for (int64_t r = 0; r < rows; ++r) {
              if (!kp[r]) continue;
              T acc_r = 0;
#pragma omp simd reduction(+ : acc_r)
              for (int64_t i = 0; i < bv; ++i) acc_r += zp[r * bv + i] * wnorm[v0 + i];
              skipped_sum[r] += acc_r;
            }
            task_skipped += rows * bv;
            continue;
          }
        }
        o.addmm_(z, w_t);
      }

      T* op = need_grad ? o.mutable_data_ptr<T>() : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        if (!kp[r]) {  // an ignored row's target is never read (it may hold NaN)
          loss_out[n] = T(0);
          if (need_grad) std::fill(op + r * H, op + (r + 1) * H, T(0));
          if (filter) dropped[n] = T(0);
          continue;
        }
        const T* wr = wbar_p + n * H;
        const double dot = dots[r];
        if (filter) dropped[n] = skipped_sum[r] / s[r] * inv_t;
        const double lse = static_cast<double>(m[r]) + std::log(static_cast<double>(s[r]));
        loss_out[n] = static_cast<T>(static_cast<double>(nq_p[n]) - dot / temperature + lse);
        if (!need_grad) continue;
        T* g = op + r * H;
        const T c = inv_t / s[r];
        for (int64_t j = 0; j < H; ++j) g[j] = g[j] * c - wr[j] * inv_t;
      }
      if (need_grad && o_buf.defined()) grad.narrow(0, n0, rows).copy_(o);
    }
    if (skipped_products != nullptr) __atomic_fetch_add(skipped_products, task_skipped, __ATOMIC_RELAXED);
  });
}

// ---------------------------------------------------------------- reverse KL and JSD (dense and hidden teachers)

// Neither is linear in the teacher and both need the final normalisers per entry (kernels/softmax_kl.md §2b), so
// each row block makes two passes over the vocabulary: pass 1 the online (max, sum) of the student's and the
// teacher's logits; pass 2 recomputes the tile GEMMs (CCE-style), forms log p, log q (and log m) exactly, sums the
// loss and accumulates [sum p W; sum p (g - centre) W] with one GEMM per tile. At the end
// dh = c (sum p (g - centre) W - (sum p (g - centre) / sum p) sum p W) / T with c = 1 (reverse) or 1 - beta (jsd). Per token 4 GEMMs
// (dense) or 6 (hidden: the teacher's logits are recomputed in both passes); no logits kept.
// A reverse KL with p_v > 0 = q_v is +inf (returned as is) and its row's gradient is 0: never NaN.
template <typename T>
void divergence_rows(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& teacher,
                     bool teacher_is_hidden, bool jsd, double beta_d, double temperature, const uint8_t* keep,
                     bool need_grad, at::Tensor& loss, at::Tensor& grad) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const T inv_t = T(1) / static_cast<T>(temperature);
  const T beta = static_cast<T>(beta_d), log_beta = static_cast<T>(std::log(beta_d)),
          log_1mb = static_cast<T>(std::log1p(-beta_d));
  const T inf = std::numeric_limits<T>::infinity();
  const Plan plan = plan_rows(N);
  T* loss_out = loss.mutable_data_ptr<T>();

  at::parallel_for(0, plan.tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    const auto opts = hidden.options().dtype(acc);
    const int64_t bn = plan.bn;
    WeightTiles w_tile(weight, acc);
    at::Tensor lhs_buf = at::empty({2 * bn * H}, opts);  // [h; h_t] (hidden teacher) or h, in the compute dtype
    at::Tensor za_buf = at::empty({2 * bn * BV}, opts);  // [z; a] logits of a tile
    at::Tensor pg_buf = at::empty({2 * bn * BV}, opts);  // [p; p g] of a tile, the gradient GEMM's left side
    at::Tensor o_acc = need_grad ? at::empty({2 * bn * H}, opts) : at::Tensor();
    std::vector<T> m_z(bn), s_z(bn), m_a(bn), s_a(bn), c_z(bn), sum_p(bn), sum_pg(bn), sum_pgc(bn), sum_tq(bn);
    std::vector<uint8_t> infinite(bn), no_centre(bn);

    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t n0 = task * bn, m = std::min(bn, N - n0);
      const uint8_t* kp = keep + n0;
      const int64_t lrows = teacher_is_hidden ? 2 * m : m;
      at::Tensor lhs = matrix(lhs_buf, lrows, H);
      lhs.narrow(0, 0, m).copy_(hidden.narrow(0, n0, m));
      if (teacher_is_hidden) lhs.narrow(0, m, m).copy_(teacher.narrow(0, n0, m));
      for (int64_t r = 0; r < m; ++r)
        if (!kp[r]) {  // an ignored row is never trusted (its teacher may be NaN)
          lhs[r].zero_();
          if (teacher_is_hidden) lhs[m + r].zero_();
        }

      // The tile's scaled logits: z in rows [0, m) and a in rows [m, 2m) of za.
      auto logits = [&](int64_t v0, int64_t bv, const at::Tensor& w_t) {
        at::Tensor za = matrix(za_buf, 2 * m, bv);
        if (teacher_is_hidden) {
          at::mm_out(za, lhs, w_t.t());
        } else {
          at::Tensor z = za.narrow(0, 0, m);
          at::mm_out(z, lhs, w_t.t());
          za.narrow(0, m, m).copy_(teacher.narrow(0, n0, m).narrow(1, v0, bv));
        }
        T* p = za.mutable_data_ptr<T>();
        for (int64_t r = 0; r < m; ++r) {
          T* zr = p + r * bv;
          T* ar = p + (m + r) * bv;
          if (!kp[r]) {
            std::fill(zr, zr + bv, T(0));
            std::fill(ar, ar + bv, T(0));
            continue;
          }
          for (int64_t i = 0; i < bv; ++i) zr[i] *= inv_t, ar[i] *= inv_t;
        }
        return za;
      };

      // pass 1: the maxima and sums of both softmaxes
      for (int64_t r = 0; r < m; ++r) m_z[r] = m_a[r] = NEG_INF<T>, s_z[r] = s_a[r] = c_z[r] = T(0), no_centre[r] = 0;
      for (int64_t v0 = 0; v0 < V; v0 += BV) {
        const int64_t bv = std::min(BV, V - v0);
        const at::Tensor za = logits(v0, bv, w_tile(v0, bv));
        const T* p = za.const_data_ptr<T>();
        for (int64_t r = 0; r < m; ++r) {
          if (!kp[r]) continue;
          const T* zr = p + r * bv;
          const T* ar = p + (m + r) * bv;
          T mz = m_z[r], ma = m_a[r];
          for (int64_t i = 0; i < bv; ++i) mz = std::max(mz, zr[i]), ma = std::max(ma, ar[i]);
          T sz = 0, sa = 0, c = 0;
          for (int64_t i = 0; i < bv; ++i) {
            const T e = std::exp(zr[i] - mz);
            sz += e;
            if (!jsd && e > T(0)) {  // the reverse KL's centre (see below); p > 0 = q makes the row infinite
              if (ar[i] == NEG_INF<T>) no_centre[r] = 1;
              else c += e * ((zr[i] - mz) - (ar[i] - ma));
            }
          }
          if (ma != NEG_INF<T>)
            for (int64_t i = 0; i < bv; ++i) sa += std::exp(ar[i] - ma);
          if (!jsd && !no_centre[r]) {  // earlier terms of c, (z - m_z) - (a - m_a), move with the maxima
            c_z[r] = s_z[r] > T(0) ? (c_z[r] - ((mz - m_z[r]) - (ma - m_a[r])) * s_z[r]) * std::exp(m_z[r] - mz) + c : c;
          }
          s_z[r] = s_z[r] * std::exp(m_z[r] - mz) + sz;  // m_z = -inf at first: exp(-inf) = 0
          if (ma != NEG_INF<T>) s_a[r] = (s_a[r] > T(0) ? s_a[r] * std::exp(m_a[r] - ma) : T(0)) + sa;
          m_z[r] = mz, m_a[r] = ma;
        }
      }
      // log-normalisers split as (max, log sum): log p = (z - m_z) - log s_z, like log_softmax
      // centre: pass 2 accumulates p (g - centre) W, so that the final dh = c (sum p (g - centre) W - (mean g - centre)
      // sum p W) does not cancel two large sums. Reverse KL: centre = its loss from the online form
      // L = c_z / s_z + log s_a - log s_z (kernels/softmax_kl.md §2b); JSD: g <= -log(1 - beta) is small, centre 0.
      std::vector<T> ls_z(m), ls_a(m), centre(m, T(0));
      for (int64_t r = 0; r < m; ++r) {
        ls_z[r] = std::log(s_z[r]), ls_a[r] = std::log(s_a[r]);
        if (!jsd && kp[r] && !no_centre[r]) centre[r] = c_z[r] / s_z[r] + ls_a[r] - ls_z[r];
      }

      // pass 2: the loss terms and [sum p W; sum p g W]
      at::Tensor o = need_grad ? matrix(o_acc, 2 * m, H) : at::Tensor();
      if (need_grad) o.zero_();
      for (int64_t r = 0; r < m; ++r) sum_p[r] = sum_pg[r] = sum_pgc[r] = sum_tq[r] = T(0), infinite[r] = 0;
      for (int64_t v0 = 0; v0 < V; v0 += BV) {
        const int64_t bv = std::min(BV, V - v0);
        const at::Tensor w_t = w_tile(v0, bv);
        const at::Tensor za = logits(v0, bv, w_t);
        const T* p = za.const_data_ptr<T>();
        at::Tensor pg = matrix(pg_buf, 2 * m, bv);
        T* pgp = pg.mutable_data_ptr<T>();
        for (int64_t r = 0; r < m; ++r) {
          T* pr = pgp + r * bv;
          T* gr = pgp + (m + r) * bv;
          if (!kp[r]) {
            std::fill(pr, pr + bv, T(0));
            std::fill(gr, gr + bv, T(0));
            continue;
          }
          const T* zr = p + r * bv;
          const T* ar = p + (m + r) * bv;
          T sp = 0, spg = 0, spgc = 0, stq = 0;
          const T cr = centre[r];
          bool inf_row = false;
          for (int64_t i = 0; i < bv; ++i) {
            const T lp = (zr[i] - m_z[r]) - ls_z[r];
            const T lq = ar[i] == NEG_INF<T> ? NEG_INF<T> : (ar[i] - m_a[r]) - ls_a[r];
            const T pv = std::exp(lp);
            T g = T(0);
            if (jsd) {
              const T x = log_beta + lq, y = log_1mb + lp;  // log m = logaddexp(x, y), y finite
              const T hi = std::max(x, y);
              const T lm = hi + std::log1p(std::exp(std::min(x, y) - hi));
              if (pv > T(0)) g = lp - lm;
              const T qv = std::exp(lq);
              if (qv > T(0)) stq += qv * (lq - lm);
            } else if (pv > T(0)) {
              if (lq == NEG_INF<T>) inf_row = true;  // p > 0 = q: the loss is +inf; g kept finite here
              else g = lp - lq;
            }
            pr[i] = pv;
            gr[i] = pv > T(0) ? pv * (g - cr) : T(0);
            sp += pv, spg += pv * g, spgc += gr[i];
          }
          sum_p[r] += sp, sum_pg[r] += spg, sum_pgc[r] += spgc, sum_tq[r] += stq;
          if (inf_row) infinite[r] = 1;
        }
        if (need_grad) o.addmm_(pg, w_t);  // [2m, H] += [2m, bv] @ [bv, H]
      }

      for (int64_t r = 0; r < m; ++r) {
        T l = jsd ? beta * sum_tq[r] + (T(1) - beta) * sum_pg[r] : sum_pg[r];
        if (infinite[r]) l = inf;
        loss_out[n0 + r] = kp[r] ? l : T(0);
      }
      if (!need_grad) continue;
      T* op = o.mutable_data_ptr<T>();
      for (int64_t r = 0; r < m; ++r) {
        const bool zero = !kp[r] || infinite[r];
        const T mean_g = zero ? T(0) : sum_pgc[r] / sum_p[r];  // mean of g - centre
        const T c = zero ? T(0) : (jsd ? T(1) - beta : T(1)) * inv_t;
        for (int64_t j = 0; j < H; ++j) op[r * H + j] = c * (op[(m + r) * H + j] - mean_g * op[r * H + j]);
      }
      grad.narrow(0, n0, m).copy_(o.narrow(0, 0, m));
    }
  });
}

// ---------------------------------------------------------------- entry points

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastsoft softmax_kl (C++): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fastsoft softmax_kl (C++): ", name, " must be contiguous");
}

void check_float(const at::Tensor& t, const char* name) {
  check_input(t, name);
  TORCH_CHECK(is_float(t), "fastsoft softmax_kl (C++): ", name, " must be fp32, fp64, bf16 or fp16, got ", t.scalar_type());
}

// Checks hidden, lm_weight, temperature and token weights; returns the keep mask (token_weight != 0).
std::vector<uint8_t> check_common(const at::Tensor& hidden, const at::Tensor& weight, double temperature,
                                  const std::optional<at::Tensor>& token_weight) {
  check_float(hidden, "hidden");
  check_float(weight, "lm_weight");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fastsoft softmax_kl (C++): needs hidden [N, H] and lm_weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "fastsoft softmax_kl (C++): lm_weight has an empty vocabulary");
  TORCH_CHECK(temperature > 0, "fastsoft softmax_kl (C++): temperature must be positive, got ", temperature);
  const int64_t N = hidden.size(0);
  std::vector<uint8_t> keep(N, 1);
  if (token_weight.has_value()) {
    const at::Tensor& tw = *token_weight;
    check_input(tw, "token_weight");
    TORCH_CHECK(tw.dim() == 1 && tw.size(0) == N, "fastsoft softmax_kl (C++): token_weight must have shape [", N,
                "], got ", tw.sizes());
    TORCH_CHECK(!tw.is_complex(), "fastsoft softmax_kl (C++): token_weight must be real");
    const at::Tensor nz = tw.ne(0);
    const bool* p = nz.const_data_ptr<bool>();
    for (int64_t i = 0; i < N; ++i) keep[i] = p[i];
  }
  return keep;
}

at::ScalarType compute_dtype(const at::Tensor& hidden, const at::Tensor& weight) {
  return hidden.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> outputs(const at::Tensor& hidden, at::ScalarType acc, bool need_grad) {
  at::Tensor loss = at::zeros({hidden.size(0)}, hidden.options().dtype(acc));
  at::Tensor grad = need_grad ? at::zeros_like(hidden) : at::empty({0}, hidden.options());
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> run_two_softmax(const at::Tensor& hidden, const at::Tensor& lm_weight,
                                                   const at::Tensor& teacher, bool teacher_is_hidden, double temperature,
                                                   const std::vector<uint8_t>& keep, bool need_grad) {
  const at::ScalarType acc = compute_dtype(hidden, lm_weight);
  auto [loss, grad] = outputs(hidden, acc, need_grad);
  if (hidden.size(0) == 0) return {loss, grad};
  if (acc == at::kDouble)
    two_softmax_rows<double>(hidden, lm_weight, teacher, teacher_is_hidden, temperature, keep.data(), need_grad, loss, grad);
  else
    two_softmax_rows<float>(hidden, lm_weight, teacher, teacher_is_hidden, temperature, keep.data(), need_grad, loss, grad);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_rows_dense(const at::Tensor& hidden, const at::Tensor& lm_weight,
                                                         const at::Tensor& teacher, double temperature,
                                                         const std::optional<at::Tensor>& token_weight, bool need_grad) {
  const auto keep = check_common(hidden, lm_weight, temperature, token_weight);
  check_float(teacher, "teacher");
  TORCH_CHECK(teacher.dim() == 2 && teacher.size(0) == hidden.size(0) && teacher.size(1) == lm_weight.size(0),
              "fastsoft softmax_kl (C++): a dense teacher must have shape [N, V] = [", hidden.size(0), ", ",
              lm_weight.size(0), "], got ", teacher.sizes());
  return run_two_softmax(hidden, lm_weight, teacher, false, temperature, keep, need_grad);
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_rows_hidden(const at::Tensor& hidden, const at::Tensor& lm_weight,
                                                          const at::Tensor& teacher_hidden, double temperature,
                                                          const std::optional<at::Tensor>& token_weight,
                                                          bool need_grad) {
  const auto keep = check_common(hidden, lm_weight, temperature, token_weight);
  check_float(teacher_hidden, "teacher_hidden");
  TORCH_CHECK(teacher_hidden.sizes() == hidden.sizes(),
              "fastsoft softmax_kl (C++): teacher hidden states must have the shape of hidden ", hidden.sizes(), ", got ",
              teacher_hidden.sizes());
  return run_two_softmax(hidden, lm_weight, teacher_hidden, true, temperature, keep, need_grad);
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_rows_sparse(const at::Tensor& hidden, const at::Tensor& lm_weight,
                                                          const at::Tensor& ids, const at::Tensor& probs,
                                                          const std::optional<at::Tensor>& tail, double temperature,
                                                          const std::optional<at::Tensor>& token_weight,
                                                          bool need_grad) {
  const auto keep = check_common(hidden, lm_weight, temperature, token_weight);
  check_input(ids, "ids");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "fastsoft softmax_kl (C++): ids must be int32 or int64, got ", ids.scalar_type());
  check_float(probs, "probs");
  const int64_t N = hidden.size(0), V = lm_weight.size(0);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == N && probs.sizes() == ids.sizes(),
              "fastsoft softmax_kl (C++): ids and probs must both have shape [N, K] with N = ", N, ", got ",
              ids.sizes(), " and ", probs.sizes());
  if (tail.has_value()) {
    check_float(*tail, "tail");
    TORCH_CHECK(tail->dim() == 1 && tail->size(0) == N, "fastsoft softmax_kl (C++): tail must have shape [", N,
                "], got ", tail->sizes());
  }
  const at::ScalarType acc = compute_dtype(hidden, lm_weight);
  auto [loss, grad] = outputs(hidden, acc, need_grad);
  if (N == 0) return {loss, grad};
  const at::Tensor ids64 = ids.to(at::kLong);
  const int64_t K = ids.size(1);
  const int64_t* ip = ids64.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    if (!keep[n]) continue;  // an ignored row's ids may be padding
    for (int64_t k = 0; k < K; ++k)
      TORCH_CHECK(ip[n * K + k] >= 0 && ip[n * K + k] < V, "fastsoft softmax_kl (C++): id ", ip[n * K + k],
                  " in row ", n, " is outside the vocabulary [0, ", V, ")");
  }
  const at::Tensor w = probs.to(acc);
  const at::Tensor r = tail.has_value() ? tail->to(acc) : at::Tensor();
  if (acc == at::kDouble) sparse_rows<double>(hidden, lm_weight, ids64, w, r, temperature, keep.data(), need_grad, loss, grad);
  else sparse_rows<float>(hidden, lm_weight, ids64, w, r, temperature, keep.data(), need_grad, loss, grad);
  return {loss, grad};
}

// Compact teacher, few rows (at most BN, as in a student step): the vocabulary is split among the threads
// instead of the rows. Each split streams its share of the tiles with all N rows (GEMMs with M = N, not N / threads;
// W read once, not once a thread) and keeps its own running max, sum and O; the splits are merged as tiles are
// (rescaled by e^{m_split - m}). The same maths as compact_rows; only the order of the sums differs.
template <typename T>
void compact_rows_vocab_split(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& wbar,
                              const at::Tensor& neg_entropy, double temperature, const uint8_t* keep, bool need_grad,
                              int64_t splits, at::Tensor& loss, at::Tensor& grad) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0), tiles = ceil_div(V, BV);
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const auto opts = hidden.options().dtype(acc);
  const T inv_t = T(1) / static_cast<T>(temperature);
  const at::Tensor h_mat = hidden.scalar_type() == acc ? hidden : hidden.to(acc);
  std::vector<T> m_all(splits * N, NEG_INF<T>), s_all(splits * N, T(0));
  at::Tensor o_all = need_grad ? at::zeros({splits, N, H}, opts) : at::Tensor();

  at::parallel_for(0, splits, 1, [&](int64_t sp_begin, int64_t sp_end) {
    WeightTiles w_tile(weight, acc);
    at::Tensor z_buf = at::empty({N * BV}, opts);
    std::vector<int64_t> ucount(N, 0), cursor(N, 0);
    std::vector<T> alpha(N);
    for (int64_t sp = sp_begin; sp < sp_end; ++sp) {
      T* m = m_all.data() + sp * N;
      T* s = s_all.data() + sp * N;
      at::Tensor o = need_grad ? o_all.select(0, sp) : at::Tensor();
      for (int64_t tile = sp * tiles / splits; tile < (sp + 1) * tiles / splits; ++tile) {
        const int64_t v0 = tile * BV, bv = std::min(BV, V - v0);
        const at::Tensor w_t = w_tile(v0, bv);
        at::Tensor z = matrix(z_buf, N, bv);
        at::mm_out(z, h_mat, w_t.t());
        sparse_tile(z.mutable_data_ptr<T>(), inv_t, N, bv, v0, keep, nullptr, ucount.data(), 0, cursor.data(), nullptr,
                    m, s, alpha.data());
        if (!need_grad) continue;
        rescale_rows(o, alpha.data());
        o.addmm_(z, w_t);
      }
    }
  });

  const T* hp = h_mat.const_data_ptr<T>();
  const T* wbar_p = wbar.const_data_ptr<T>();
  const T* nq_p = neg_entropy.const_data_ptr<T>();
  T* loss_out = loss.mutable_data_ptr<T>();
  at::Tensor g_acc = need_grad ? (grad.scalar_type() == acc ? grad : at::empty({N, H}, opts)) : at::Tensor();
  T* gp = need_grad ? g_acc.mutable_data_ptr<T>() : nullptr;
  const T* op = need_grad ? o_all.const_data_ptr<T>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    std::vector<T> scale(splits);
    for (int64_t n = n_begin; n < n_end; ++n) {
      if (!keep[n]) {  // an ignored row's target is never read (it may hold NaN)
        loss_out[n] = T(0);
        if (need_grad) std::fill(gp + n * H, gp + (n + 1) * H, T(0));
        continue;
      }
      T mx = NEG_INF<T>;
      for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, m_all[sp * N + n]);
      T sum = 0;
      for (int64_t sp = 0; sp < splits; ++sp) {
        scale[sp] = m_all[sp * N + n] == NEG_INF<T> ? T(0) : exp_acc(m_all[sp * N + n] - mx);
        sum += s_all[sp * N + n] * scale[sp];
      }
      double dot = 0;  // h . wbar in fp64, as compact_rows
      for (int64_t j = 0; j < H; ++j) dot += static_cast<double>(hp[n * H + j]) * wbar_p[n * H + j];
      const double lse = static_cast<double>(mx) + std::log(static_cast<double>(sum));
      loss_out[n] = static_cast<T>(static_cast<double>(nq_p[n]) - dot / temperature + lse);
      if (!need_grad) continue;
      T* g = gp + n * H;
      const T* wr = wbar_p + n * H;
      const T c = inv_t / sum;
      for (int64_t j = 0; j < H; ++j) {
        T o_sum = 0;
        for (int64_t sp = 0; sp < splits; ++sp) o_sum += scale[sp] * op[(sp * N + n) * H + j];
        g[j] = o_sum * c - wr[j] * inv_t;
      }
    }
  });
  if (need_grad && g_acc.data_ptr() != grad.data_ptr()) grad.copy_(g_acc);
}

// Splits of the vocabulary for compact_rows_vocab_split: one a thread when all the rows fit one task of BN (scratch
// stays O(threads * BN * (BV + H))); else 1: the threads split the rows (compact_rows).
int64_t vocab_splits(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return threads > 1 && n <= BN ? threads : 1;
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_rows_compact(const at::Tensor& hidden, const at::Tensor& lm_weight,
                                                           const at::Tensor& wbar, const at::Tensor& neg_entropy,
                                                           double temperature,
                                                           const std::optional<at::Tensor>& token_weight,
                                                           bool need_grad) {
  const auto keep = check_common(hidden, lm_weight, temperature, token_weight);
  check_float(wbar, "wbar");
  check_float(neg_entropy, "neg_entropy");
  TORCH_CHECK(wbar.sizes() == hidden.sizes(), "fastsoft softmax_kl (C++): wbar must have the shape of hidden ",
              hidden.sizes(), ", got ", wbar.sizes());
  TORCH_CHECK(neg_entropy.dim() == 1 && neg_entropy.size(0) == hidden.size(0),
              "fastsoft softmax_kl (C++): neg_entropy must have shape [", hidden.size(0), "], got ", neg_entropy.sizes());
  const at::ScalarType acc = compute_dtype(hidden, lm_weight);
  auto [loss, grad] = outputs(hidden, acc, need_grad);
  if (hidden.size(0) == 0) return {loss, grad};
  const at::Tensor wb = wbar.to(acc), nq = neg_entropy.to(acc);
  const int64_t splits = vocab_splits(hidden.size(0));
  if (splits > 1 && acc == at::kDouble)
    compact_rows_vocab_split<double>(hidden, lm_weight, wb, nq, temperature, keep.data(), need_grad, splits, loss, grad);
  else if (splits > 1)
    compact_rows_vocab_split<float>(hidden, lm_weight, wb, nq, temperature, keep.data(), need_grad, splits, loss, grad);
  else if (acc == at::kDouble)
    compact_rows<double>(hidden, lm_weight, wb, nq, temperature, keep.data(), need_grad, loss, grad);
  else
    compact_rows<float>(hidden, lm_weight, wb, nq, temperature, keep.data(), need_grad, loss, grad);
  return {loss, grad};
}

// The compact path with gradient filtering: also returns dropped [N] (per row, a bound of the norm of what the
// skipped tiles would have added to the gradient) and the number of skipped (row, vocabulary column) products.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> softmax_kl_rows_compact_filtered(
    const at::Tensor& hidden, const at::Tensor& lm_weight, const at::Tensor& wbar, const at::Tensor& neg_entropy,
    double temperature, const std::optional<at::Tensor>& token_weight, const at::Tensor& wnorm, double scale) {
  TORCH_CHECK(wnorm.dim() == 1 && wnorm.size(0) == lm_weight.size(0),
              "fastsoft softmax_kl (C++): wnorm must have shape [V] = [", lm_weight.size(0), "], got ", wnorm.sizes());
  TORCH_CHECK(scale >= 0, "fastsoft softmax_kl (C++): the filter scale must be at least 0, got ", scale);
  const auto keep = check_common(hidden, lm_weight, temperature, token_weight);
  check_float(wbar, "wbar");
  check_float(neg_entropy, "neg_entropy");
  TORCH_CHECK(wbar.sizes() == hidden.sizes() && neg_entropy.dim() == 1 && neg_entropy.size(0) == hidden.size(0),
              "fastsoft softmax_kl (C++): wbar and neg_entropy must have shapes ", hidden.sizes(), " and [",
              hidden.size(0), "], got ", wbar.sizes(), " and ", neg_entropy.sizes());
  const at::ScalarType acc = compute_dtype(hidden, lm_weight);
  auto [loss, grad] = outputs(hidden, acc, true);
  at::Tensor dropped = at::zeros({hidden.size(0)}, hidden.options().dtype(acc));
  int64_t skipped = 0;
  if (hidden.size(0) == 0) return {loss, grad, dropped, skipped};
  const at::Tensor wb = wbar.to(acc), nq = neg_entropy.to(acc), wn = wnorm.to(acc).contiguous();
  if (acc == at::kDouble)
    compact_rows<double>(hidden, lm_weight, wb, nq, temperature, keep.data(), true, loss, grad,
                         wn.const_data_ptr<double>(), scale, dropped.mutable_data_ptr<double>(), &skipped);
  else
    compact_rows<float>(hidden, lm_weight, wb, nq, temperature, keep.data(), true, loss, grad,
                        wn.const_data_ptr<float>(), static_cast<float>(scale), dropped.mutable_data_ptr<float>(),
                        &skipped);
  return {loss, grad, dropped, skipped};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_rows_divergence(const at::Tensor& hidden, const at::Tensor& lm_weight,
                                                              const at::Tensor& teacher, bool teacher_is_hidden,
                                                              c10::string_view divergence, double beta,
                                                              double temperature,
                                                              const std::optional<at::Tensor>& token_weight,
                                                              bool need_grad) {
  const auto keep = check_common(hidden, lm_weight, temperature, token_weight);
  check_float(teacher, "teacher");
  const bool jsd = divergence == "jsd";
  TORCH_CHECK(jsd || divergence == "reverse", "fastsoft softmax_kl (C++): divergence must be reverse or jsd, got ",
              divergence);
  TORCH_CHECK(!jsd || (beta > 0 && beta < 1), "fastsoft softmax_kl (C++): beta must be strictly between 0 and 1, got ",
              beta);
  if (teacher_is_hidden) {
    TORCH_CHECK(teacher.sizes() == hidden.sizes(),
                "fastsoft softmax_kl (C++): teacher hidden states must have the shape of hidden ", hidden.sizes(),
                ", got ", teacher.sizes());
  } else {
    TORCH_CHECK(teacher.dim() == 2 && teacher.size(0) == hidden.size(0) && teacher.size(1) == lm_weight.size(0),
                "fastsoft softmax_kl (C++): a dense teacher must have shape [N, V] = [", hidden.size(0), ", ",
                lm_weight.size(0), "], got ", teacher.sizes());
  }
  const at::ScalarType acc = compute_dtype(hidden, lm_weight);
  auto [loss, grad] = outputs(hidden, acc, need_grad);
  if (hidden.size(0) == 0) return {loss, grad};
  if (acc == at::kDouble)
    divergence_rows<double>(hidden, lm_weight, teacher, teacher_is_hidden, jsd, beta, temperature, keep.data(),
                            need_grad, loss, grad);
  else
    divergence_rows<float>(hidden, lm_weight, teacher, teacher_is_hidden, jsd, beta, temperature, keep.data(),
                           need_grad, loss, grad);
  return {loss, grad};
}

// Shapes and dtypes only, for tracing (torch.compile, FakeTensor).
std::tuple<at::Tensor, at::Tensor> meta_outputs(const at::Tensor& hidden, const at::Tensor& lm_weight, bool need_grad) {
  const at::ScalarType acc = compute_dtype(hidden, lm_weight);
  return {at::empty({hidden.size(0)}, hidden.options().dtype(acc)),
          need_grad ? at::empty_like(hidden) : at::empty({0}, hidden.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastsoft, m) {
  m.def("softmax_kl_rows_dense(Tensor hidden, Tensor lm_weight, Tensor teacher, float temperature, "
        "Tensor? token_weight, bool need_grad) -> (Tensor, Tensor)");
  m.def("softmax_kl_rows_sparse(Tensor hidden, Tensor lm_weight, Tensor ids, Tensor probs, Tensor? tail, "
        "float temperature, Tensor? token_weight, bool need_grad) -> (Tensor, Tensor)");
  m.def("softmax_kl_rows_hidden(Tensor hidden, Tensor lm_weight, Tensor teacher_hidden, float temperature, "
        "Tensor? token_weight, bool need_grad) -> (Tensor, Tensor)");
  m.def("softmax_kl_rows_compact(Tensor hidden, Tensor lm_weight, Tensor wbar, Tensor neg_entropy, float temperature, "
        "Tensor? token_weight, bool need_grad) -> (Tensor, Tensor)");
  m.def("softmax_kl_rows_compact_filtered(Tensor hidden, Tensor lm_weight, Tensor wbar, Tensor neg_entropy, "
        "float temperature, Tensor? token_weight, Tensor wnorm, float scale) -> (Tensor, Tensor, Tensor, int)");
  m.def("softmax_kl_rows_divergence(Tensor hidden, Tensor lm_weight, Tensor teacher, bool teacher_is_hidden, "
        "str divergence, float beta, float temperature, Tensor? token_weight, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastsoft, CPU, m) {
  m.impl("softmax_kl_rows_dense", &softmax_kl_rows_dense);
  m.impl("softmax_kl_rows_sparse", &softmax_kl_rows_sparse);
  m.impl("softmax_kl_rows_hidden", &softmax_kl_rows_hidden);
  m.impl("softmax_kl_rows_compact", &softmax_kl_rows_compact);
  m.impl("softmax_kl_rows_compact_filtered", &softmax_kl_rows_compact_filtered);
  m.impl("softmax_kl_rows_divergence", &softmax_kl_rows_divergence);
}

TORCH_LIBRARY_IMPL(fastsoft, Meta, m) {
  m.impl("softmax_kl_rows_dense", [](const at::Tensor& h, const at::Tensor& w, const at::Tensor&, double,
                                     const std::optional<at::Tensor>&, bool g) { return meta_outputs(h, w, g); });
  m.impl("softmax_kl_rows_sparse", [](const at::Tensor& h, const at::Tensor& w, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                                      bool g) { return meta_outputs(h, w, g); });
  m.impl("softmax_kl_rows_hidden", [](const at::Tensor& h, const at::Tensor& w, const at::Tensor&, double,
                                      const std::optional<at::Tensor>&, bool g) { return meta_outputs(h, w, g); });
  m.impl("softmax_kl_rows_compact", [](const at::Tensor& h, const at::Tensor& w, const at::Tensor&, const at::Tensor&,
                                       double, const std::optional<at::Tensor>&,
                                       bool g) { return meta_outputs(h, w, g); });
  m.impl("softmax_kl_rows_divergence",
         [](const at::Tensor& h, const at::Tensor& w, const at::Tensor&, bool, c10::string_view, double, double,
            const std::optional<at::Tensor>&, bool g) { return meta_outputs(h, w, g); });
}

}  // namespace fastsoft

// `import fastsoft._C` (the build from setup.py) runs the registrations above; the module itself is empty.
#ifdef TORCH_EXTENSION_NAME
#define FS_CONCAT_(a, b) a##b
#define FS_CONCAT(a, b) FS_CONCAT_(a, b)
#define FS_STR_(a) #a
#define FS_STR(a) FS_STR_(a)
PyMODINIT_FUNC FS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, FS_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif
