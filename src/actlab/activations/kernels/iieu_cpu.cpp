// IIEU-B elementwise forward and backward for float32 CPU tensors, one pass over memory each.
//
// Two layouts:
//   planes: x (B, C, P) with P = H' * W' contiguous; inv (B, G, P) for G groups of C / G channels.
//   rows:   x (R, C) with C contiguous, R = S * T rows (S samples of T tokens); inv (R).
// Per channel: w = 1 / (||w_c|| + eps), e = eta_c; per (sample, channel): n = nu.
//   rho = x * w * inv + n;  s = rho if rho >= e else e * exp(rho - e);  out = s * x
// The backward returns grad_x and the reductions of the other inputs' gradients; the Python side
// (actlab/activations/iieu.py, _backward_kernel) is the reference these are tested against.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

inline float vsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// One element of the backward: returns grad_x, accumulates d/d(a) * x, d/d nu and d/d eta parts.
struct Grad {
  Vec gx, grx, grho, gev;
};

// True when some lane of a comparison mask is set (set lanes are all-ones bit patterns, not 0.0).
inline bool any_lane(const Vec& mask) {
  return mask.zero_mask() != (1 << Vec::size()) - 1;
}

// exp is the costly part; lanes at or above eta never use it, so a vector with none below skips it
// (with the expressions the blends below would pick in every lane).
inline Grad grad_at(const Vec& x, const Vec& g, const Vec& a, const Vec& n, const Vec& e) {
  const Vec zero(0.f);
  Vec rho = x * a + n;
  Vec below = rho < e;
  Vec gs = g * x;
  if (!any_lane(below)) return {g * rho + gs * a, gs * x, gs, zero};
  Vec expo = at::vec::minimum(rho - e, zero).exp_u20();
  Vec s_low = expo * e;
  Vec scale = Vec::blendv(rho, s_low, below);
  Vec grho = Vec::blendv(gs, gs * s_low, below);
  return {g * scale + grho * a, grho * x, grho, Vec::blendv(zero, gs * expo, below)};
}

inline Vec forward_at(const Vec& x, const Vec& a, const Vec& n, const Vec& e) {
  Vec rho = x * a + n;
  Vec below = rho < e;
  if (!any_lane(below)) return rho * x;
  Vec s_low = at::vec::minimum(rho - e, Vec(0.f)).exp_u20() * e;
  return Vec::blendv(rho, s_low, below) * x;
}

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "iieu_cpu: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim, "iieu_cpu: ", name, " must have ", dim, " dims, got ", t.dim());
}

// ---------------------------------------------------------------- planes (conv sites)

at::Tensor planes_forward(const at::Tensor& x, const at::Tensor& inv, const at::Tensor& w,
                          const at::Tensor& nu, const at::Tensor& eta) {
  check(x, "x", 3); check(inv, "inv", 3); check(w, "w", 1); check(nu, "nu", 2); check(eta, "eta", 1);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2), G = inv.size(1), Cg = C / G;
  auto out = at::empty_like(x);
  const float *X = x.data_ptr<float>(), *IV = inv.data_ptr<float>(), *W = w.data_ptr<float>();
  const float *N = nu.data_ptr<float>(), *E = eta.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const float* iv = IV + (b * G + c / Cg) * P;
      const float *xr = X + bc * P;
      float* orow = O + bc * P;
      const Vec vw(W[c]), vn(N[bc]), ve(E[c]);
      int64_t p = 0;
      for (; p + Vec::size() <= P; p += Vec::size())
        forward_at(Vec::loadu(xr + p), vw * Vec::loadu(iv + p), vn, ve).store(orow + p);
      if (p < P) {
        const int64_t k = P - p;
        forward_at(Vec::loadu(xr + p, k), vw * Vec::loadu(iv + p, k), vn, ve).store(orow + p, k);
      }
    }
  });
  return out;
}

