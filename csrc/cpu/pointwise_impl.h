// The per-step pointwise math of every cell on the CPU: activations, state updates and
// their derivatives, fused in one pass over a block of batch rows.
//
// This file is included twice by pointwise.cpp, inside an AVX2+FMA target region and
// once for the baseline ISA, each time into its own namespace; it has no include guard
// on purpose. Loops run over contiguous hidden units so that the compiler vectorises
// them; float activations use branch-free polynomial forms for the same reason
// (libm's scalar expf/tanhf would cost more than the recurrent GEMM).
//
// Pointer arguments point at row n0 of a [N, ...] block; `ld*` are row strides in
// elements. Shapes per step: pre/gates [N, G*H], states [N, H].

// ---- activations ----------------------------------------------------------------

// exp for float, |rel err| ~ 2 ulp on [-87, 88]; inputs are clamped to that range,
// which only changes results that under- or overflow in every later use (sigmoid, tanh).
inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round x / ln2 to the nearest integer n with the 1.5 * 2^23 shifter
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  const int32_t ni = n_bits - 0x4B400000;
  // r = x - n ln2 in two parts (Cody-Waite), then a degree-7 polynomial for e^r
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const int32_t scale_bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return er * scale;
}

inline float sigmoid_act(float x) { return 1.0f / (1.0f + exp_f(-x)); }
inline double sigmoid_act(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline float tanh_act(float x) {
  const float ax = std::fabs(x);
  // |x| >= 0.625: 1 - 2 / (e^{2|x|} + 1), sign restored
  const float large = std::copysign(1.0f - 2.0f / (exp_f(2.0f * ax) + 1.0f), x);
  // |x| < 0.625: odd minimax polynomial, keeps full relative accuracy near 0
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  return ax < 0.625f ? small : large;
}
inline double tanh_act(double x) { return std::tanh(x); }

// relu keeps NaN, as torch.relu does
template <typename scalar_t>
inline scalar_t relu_act(scalar_t x) { return x < scalar_t(0) ? scalar_t(0) : x; }

// ---- Elman -----------------------------------------------------------------------

// In place over `count` contiguous elements: pre-activation -> h.
template <typename scalar_t>
void elman_forward_block(scalar_t* pre, int64_t count, int64_t activation) {
  if (activation == 0) {
    for (int64_t k = 0; k < count; ++k) pre[k] = tanh_act(pre[k]);
  } else if (activation == 1) {
    for (int64_t k = 0; k < count; ++k) pre[k] = relu_act(pre[k]);
  }
}

// dpre = (dy + dh_carry) * act'(pre), with act' written in terms of h.
template <typename scalar_t>
void elman_backward_block(const scalar_t* dy, const scalar_t* dh_carry, const scalar_t* h,
                          scalar_t* dpre, int64_t count, int64_t activation) {
  if (activation == 0) {
    for (int64_t k = 0; k < count; ++k)
      dpre[k] = (dy[k] + dh_carry[k]) * (scalar_t(1) - h[k] * h[k]);
  } else if (activation == 1) {
    for (int64_t k = 0; k < count; ++k)
      dpre[k] = h[k] > scalar_t(0) ? dy[k] + dh_carry[k] : scalar_t(0);
  } else {
    for (int64_t k = 0; k < count; ++k) dpre[k] = dy[k] + dh_carry[k];
  }
}

// ---- LSTM ------------------------------------------------------------------------

// pre [rows, 4H] (all biases and both GEMMs included); c_prev row stride ld_c_prev;
// h, c [rows, H]; cache [rows, 5H] = i, f, g, o, c (null in inference, then c is the
// running state and may alias c_prev).
template <typename scalar_t>
void lstm_forward_block(const scalar_t* pre, const scalar_t* c_prev, int64_t ld_c_prev,
                        scalar_t* h, scalar_t* c, int64_t ld_c, scalar_t* cache, int64_t rows,
                        int64_t H) {
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* p = pre + n * 4 * H;
    const scalar_t* cp = c_prev + n * ld_c_prev;
    scalar_t* hn = h + n * H;
    scalar_t* cn = c + n * ld_c;
    if (cache) {
      scalar_t* s = cache + n * 5 * H;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t i = sigmoid_act(p[j]);
        const scalar_t f = sigmoid_act(p[H + j]);
        const scalar_t g = tanh_act(p[2 * H + j]);
        const scalar_t o = sigmoid_act(p[3 * H + j]);
        const scalar_t cv = f * cp[j] + i * g;
        s[j] = i;
        s[H + j] = f;
        s[2 * H + j] = g;
        s[3 * H + j] = o;
        cn[j] = cv;
        hn[j] = o * tanh_act(cv);
      }
    } else {
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t i = sigmoid_act(p[j]);
        const scalar_t f = sigmoid_act(p[H + j]);
        const scalar_t g = tanh_act(p[2 * H + j]);
        const scalar_t o = sigmoid_act(p[3 * H + j]);
        const scalar_t cv = f * cp[j] + i * g;
        cn[j] = cv;
        hn[j] = o * tanh_act(cv);
      }
    }
  }
}

