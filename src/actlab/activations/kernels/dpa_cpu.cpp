// DPA's training forward, fused: TAU, the pooled response and the bit-packed pass mask in one pass over
// the map, and the matching backward in one pass. float32 CPU tensors, tau >= 0; conv maps x (B, C, P)
// contiguous with P = H * W (mean over P), or tokens x (B, N, C) (mean over the N tokens).
//   forward:  out = x if x >= tau else 0, v[b, c] = mean_p x,
//             passes = bits of x >= tau (8 per byte, element 8i + t in bit t of byte i; NaN: 0)
//   backward: grad_x = (passes ? grad_out : 0) + grad_v[b, c] / P
// Backward reads the mask, never the output: an in-place operation on the output after the unit (a
// Dropout(inplace=True)) cannot change the gradient.
// The Python side (actlab/activations/kernels/composite.py, tau_pool) is the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "dpa_cpu: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim, "dpa_cpu: ", name, " must have ", dim, " dims, got ", t.dim());
}

void check_passes(const at::Tensor& passes, int64_t numel) {
  TORCH_CHECK(passes.scalar_type() == at::kByte && passes.is_contiguous() && passes.numel() == (numel + 7) / 8,
              "dpa_cpu: passes must be the packed mask of ", numel, " elements");
}

// Elements per task that start on a byte of the mask: the smallest multiple of `unit` that is one of 8.
int64_t aligned_units(int64_t unit) { return 8 / std::gcd<int64_t>(unit, 8); }

// bits of x[i] >= tau for n elements starting on a byte boundary (the last byte may be partial). A
// vector of 8 (or 16) floats gives its byte (bytes) at once: the lanes that fail the comparison are the
// zero lanes of its result (NaN fails: bit 0).
void pack_passes(const float* x, int64_t n, float tau, uint8_t* bytes) {
  int64_t i = 0;
  if (Vec::size() % 8 == 0) {
    const Vec vt(tau);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const uint32_t bits = ~static_cast<uint32_t>((Vec::loadu(x + i) >= vt).zero_mask());
      for (int64_t k = 0; k < Vec::size() / 8; ++k) bytes[(i >> 3) + k] = static_cast<uint8_t>(bits >> (8 * k));
    }
  }
  for (; i + 8 <= n; i += 8) {
    uint8_t b = 0;
    for (int t = 0; t < 8; ++t) b |= static_cast<uint8_t>(x[i + t] >= tau) << t;
    bytes[i >> 3] = b;
  }
  if (i < n) {
    uint8_t b = 0;
    for (int t = 0; i + t < n; ++t) b |= static_cast<uint8_t>(x[i + t] >= tau) << t;
    bytes[i >> 3] = b;
  }
}

// Lane masks (all bits set where the flag is) for each packed byte, to select 8 floats at once.
const uint32_t* lane_masks() {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(256 * 8);
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) t[b * 8 + k] = ((b >> k) & 1) ? 0xFFFFFFFFu : 0u;
    return t;
  }();
  return table.data();
}

inline bool passes_at(const uint8_t* bits, int64_t e) { return (bits[e >> 3] >> (e & 7)) & 1; }

// gx[i] = (flag of element e0 + i ? g[i] : 0) + add[i] for i in [0, n); add_stride 0: one value for all.
void masked_grad(const float* g, const uint8_t* bits, int64_t e0, int64_t n, const float* add, int64_t add_stride,
                 float* gx) {
  int64_t i = 0;
  for (; i < n && ((e0 + i) & 7); ++i) gx[i] = (passes_at(bits, e0 + i) ? g[i] : 0.f) + add[i * add_stride];
  if (Vec::size() == 8) {
    const uint32_t* masks = lane_masks();
    for (; i + 8 <= n; i += 8) {
      const Vec m = Vec::loadu(masks + 8 * bits[(e0 + i) >> 3]);
      const Vec a = add_stride ? Vec::loadu(add + i) : Vec(add[0]);
      ((Vec::loadu(g + i) & m) + a).store(gx + i);
    }
  }
  for (; i < n; ++i) gx[i] = (passes_at(bits, e0 + i) ? g[i] : 0.f) + add[i * add_stride];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tau_pool_forward(const at::Tensor& x, double tau_d) {
  check(x, "x", 3);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2);
  auto out = at::empty_like(x);
  auto v = at::empty({B, C}, x.options());
  auto passes = at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
  const float* X = x.data_ptr<float>();
  float *O = out.data_ptr<float>(), *V = v.data_ptr<float>();
  uint8_t* bits = passes.data_ptr<uint8_t>();
  const float tau = static_cast<float>(tau_d);
  const int64_t rows = B * C, k = aligned_units(P);  // k planes per task: its mask bytes are its own
  at::parallel_for(0, (rows + k - 1) / k, 1, [&](int64_t begin, int64_t end) {
    const Vec vt(tau), zero(0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task * k, r1 = std::min(r0 + k, rows);
      for (int64_t bc = r0; bc < r1; ++bc) {
        const float* xr = X + bc * P;
        float* orow = O + bc * P;
        Vec acc(0.f);
        int64_t p = 0;
        for (; p + Vec::size() <= P; p += Vec::size()) {
          Vec xv = Vec::loadu(xr + p);
          acc = acc + xv;
          Vec::blendv(xv, zero, xv < vt).store(orow + p);
        }
        float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
        for (; p < P; ++p) {
          const float xv = xr[p];
          sum += xv;
          orow[p] = xv < tau ? 0.f : xv;
        }
        V[bc] = sum / static_cast<float>(P);
      }
      pack_passes(X + r0 * P, (r1 - r0) * P, tau, bits + ((r0 * P) >> 3));  // the task's planes, still cached
    }
  });
  return {out, v, passes};
}