// returns grad_x (B, C, P), grad_inv (B, G, P), grad_w (C), grad_nu (B, C), grad_eta_part (C)
// grad_into_x: write grad_x over x (a recomputed x the caller owns), saving an allocation;
// grad_eta_part = sum of g * x * exp(rho - eta) below eta (d s / d eta = (1 - eta) * that).
std::vector<at::Tensor> planes_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& inv,
                                        const at::Tensor& w, const at::Tensor& nu, const at::Tensor& eta,
                                        bool grad_into_x) {
  check(go, "grad_out", 3); check(x, "x", 3); check(inv, "inv", 3); check(w, "w", 1); check(nu, "nu", 2);
  check(eta, "eta", 1);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2), G = inv.size(1), Cg = C / G;
  auto gx = grad_into_x ? x : at::empty_like(x);  // each element is read before it is written
  auto giv = at::empty_like(inv);
  auto gnu = at::empty({B, C}, x.options());
  auto gw_b = at::empty({B, C}, x.options());
  auto ge_b = at::empty({B, C}, x.options());
  const float *GO = go.data_ptr<float>(), *X = x.data_ptr<float>(), *IV = inv.data_ptr<float>();
  const float *W = w.data_ptr<float>(), *N = nu.data_ptr<float>(), *E = eta.data_ptr<float>();
  float *GX = gx.data_ptr<float>(), *GIV = giv.data_ptr<float>(), *GN = gnu.data_ptr<float>();
  float *GW = gw_b.data_ptr<float>(), *GE = ge_b.data_ptr<float>();
  // one task per (sample, group): grad_inv sums over the group's channels without races
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      const float* iv = IV + bg * P;
      float* giv_row = GIV + bg * P;
      std::fill(giv_row, giv_row + P, 0.f);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const int64_t bc = b * C + c;
        const float *xr = X + bc * P, *gr = GO + bc * P;
        float* gxr = GX + bc * P;
        const Vec vw(W[c]), vn(N[bc]), ve(E[c]);
        Vec acc_n(0.f), acc_w(0.f), acc_e(0.f);
        int64_t p = 0;
        auto step = [&](int64_t k) {  // k < Vec::size(): the tail, loaded and stored partially
          Vec ivv = k ? Vec::loadu(iv + p, k) : Vec::loadu(iv + p);
          Vec xv = k ? Vec::loadu(xr + p, k) : Vec::loadu(xr + p);
          Vec gv = k ? Vec::loadu(gr + p, k) : Vec::loadu(gr + p);
          Grad d = grad_at(xv, gv, vw * ivv, vn, ve);
          Vec gi = (k ? Vec::loadu(giv_row + p, k) : Vec::loadu(giv_row + p)) + d.grx * vw;
          if (k) { d.gx.store(gxr + p, k); gi.store(giv_row + p, k); }
          else { d.gx.store(gxr + p); gi.store(giv_row + p); }
          acc_w = acc_w + d.grx * ivv;  // zero-filled lanes of a tail add 0
          acc_n = acc_n + d.grho;
          acc_e = acc_e + d.gev;
        };
        for (; p + Vec::size() <= P; p += Vec::size()) step(0);
        if (p < P) step(P - p);
        GN[bc] = vsum(acc_n); GW[bc] = vsum(acc_w); GE[bc] = vsum(acc_e);
      }
    }
  });
  return {gx, giv, gw_b.sum(0), gnu, ge_b.sum(0)};
}

// ---------------------------------------------------------------- rows (linear sites)

at::Tensor rows_forward(const at::Tensor& x, const at::Tensor& inv, const at::Tensor& w,
                        const at::Tensor& nu, const at::Tensor& eta) {
  check(x, "x", 2); check(inv, "inv", 1); check(w, "w", 1); check(nu, "nu", 2); check(eta, "eta", 1);
  const int64_t R = x.size(0), C = x.size(1), T = R / nu.size(0);
  auto out = at::empty_like(x);
  const float *X = x.data_ptr<float>(), *IV = inv.data_ptr<float>(), *W = w.data_ptr<float>();
  const float *N = nu.data_ptr<float>(), *E = eta.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = X + r * C, *nr = N + (r / T) * C;
      float* orow = O + r * C;
      const Vec vi(IV[r]);
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size())
        forward_at(Vec::loadu(xr + c), Vec::loadu(W + c) * vi, Vec::loadu(nr + c), Vec::loadu(E + c))
            .store(orow + c);
      if (c < C) {
        const int64_t k = C - c;
        forward_at(Vec::loadu(xr + c, k), Vec::loadu(W + c, k) * vi, Vec::loadu(nr + c, k),
                   Vec::loadu(E + c, k)).store(orow + c, k);
      }
    }
  });
  return out;
}