// dy, dh_carry [rows, H]; dc [rows, H] holds dL/dc_t on entry and dL/dc_{t-1} on exit;
// cache [rows, 5H] of step t; c_prev row stride ld_c_prev; dgates [rows, 4H] out.
template <typename scalar_t>
void lstm_backward_block(const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc,
                         const scalar_t* cache, const scalar_t* c_prev, int64_t ld_c_prev,
                         scalar_t* dgates, int64_t rows, int64_t H) {
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* s = cache + n * 5 * H;
    const scalar_t* cp = c_prev + n * ld_c_prev;
    const scalar_t* dyn = dy + n * H;
    const scalar_t* dhc = dh_carry + n * H;
    scalar_t* dcn = dc + n * H;
    scalar_t* dg = dgates + n * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = s[j], f = s[H + j], g = s[2 * H + j], o = s[3 * H + j];
      const scalar_t tc = tanh_act(s[4 * H + j]);
      const scalar_t dh = dyn[j] + dhc[j];
      const scalar_t dcv = dcn[j] + dh * o * (scalar_t(1) - tc * tc);
      dg[j] = dcv * g * i * (scalar_t(1) - i);
      dg[H + j] = dcv * cp[j] * f * (scalar_t(1) - f);
      dg[2 * H + j] = dcv * i * (scalar_t(1) - g * g);
      dg[3 * H + j] = dh * tc * o * (scalar_t(1) - o);
      dcn[j] = dcv * f;
    }
  }
}

// ---- GRU -------------------------------------------------------------------------

// xp [rows, 3H] = W_ih x + b_ih + (b_hr, b_hz, 0); hh [rows, 3H] = W_hh h_prev (no bias);
// b_hn [H] or null; h_prev, h [rows, H]; cache [rows, 4H] = r, z, n, W_hn h + b_hn or null.
template <typename scalar_t>
void gru_forward_block(const scalar_t* xp, const scalar_t* hh, const scalar_t* b_hn,
                       const scalar_t* h_prev, scalar_t* h, scalar_t* cache, int64_t rows,
                       int64_t H) {
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* x3 = xp + n * 3 * H;
    const scalar_t* h3 = hh + n * 3 * H;
    const scalar_t* hp = h_prev + n * H;
    scalar_t* hn = h + n * H;
    scalar_t* s = cache ? cache + n * 4 * H : nullptr;
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t r = sigmoid_act(x3[j] + h3[j]);
      const scalar_t z = sigmoid_act(x3[H + j] + h3[H + j]);
      const scalar_t hn_lin = b_hn ? h3[2 * H + j] + b_hn[j] : h3[2 * H + j];
      const scalar_t nv = tanh_act(x3[2 * H + j] + r * hn_lin);
      hn[j] = (scalar_t(1) - z) * nv + z * hp[j];
      if (s) {
        s[j] = r;
        s[H + j] = z;
        s[2 * H + j] = nv;
        s[3 * H + j] = hn_lin;
      }
    }
  }
}

// dy [rows, H]; dh_carry [rows, H] holds the recurrent gradient into h_t on entry and
// z * dL/dh_t on exit (the GEMM with W_hh is added to it afterwards); h_prev [rows, H];
// cache [rows, 4H]; dg_ih, dg_hh [rows, 3H] out (they differ in the n block only).
template <typename scalar_t>
void gru_backward_block(const scalar_t* dy, scalar_t* dh_carry, const scalar_t* h_prev,
                        const scalar_t* cache, scalar_t* dg_ih, scalar_t* dg_hh, int64_t rows,
                        int64_t H) {
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* s = cache + n * 4 * H;
    const scalar_t* dyn = dy + n * H;
    const scalar_t* hp = h_prev + n * H;
    scalar_t* dhc = dh_carry + n * H;
    scalar_t* gi = dg_ih + n * 3 * H;
    scalar_t* gh = dg_hh + n * 3 * H;
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t r = s[j], z = s[H + j], nv = s[2 * H + j], hn_lin = s[3 * H + j];
      const scalar_t dh = dyn[j] + dhc[j];
      const scalar_t dn = dh * (scalar_t(1) - z) * (scalar_t(1) - nv * nv);
      const scalar_t dz = dh * (hp[j] - nv) * z * (scalar_t(1) - z);
      const scalar_t dr = dn * hn_lin * r * (scalar_t(1) - r);
      gi[j] = dr;
      gi[H + j] = dz;
      gi[2 * H + j] = dn;
      gh[j] = dr;
      gh[H + j] = dz;
      gh[2 * H + j] = dn * r;
      dhc[j] = dh * z;
    }
  }
}