at::Tensor tau_pool_backward(const at::Tensor& grad_out, const at::Tensor& passes,
                             const c10::optional<at::Tensor>& grad_v) {
  check(grad_out, "grad_out", 3);
  const int64_t B = grad_out.size(0), C = grad_out.size(1), P = grad_out.size(2);
  check_passes(passes, grad_out.numel());
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv) check(*grad_v, "grad_v", 2);
  auto grad_x = at::empty_like(grad_out);
  const float* G = grad_out.data_ptr<float>();
  const uint8_t* bits = passes.data_ptr<uint8_t>();
  const float* GV = has_gv ? grad_v->data_ptr<float>() : nullptr;
  float* GX = grad_x.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const float add = has_gv ? GV[bc] / static_cast<float>(P) : 0.f;
      masked_grad(G + bc * P, bits, bc * P, P, &add, 0, GX + bc * P);
    }
  });
  return grad_x;
}

// Token sites: x (B, N, C) contiguous, v[b, c] = mean over the N tokens. One task per sample (or per few
// samples, so that each task's mask bytes are its own).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tau_pool_tokens_forward(const at::Tensor& x, double tau_d) {
  check(x, "x", 3);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  auto out = at::empty_like(x);
  auto v = at::zeros({B, C}, x.options());
  auto passes = at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
  const float* X = x.data_ptr<float>();
  float *O = out.data_ptr<float>(), *V = v.data_ptr<float>();
  uint8_t* bits = passes.data_ptr<uint8_t>();
  const float tau = static_cast<float>(tau_d);
  const int64_t k = aligned_units(N * C);
  at::parallel_for(0, (B + k - 1) / k, 1, [&](int64_t begin, int64_t end) {
    const Vec vt(tau), zero(0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b0 = task * k, b1 = std::min(b0 + k, B);
      for (int64_t b = b0; b < b1; ++b) {
        float* vb = V + b * C;
        for (int64_t n = 0; n < N; ++n) {
          const float* xr = X + (b * N + n) * C;
          float* orow = O + (b * N + n) * C;
          int64_t c = 0;
          for (; c + Vec::size() <= C; c += Vec::size()) {
            Vec xv = Vec::loadu(xr + c);
            (Vec::loadu(vb + c) + xv).store(vb + c);
            Vec::blendv(xv, zero, xv < vt).store(orow + c);
          }
          for (; c < C; ++c) {
            const float xv = xr[c];
            vb[c] += xv;
            orow[c] = xv < tau ? 0.f : xv;
          }
        }
        for (int64_t c = 0; c < C; ++c) vb[c] /= static_cast<float>(N);
      }
      pack_passes(X + b0 * N * C, (b1 - b0) * N * C, tau, bits + ((b0 * N * C) >> 3));
    }
  });
  return {out, v, passes};
}

at::Tensor tau_pool_tokens_backward(const at::Tensor& grad_out, const at::Tensor& passes,
                                    const c10::optional<at::Tensor>& grad_v) {
  check(grad_out, "grad_out", 3);
  const int64_t B = grad_out.size(0), N = grad_out.size(1), C = grad_out.size(2);
  check_passes(passes, grad_out.numel());
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv) check(*grad_v, "grad_v", 2);
  auto grad_x = at::empty_like(grad_out);
  auto add = has_gv ? (*grad_v / static_cast<double>(N)).to(at::kFloat).contiguous()
                    : at::zeros({B, C}, grad_out.options());
  const float *G = grad_out.data_ptr<float>(), *A = add.data_ptr<float>();
  const uint8_t* bits = passes.data_ptr<uint8_t>();
  float* GX = grad_x.data_ptr<float>();
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      masked_grad(G + r * C, bits, r * C, C, A + (r / N) * C, 1, GX + r * C);
  });
  return grad_x;
}

// TAU's pass mask alone (sites the fused kernels do not take): bits of x >= tau for a contiguous float32 x.
at::Tensor pass_mask(const at::Tensor& x, double tau_d) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "dpa_cpu: x must be a contiguous float32 CPU tensor");
  auto passes = at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
  const float* X = x.data_ptr<float>();
  uint8_t* bits = passes.data_ptr<uint8_t>();
  const float tau = static_cast<float>(tau_d);
  const int64_t chunk = 1 << 14;  // a multiple of 8: tasks never share a byte
  at::parallel_for(0, (x.numel() + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e0 = t * chunk;
      pack_passes(X + e0, std::min(chunk, x.numel() - e0), tau, bits + (e0 >> 3));
    }
  });
  return passes;
}

// grad where the mask passes, else 0, for a contiguous float32 grad of the masked tensor's size.
at::Tensor masked_grad_op(const at::Tensor& grad, const at::Tensor& passes) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "dpa_cpu: grad must be a contiguous float32 CPU tensor");
  check_passes(passes, grad.numel());
  auto out = at::empty_like(grad);
  const float* G = grad.data_ptr<float>();
  const uint8_t* bits = passes.data_ptr<uint8_t>();
  float* O = out.data_ptr<float>();
  const float zero = 0.f;
  const int64_t chunk = 1 << 14;
  at::parallel_for(0, (grad.numel() + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e0 = t * chunk;
      masked_grad(G + e0, bits, e0, std::min(chunk, grad.numel() - e0), &zero, 0, O + e0);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(actlab_dpa, m) {
  m.def("tau_pool_forward", tau_pool_forward);
  m.def("tau_pool_backward", tau_pool_backward);
  m.def("tau_pool_tokens_forward", tau_pool_tokens_forward);
  m.def("tau_pool_tokens_backward", tau_pool_tokens_backward);
  m.def("pass_mask", pass_mask);
  m.def("masked_grad", masked_grad_op);
}