// returns grad_x (R, C), grad_inv (R), grad_w (C), grad_nu (S, C), grad_eta_part (C);
// grad_into_x as for planes_backward.
std::vector<at::Tensor> rows_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& inv,
                                      const at::Tensor& w, const at::Tensor& nu, const at::Tensor& eta,
                                      bool grad_into_x) {
  check(go, "grad_out", 2); check(x, "x", 2); check(inv, "inv", 1); check(w, "w", 1); check(nu, "nu", 2);
  check(eta, "eta", 1);
  const int64_t R = go.size(0), C = go.size(1), S = nu.size(0), T = R / S;
  constexpr int64_t kRows = 64;  // rows per task: parallel work also for one sample of many tokens
  const int64_t nb = (T + kRows - 1) / kRows;
  auto gx = grad_into_x ? x : at::empty_like(x);  // each element is read before it is written
  auto giv = at::empty_like(inv);
  auto part = at::zeros({3, S * nb, C}, go.options());  // per block: grad_nu, grad_w, grad_eta sums
  const float *GO = go.data_ptr<float>(), *IV = inv.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const float *W = w.data_ptr<float>(), *N = nu.data_ptr<float>(), *E = eta.data_ptr<float>();
  float *GX = gx.data_ptr<float>(), *GIV = giv.data_ptr<float>(), *PART = part.data_ptr<float>();
  const int64_t stride = S * nb * C;
  at::parallel_for(0, S * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t s = k / nb, r0 = s * T + (k % nb) * kRows, r1 = std::min(r0 + kRows, (s + 1) * T);
      const float* nr = N + s * C;
      float *gn = PART + k * C, *gw = gn + stride, *ge = gn + 2 * stride;
      for (int64_t r = r0; r < r1; ++r) {
        const float *xr = X + r * C, *gr = GO + r * C;
        float* gxr = GX + r * C;
        const Vec vi(IV[r]);
        Vec acc_i(0.f);
        int64_t c = 0;
        auto step = [&](int64_t kk) {
          auto ld = [&](const float* ptr) { return kk ? Vec::loadu(ptr + c, kk) : Vec::loadu(ptr + c); };
          auto st = [&](const Vec& v, float* ptr) { if (kk) v.store(ptr + c, kk); else v.store(ptr + c); };
          Vec wv = ld(W);
          Grad d = grad_at(ld(xr), ld(gr), wv * vi, ld(nr), ld(E));
          st(d.gx, gxr);
          acc_i = acc_i + d.grx * wv;
          st(ld(gw) + d.grx * vi, gw);
          st(ld(gn) + d.grho, gn);
          st(ld(ge) + d.gev, ge);
        };
        for (; c + Vec::size() <= C; c += Vec::size()) step(0);
        if (c < C) step(C - c);
        GIV[r] = vsum(acc_i);
      }
    }
  });
  auto sums = part.view({3, S, nb, C}).sum(2);
  return {gx, giv, sums[1].sum(0), sums[0].contiguous(), sums[2].sum(0)};
}

// ---------------------------------------------------------------- patch norms of rows (linear sites)
// invX of a token is 1 / (||x_pre row|| + eps), or 0 where ||row|| < silent_norm (silent_norm < 0: never).
// Same float32 operations as inverse_patch_norm / _inverse_patch_norm_grad in iieu.py; only the order of
// the sum of squares differs.

inline float row_sumsq(const float* row, int64_t K) {
  Vec acc(0.f);
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) {
    Vec v = Vec::loadu(row + k);
    acc = acc + v * v;
  }
  if (k < K) {
    Vec v = Vec::loadu(row + k, K - k);  // zero-filled lanes add 0
    acc = acc + v * v;
  }
  return vsum(acc);
}

// returns inv (R), sumsq (R)
std::vector<at::Tensor> rows_inv_norm(const at::Tensor& x_pre, double eps, double silent_norm) {
  check(x_pre, "x_pre", 2);
  const int64_t R = x_pre.size(0), K = x_pre.size(1);
  auto inv = at::empty({R}, x_pre.options());
  auto sumsq = at::empty({R}, x_pre.options());
  const float* X = x_pre.data_ptr<float>();
  float *IV = inv.data_ptr<float>(), *SS = sumsq.data_ptr<float>();
  const float e = static_cast<float>(eps), silent = static_cast<float>(silent_norm);
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float ss = row_sumsq(X + r * K, K), norm = std::sqrt(ss);
      SS[r] = ss;
      IV[r] = (silent_norm >= 0 && norm < silent) ? 0.f : 1.f / (norm + e);
    }
  });
  return {inv, sumsq};
}

