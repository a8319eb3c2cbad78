// DPA's training forward, fused: TAU, the pooled response and the tie count in one pass over the map,
// and the matching backward in one pass. float32 CPU tensors, tau >= 0; conv maps x (B, C, P)
// contiguous with P = H * W (mean over P), or tokens x (B, N, C) (mean over the N tokens).
//   forward:  out = x if x > tau else 0 (x == tau gives tau, which equals x), v[b, c] = mean_p x,
//             ties = number of x == tau (the Python side then keeps their bit mask, rarely needed)
//   backward: grad_x = (out > tau ? grad_out : 0) + grad_v[b, c] / P, for maps without ties
// The Python side (actlab/activations/dpa.py, _ThresholdUnit and DPA.pool) is the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <tuple>

namespace {

using Vec = at::vec::Vectorized<float>;

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "dpa_cpu: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim, "dpa_cpu: ", name, " must have ", dim, " dims, got ", t.dim());
}

std::tuple<at::Tensor, at::Tensor, int64_t> tau_pool_forward(const at::Tensor& x, double tau_d) {
  check(x, "x", 3);
  TORCH_CHECK(tau_d >= 0, "dpa_cpu: tau must be >= 0");
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2);
  auto out = at::empty_like(x);
  auto v = at::empty({B, C}, x.options());
  const float* X = x.data_ptr<float>();
  float *O = out.data_ptr<float>(), *V = v.data_ptr<float>();
  const float tau = static_cast<float>(tau_d);
  std::vector<int64_t> ties(B * C, 0);
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    const Vec vt(tau), zero(0.f), one(1.f);
    for (int64_t bc = begin; bc < end; ++bc) {
      const float* xr = X + bc * P;
      float* orow = O + bc * P;
      Vec acc(0.f), eq(0.f);
      int64_t p = 0;
      for (; p + Vec::size() <= P; p += Vec::size()) {
        Vec xv = Vec::loadu(xr + p);
        acc = acc + xv;
        eq = eq + Vec::blendv(zero, one, xv == vt);
        Vec::blendv(xv, zero, xv < vt).store(orow + p);
      }
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
      float n_eq = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, eq);
      for (; p < P; ++p) {
        const float xv = xr[p];
        sum += xv;
        n_eq += xv == tau;
        orow[p] = xv < tau ? 0.f : xv;
      }
      V[bc] = sum / static_cast<float>(P);
      ties[bc] = static_cast<int64_t>(n_eq);
    }
  });
  int64_t total = 0;
  for (int64_t t : ties) total += t;
  return {out, v, total};
}

at::Tensor tau_pool_backward(const at::Tensor& grad_out, const at::Tensor& out,
                             const c10::optional<at::Tensor>& grad_v, double tau_d) {
  check(grad_out, "grad_out", 3); check(out, "out", 3);
  const int64_t B = out.size(0), C = out.size(1), P = out.size(2);
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv) check(*grad_v, "grad_v", 2);
  auto grad_x = at::empty_like(out);
  const float *G = grad_out.data_ptr<float>(), *O = out.data_ptr<float>();
  const float* GV = has_gv ? grad_v->data_ptr<float>() : nullptr;
  float* GX = grad_x.data_ptr<float>();
  const float tau = static_cast<float>(tau_d);
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    const Vec vt(tau), zero(0.f);
    for (int64_t bc = begin; bc < end; ++bc) {
      const float *g = G + bc * P, *o = O + bc * P;
      float* gx = GX + bc * P;
      const float add = has_gv ? GV[bc] / static_cast<float>(P) : 0.f;
      const Vec vadd(add);
      int64_t p = 0;
      for (; p + Vec::size() <= P; p += Vec::size()) {
        Vec ov = Vec::loadu(o + p);
        (Vec::blendv(zero, Vec::loadu(g + p), ov > vt) + vadd).store(gx + p);
      }
      for (; p < P; ++p) gx[p] = (o[p] > tau ? g[p] : 0.f) + add;
    }
  });
  return grad_x;
}

// Token sites: x (B, N, C) contiguous, v[b, c] = mean over the N tokens. One task per sample.
std::tuple<at::Tensor, at::Tensor, int64_t> tau_pool_tokens_forward(const at::Tensor& x, double tau_d) {
  check(x, "x", 3);
  TORCH_CHECK(tau_d >= 0, "dpa_cpu: tau must be >= 0");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  auto out = at::empty_like(x);
  auto v = at::zeros({B, C}, x.options());
  const float* X = x.data_ptr<float>();
  float *O = out.data_ptr<float>(), *V = v.data_ptr<float>();
  const float tau = static_cast<float>(tau_d);
  std::vector<int64_t> ties(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const Vec vt(tau), zero(0.f), one(1.f);
    for (int64_t b = begin; b < end; ++b) {
      float* vb = V + b * C;
      Vec eq(0.f);
      float n_eq = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = X + (b * N + n) * C;
        float* orow = O + (b * N + n) * C;
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) {
          Vec xv = Vec::loadu(xr + c);
          (Vec::loadu(vb + c) + xv).store(vb + c);
          eq = eq + Vec::blendv(zero, one, xv == vt);
          Vec::blendv(xv, zero, xv < vt).store(orow + c);
        }
        for (; c < C; ++c) {
          const float xv = xr[c];
          vb[c] += xv;
          n_eq += xv == tau;
          orow[c] = xv < tau ? 0.f : xv;
        }
      }
      for (int64_t c = 0; c < C; ++c) vb[c] /= static_cast<float>(N);
      ties[b] = static_cast<int64_t>(n_eq + at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, eq));
    }
  });
  int64_t total = 0;
  for (int64_t t : ties) total += t;
  return {out, v, total};
}

at::Tensor tau_pool_tokens_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                    const c10::optional<at::Tensor>& grad_v, double tau_d) {
  check(grad_out, "grad_out", 3); check(out, "out", 3);
  const int64_t B = out.size(0), N = out.size(1), C = out.size(2);
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv) check(*grad_v, "grad_v", 2);
  auto grad_x = at::empty_like(out);
  auto add = has_gv ? (*grad_v / static_cast<double>(N)).to(at::kFloat).contiguous() : at::zeros({B, C}, out.options());
  const float *G = grad_out.data_ptr<float>(), *O = out.data_ptr<float>(), *A = add.data_ptr<float>();
  float* GX = grad_x.data_ptr<float>();
  const float tau = static_cast<float>(tau_d);
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    const Vec vt(tau), zero(0.f);
    for (int64_t r = begin; r < end; ++r) {
      const float *g = G + r * C, *o = O + r * C, *a = A + (r / N) * C;
      float* gx = GX + r * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size())
        (Vec::blendv(zero, Vec::loadu(g + c), Vec::loadu(o + c) > vt) + Vec::loadu(a + c)).store(gx + c);
      for (; c < C; ++c) gx[c] = (o[c] > tau ? g[c] : 0.f) + a[c];
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY(actlab_dpa, m) {
  m.def("tau_pool_forward", tau_pool_forward);
  m.def("tau_pool_backward", tau_pool_backward);
  m.def("tau_pool_tokens_forward", tau_pool_tokens_forward);
  m.def("tau_pool_tokens_backward", tau_pool_tokens_backward);
}