// grad_x_pre (R, K) from grad_inv (R): d inv / d sumsq = -inv^2 / (2 norm), 0 at norm 0 and silenced rows
at::Tensor rows_inv_norm_backward(const at::Tensor& x_pre, const at::Tensor& sumsq, const at::Tensor& grad_inv,
                                  double eps, double silent_norm) {
  check(x_pre, "x_pre", 2); check(sumsq, "sumsq", 1); check(grad_inv, "grad_inv", 1);
  const int64_t R = x_pre.size(0), K = x_pre.size(1);
  auto grad = at::empty_like(x_pre);
  const float *X = x_pre.data_ptr<float>(), *SS = sumsq.data_ptr<float>(), *GI = grad_inv.data_ptr<float>();
  float* G = grad.data_ptr<float>();
  const float e = static_cast<float>(eps), silent = static_cast<float>(silent_norm);
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float norm = std::sqrt(SS[r]), inv = 1.f / (norm + e);
      const bool live = norm > 0 && !(silent_norm >= 0 && norm < silent);
      const float g_sumsq = live ? -GI[r] * (inv * inv) / (2 * norm) : 0.f;
      at::vec::map([g2 = Vec(2 * g_sumsq)](Vec x) { return x * g2; }, G + r * K, X + r * K, K);
    }
  });
  return grad;
}

// ---------------------------------------------------------------- batch statistics of planes
// For x (B, C, P): the mean of each plane (B, C) and, per channel over all B * P values, the mean and
// the biased variance (C), all float64: what a training-mode BatchNorm normalises c with. Each plane's
// sums are taken about its first value (no cancellation for maps far from zero) in float32 runs of
// kRun values added into float64; planes are combined with the pairwise-update formula.
std::vector<at::Tensor> plane_moments(const at::Tensor& x) {
  check(x, "x", 3);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2);
  TORCH_CHECK(B * P > 0, "iieu_cpu: plane_moments needs at least one value per channel");
  auto opts = x.options().dtype(at::kDouble);
  auto plane_mean = at::empty({B, C}, opts), plane_m2 = at::empty({B, C}, opts);
  const float* X = x.data_ptr<float>();
  double *PM = plane_mean.data_ptr<double>(), *PM2 = plane_m2.data_ptr<double>();
  constexpr int64_t kRun = 512;
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const float* xr = X + bc * P;
      if (P == 0) { PM[bc] = 0; PM2[bc] = 0; continue; }
      const float k = xr[0];
      const Vec vk(k);
      double s1 = 0, s2 = 0;
      int64_t p = 0;
      while (p + Vec::size() <= P) {
        Vec a1(0.f), a2(0.f);
        const int64_t stop = std::min(P - (P - p) % Vec::size(), p + kRun);
        for (; p < stop; p += Vec::size()) {
          Vec d = Vec::loadu(xr + p) - vk;
          a1 = a1 + d;
          a2 = at::vec::fmadd(d, d, a2);
        }
        s1 += vsum(a1);
        s2 += vsum(a2);
      }
      for (; p < P; ++p) {
        const double d = static_cast<double>(xr[p]) - k;
        s1 += d;
        s2 += d * d;
      }
      PM[bc] = k + s1 / P;
      PM2[bc] = std::max(s2 - s1 * s1 / P, 0.0);
    }
  });
  auto mean = at::empty({C}, opts), var = at::empty({C}, opts);
  double *M = mean.data_ptr<double>(), *V = var.data_ptr<double>();
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double m = 0;
      for (int64_t b = 0; b < B; ++b) m += PM[b * C + c];
      m /= B;
      double m2 = 0;
      for (int64_t b = 0; b < B; ++b) {
        const double d = PM[b * C + c] - m;
        m2 += PM2[b * C + c] + P * d * d;
      }
      M[c] = m;
      V[c] = m2 / (B * P);
    }
  });
  return {plane_mean, mean, var};
}

// ---------------------------------------------------------------- channel sums of squares (conv patch norms)
// x (B, C, P) -> (B, G, P): the sum over each group's C / G channels of x^2 at every position.
at::Tensor planes_channel_sumsq(const at::Tensor& x, int64_t G) {
  check(x, "x", 3);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2), Cg = C / G;
  TORCH_CHECK(G > 0 && C % G == 0, "iieu_cpu: channels not divisible into groups");
  auto out = at::empty({B, G, P}, x.options());
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  constexpr int64_t kSpan = 1024;  // positions per task: the accumulator row stays in L1
  const int64_t spans = (P + kSpan - 1) / kSpan;
  at::parallel_for(0, B * G * spans, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bg = t / spans, p0 = (t % spans) * kSpan, n = std::min(kSpan, P - p0);
      const float* xg = X + bg * Cg * P + p0;
      float* o = O + bg * P + p0;
      std::fill(o, o + n, 0.f);
      for (int64_t c = 0; c < Cg; ++c) {
        const float* xr = xg + c * P;
        at::vec::map2([](Vec acc, Vec v) { return at::vec::fmadd(v, v, acc); }, o, o, xr, n);
      }
    }
  });
  return out;
}

// x (B, C, *S), s (B, G, P) with P = prod(S) -> x * s of each channel's group (+ add, shaped like x, when
// add is not empty), shaped like x (a tensor of its own, not a view, so that autograd can add further
// gradients into it in place); into_add: written over add (each element is read before it is written)
at::Tensor planes_channel_scale(const at::Tensor& x, const at::Tensor& s, const at::Tensor& add, bool into_add) {
  TORCH_CHECK(x.dim() >= 2, "iieu_cpu: x must have at least 2 dims");
  check(x, "x", x.dim()); check(s, "scale", 3);
  const bool adding = add.numel() > 0;
  if (adding) {
    check(add, "add", x.dim());
    TORCH_CHECK(add.sizes() == x.sizes(), "iieu_cpu: add must be shaped like x");
  }
  const int64_t B = x.size(0), C = x.size(1), P = B * C ? x.numel() / (B * C) : 0, G = s.size(1), Cg = C / G;
  TORCH_CHECK(s.size(0) == B && s.size(2) == P && G > 0 && C % G == 0, "iieu_cpu: scale does not match x");
  TORCH_CHECK(adding || !into_add, "iieu_cpu: into_add needs add");
  auto out = into_add ? add : at::empty_like(x);
  const float *X = x.data_ptr<float>(), *S = s.data_ptr<float>(), *A = adding ? add.data_ptr<float>() : nullptr;
  float* O = out.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const float* sr = S + (b * G + c / Cg) * P;
      if (adding) {
        at::vec::map3([](Vec v, Vec f, Vec a) { return at::vec::fmadd(v, f, a); }, O + bc * P, X + bc * P, sr,
                      A + bc * P, P);
      } else {
        at::vec::map2([](Vec v, Vec f) { return v * f; }, O + bc * P, X + bc * P, sr, P);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------- Dynamic Coupler (IIEU-DC) on planes
// main, shortcut, out, grad (B, C, *S), contiguous; per-(sample, channel) weights and terms (B, C).
// Outputs are shaped like the maps (tensors of their own, into which autograd can add in place).

void check_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, "iieu_cpu: ", name, " must have at least 2 dims");
  check(t, name, t.dim());
}

inline int64_t positions(const at::Tensor& t) {
  const int64_t bc = t.size(0) * t.size(1);
  return bc ? t.numel() / bc : 0;
}

// out = w1 * main + w2 * shortcut
at::Tensor coupler_forward(const at::Tensor& main, const at::Tensor& shortcut, const at::Tensor& w1,
                           const at::Tensor& w2) {
  check_map(main, "main"); check_map(shortcut, "shortcut"); check(w1, "w1", 2); check(w2, "w2", 2);
  const int64_t BC = main.size(0) * main.size(1), P = positions(main);
  auto out = at::empty_like(main);
  const float *M = main.data_ptr<float>(), *S = shortcut.data_ptr<float>();
  const float *W1 = w1.data_ptr<float>(), *W2 = w2.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, BC, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const Vec a(W1[bc]), b(W2[bc]);
      at::vec::map2([&](Vec m, Vec s) { return at::vec::fmadd(m, a, s * b); }, O + bc * P, M + bc * P,
                    S + bc * P, P);
    }
  });
  return out;
}

// per (sample, channel): sum over positions of grad * out and of grad * shortcut, (B, C) each
std::vector<at::Tensor> coupler_sums(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& shortcut) {
  check_map(grad, "grad"); check_map(out, "out"); check_map(shortcut, "shortcut");
  const int64_t B = grad.size(0), C = grad.size(1), P = positions(grad);
  auto s_out = at::empty({B, C}, grad.options()), s_short = at::empty({B, C}, grad.options());
  const float *G = grad.data_ptr<float>(), *O = out.data_ptr<float>(), *S = shortcut.data_ptr<float>();
  float *SO = s_out.data_ptr<float>(), *SS = s_short.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const float *g = G + bc * P, *o = O + bc * P, *sc = S + bc * P;
      Vec ao(0.f), as(0.f);
      int64_t p = 0;
      for (; p + Vec::size() <= P; p += Vec::size()) {
        Vec gv = Vec::loadu(g + p);
        ao = at::vec::fmadd(gv, Vec::loadu(o + p), ao);
        as = at::vec::fmadd(gv, Vec::loadu(sc + p), as);
      }
      if (p < P) {  // zero-filled lanes add 0
        Vec gv = Vec::loadu(g + p, P - p);
        ao = at::vec::fmadd(gv, Vec::loadu(o + p, P - p), ao);
        as = at::vec::fmadd(gv, Vec::loadu(sc + p, P - p), as);
      }
      SO[bc] = vsum(ao);
      SS[bc] = vsum(as);
    }
  });
  return {s_out, s_short};
}

// grad_main = grad * w1 + add1, grad_shortcut = grad * w2 + add2 (add: the pooled gradient per position)
std::vector<at::Tensor> coupler_grads(const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& w2,
                                      const at::Tensor& add1, const at::Tensor& add2) {
  check_map(grad, "grad"); check(w1, "w1", 2); check(w2, "w2", 2); check(add1, "add1", 2); check(add2, "add2", 2);
  const int64_t BC = grad.size(0) * grad.size(1), P = positions(grad);
  auto gm = at::empty_like(grad), gs = at::empty_like(grad);
  const float *G = grad.data_ptr<float>(), *W1 = w1.data_ptr<float>(), *W2 = w2.data_ptr<float>();
  const float *A1 = add1.data_ptr<float>(), *A2 = add2.data_ptr<float>();
  float *GM = gm.data_ptr<float>(), *GS = gs.data_ptr<float>();
  at::parallel_for(0, BC, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const float* g = G + bc * P;
      float *m = GM + bc * P, *s = GS + bc * P;
      const Vec a(W1[bc]), b(W2[bc]), c1(A1[bc]), c2(A2[bc]);
      int64_t p = 0;
      for (; p + Vec::size() <= P; p += Vec::size()) {
        Vec gv = Vec::loadu(g + p);
        at::vec::fmadd(gv, a, c1).store(m + p);
        at::vec::fmadd(gv, b, c2).store(s + p);
      }
      if (p < P) {
        Vec gv = Vec::loadu(g + p, P - p);
        at::vec::fmadd(gv, a, c1).store(m + p, P - p);
        at::vec::fmadd(gv, b, c2).store(s + p, P - p);
      }
    }
  });
  return {gm, gs};
}

// ---------------------------------------------------------------- IIEU-B's backward fused with its BatchNorm's
// At a conv-BatchNorm-IIEU-B site the unit differentiates through the BatchNorm itself, from the
// BatchNorm input c (B, C, P): x_t = c * xs + xb and xhat = c * hs + hb per channel. Pass 1 takes the
// reductions without writing a map; pass 2 recomputes the unit's gradient g w.r.t. x_t and writes
// dL/dc = A * g + K1 + K2 * c, with per-channel A, K2 and per-(sample, channel) K1 that fold in term-B's
// spread and the BatchNorm's mean terms (computed between the passes).

// returns grad_inv (B, G, P), grad_w (C), grad_nu (B, C), grad_eta_part (C), and per (sample, channel)
// the sums over positions of g, g * xhat and xhat (B, C) each
std::vector<at::Tensor> planes_bn_sums(const at::Tensor& go, const at::Tensor& c, const at::Tensor& inv,
                                       const at::Tensor& w, const at::Tensor& nu, const at::Tensor& eta,
                                       const at::Tensor& xs, const at::Tensor& xb, const at::Tensor& hs,
                                       const at::Tensor& hb) {
  check(go, "grad_out", 3); check(c, "c", 3); check(inv, "inv", 3); check(w, "w", 1); check(nu, "nu", 2);
  check(eta, "eta", 1); check(xs, "xs", 1); check(xb, "xb", 1); check(hs, "hs", 1); check(hb, "hb", 1);
  const int64_t B = c.size(0), C = c.size(1), P = c.size(2), G = inv.size(1), Cg = C / G;
  auto giv = at::empty_like(inv);
  auto opts = c.options();
  auto gnu = at::empty({B, C}, opts), gw_b = at::empty({B, C}, opts), ge_b = at::empty({B, C}, opts);
  auto sum_g = at::empty({B, C}, opts), sum_gh = at::empty({B, C}, opts), sum_h = at::empty({B, C}, opts);
  const float *GO = go.data_ptr<float>(), *X = c.data_ptr<float>(), *IV = inv.data_ptr<float>();
  const float *W = w.data_ptr<float>(), *N = nu.data_ptr<float>(), *E = eta.data_ptr<float>();
  const float *XS = xs.data_ptr<float>(), *XB = xb.data_ptr<float>(), *HS = hs.data_ptr<float>(),
              *HB = hb.data_ptr<float>();
  float *GIV = giv.data_ptr<float>(), *GN = gnu.data_ptr<float>(), *GW = gw_b.data_ptr<float>(),
        *GE = ge_b.data_ptr<float>(), *SG = sum_g.data_ptr<float>(), *SGH = sum_gh.data_ptr<float>(),
        *SH = sum_h.data_ptr<float>();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      const float* iv = IV + bg * P;
      float* giv_row = GIV + bg * P;
      std::fill(giv_row, giv_row + P, 0.f);
      for (int64_t ch = g * Cg; ch < (g + 1) * Cg; ++ch) {
        const int64_t bc = b * C + ch;
        const float *cr = X + bc * P, *gr = GO + bc * P;
        const Vec vw(W[ch]), vn(N[bc]), ve(E[ch]), vxs(XS[ch]), vxb(XB[ch]), vhs(HS[ch]), vhb(HB[ch]);
        Vec acc_n(0.f), acc_w(0.f), acc_e(0.f), acc_g(0.f), acc_gh(0.f), acc_h(0.f);
        int64_t p = 0;
        auto step = [&](int64_t k) {  // the tail's unused lanes have grad_out 0; xhat's are masked below
          Vec ivv = k ? Vec::loadu(iv + p, k) : Vec::loadu(iv + p);
          Vec cv = k ? Vec::loadu(cr + p, k) : Vec::loadu(cr + p);
          Vec gv = k ? Vec::loadu(gr + p, k) : Vec::loadu(gr + p);
          Vec xv = at::vec::fmadd(cv, vxs, vxb);
          Vec hv = at::vec::fmadd(cv, vhs, vhb);
          if (k) hv = Vec::set(Vec(0.f), hv, k);
          Grad d = grad_at(xv, gv, vw * ivv, vn, ve);
          Vec gi = (k ? Vec::loadu(giv_row + p, k) : Vec::loadu(giv_row + p)) + d.grx * vw;
          if (k) gi.store(giv_row + p, k); else gi.store(giv_row + p);
          acc_w = acc_w + d.grx * ivv;
          acc_n = acc_n + d.grho;
          acc_e = acc_e + d.gev;
          acc_g = acc_g + d.gx;
          acc_gh = at::vec::fmadd(d.gx, hv, acc_gh);
          acc_h = acc_h + hv;
        };
        for (; p + Vec::size() <= P; p += Vec::size()) step(0);
        if (p < P) step(P - p);
        GN[bc] = vsum(acc_n); GW[bc] = vsum(acc_w); GE[bc] = vsum(acc_e);
        SG[bc] = vsum(acc_g); SGH[bc] = vsum(acc_gh); SH[bc] = vsum(acc_h);
      }
    }
  });
  return {giv, gw_b.sum(0), gnu, ge_b.sum(0), sum_g, sum_gh, sum_h};
}

// returns dL/dc (B, C, P) = A * g + K1 + K2 * c
at::Tensor planes_bn_grad(const at::Tensor& go, const at::Tensor& c, const at::Tensor& inv, const at::Tensor& w,
                          const at::Tensor& nu, const at::Tensor& eta, const at::Tensor& xs, const at::Tensor& xb,
                          const at::Tensor& a, const at::Tensor& k1, const at::Tensor& k2) {
  check(go, "grad_out", 3); check(c, "c", 3); check(inv, "inv", 3); check(w, "w", 1); check(nu, "nu", 2);
  check(eta, "eta", 1); check(xs, "xs", 1); check(xb, "xb", 1); check(a, "a", 1); check(k1, "k1", 2);
  check(k2, "k2", 1);
  const int64_t B = c.size(0), C = c.size(1), P = c.size(2), G = inv.size(1), Cg = C / G;
  auto gc = at::empty_like(c);
  const float *GO = go.data_ptr<float>(), *X = c.data_ptr<float>(), *IV = inv.data_ptr<float>();
  const float *W = w.data_ptr<float>(), *N = nu.data_ptr<float>(), *E = eta.data_ptr<float>();
  const float *XS = xs.data_ptr<float>(), *XB = xb.data_ptr<float>(), *A = a.data_ptr<float>(),
              *K1 = k1.data_ptr<float>(), *K2 = k2.data_ptr<float>();
  float* GC = gc.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, ch = bc % C;
      const float *iv = IV + (b * G + ch / Cg) * P, *cr = X + bc * P, *gr = GO + bc * P;
      float* out = GC + bc * P;
      const Vec vw(W[ch]), vn(N[bc]), ve(E[ch]), vxs(XS[ch]), vxb(XB[ch]), va(A[ch]), vk1(K1[bc]), vk2(K2[ch]);
      int64_t p = 0;
      auto step = [&](int64_t k) {
        Vec ivv = k ? Vec::loadu(iv + p, k) : Vec::loadu(iv + p);
        Vec cv = k ? Vec::loadu(cr + p, k) : Vec::loadu(cr + p);
        Vec gv = k ? Vec::loadu(gr + p, k) : Vec::loadu(gr + p);
        Grad d = grad_at(at::vec::fmadd(cv, vxs, vxb), gv, vw * ivv, vn, ve);
        Vec r = at::vec::fmadd(va, d.gx, at::vec::fmadd(vk2, cv, vk1));
        if (k) r.store(out + p, k); else r.store(out + p);
      };
      for (; p + Vec::size() <= P; p += Vec::size()) step(0);
      if (p < P) step(P - p);
    }
  });
  return gc;
}

// ---------------------------------------------------------------- inverse patch norms of conv sites
// Elementwise on the (B, G, H', W') maps of squared patch norms, the same float32 formulas as the rows
// above (composite.inverse_norm / inv_norm_grad_sumsq): one pass instead of a handful of small ops.

at::Tensor inv_norm_map(const at::Tensor& sumsq, double eps, double silent_norm) {
  check(sumsq, "sumsq", sumsq.dim());
  auto inv = at::empty_like(sumsq);
  const float* SS = sumsq.data_ptr<float>();
  float* IV = inv.data_ptr<float>();
  const float e = static_cast<float>(eps), silent = static_cast<float>(silent_norm);
  at::parallel_for(0, sumsq.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float norm = std::sqrt(SS[i]);
      IV[i] = (silent_norm >= 0 && norm < silent) ? 0.f : 1.f / (norm + e);
    }
  });
  return inv;
}

at::Tensor inv_norm_grad_map(const at::Tensor& sumsq, const at::Tensor& grad_inv, double eps, double silent_norm) {
  check(sumsq, "sumsq", sumsq.dim()); check(grad_inv, "grad_inv", sumsq.dim());
  TORCH_CHECK(grad_inv.sizes() == sumsq.sizes(), "iieu_cpu: grad_inv must be shaped like sumsq");
  auto grad = at::empty_like(sumsq);
  const float *SS = sumsq.data_ptr<float>(), *GI = grad_inv.data_ptr<float>();
  float* G = grad.data_ptr<float>();
  const float e = static_cast<float>(eps), silent = static_cast<float>(silent_norm);
  at::parallel_for(0, sumsq.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float norm = std::sqrt(SS[i]), inv = 1.f / (norm + e);
      const bool live = norm > 0 && !(silent_norm >= 0 && norm < silent);
      G[i] = live ? -GI[i] * (inv * inv) / (2 * norm) : 0.f;
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY(actlab_iieu, m) {
  m.def("rows_inv_norm", rows_inv_norm);
  m.def("rows_inv_norm_backward", rows_inv_norm_backward);
  m.def("planes_forward", planes_forward);
  m.def("planes_backward", planes_backward);
  m.def("rows_forward", rows_forward);
  m.def("rows_backward", rows_backward);
  m.def("plane_moments", plane_moments);
  m.def("planes_channel_sumsq", planes_channel_sumsq);
  m.def("planes_channel_scale", planes_channel_scale);
  m.def("inv_norm_map", inv_norm_map);
  m.def("inv_norm_grad_map", inv_norm_grad_map);
  m.def("planes_bn_sums", planes_bn_sums);
  m.def("planes_bn_grad", planes_bn_grad);
  m.def("coupler_forward", coupler_forward);
  m.def("coupler_sums", coupler_sums);
  m.def("coupler_grads", coupler_grads);
}
