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
// elements. Shapes per step: pre/gates [N, G*H], states [N, H]. Distinct arguments never
// overlap (in_ptr/out_ptr below; an in/out argument is one pointer).

// Pointers that alias no other pointer of the loop: without this GCC gives up
// vectorising loops with many streams (too many run-time alias checks).
// Row kernels are not inlined into their callers, and their loops carry `ivdep`: the gate
// blocks of one row (p, p + H, ...) derive from one pointer, and GCC would otherwise guard
// the vector loop with run-time overlap checks whose scalar fallback it took in practice.
#define RNNFAST_NOINLINE __attribute__((noinline))
// Activations must inline into the row loops, or those loops stop vectorising (GCC's
// inliner budget for this file otherwise depends on how much else it holds).
#define RNNFAST_INLINE inline __attribute__((always_inline))

template <typename T>
using in_ptr = const T* __restrict__;
template <typename T>
using out_ptr = T* __restrict__;

// ---- activations ----------------------------------------------------------------

// exp for float, |rel err| ~ 2 ulp on [-87, 88]; inputs are clamped to that range,
// which only changes results that under- or overflow in every later use (sigmoid, tanh).
RNNFAST_INLINE float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round x / ln2 to the nearest integer n with the 1.5 * 2^23 shifter
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  // the bit arithmetic unsigned: a NaN input makes n_bits any value, and a signed
  // overflow there would be undefined (before C++20)
  uint32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  const uint32_t ni = n_bits - 0x4B400000u;
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
  const uint32_t scale_bits = (ni + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return er * scale;
}

// e^r - 1 for |r| <= ln2 / 2: Taylor to degree 13 (the next term is under 2e-16 of the
// result), without the cancellation of computing e^r and subtracting 1.
RNNFAST_INLINE double expm1_reduced(double r) {
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  return p * r * r + r;
}

// x = n ln2 + r with |r| <= ln2 / 2 (n by the 1.5 * 2^52 shifter, r by Cody-Waite in two
// parts), for x clamped to [-708, 709]: returns r, and 2^n in *scale. Branch-free, so the
// row loops vectorise for double as for float; libm's scalar exp and tanh made the float64
// pointwise step cost more than its GEMM (LSTM N = 16, H = 256: 0.74x torch.nn's forward).
RNNFAST_INLINE double reduce_exp(double x, double* scale) {
  x = x < -708.0 ? -708.0 : x;
  x = x > 709.0 ? 709.0 : x;
  const double shifted = x * 1.4426950408889634 + 6755399441055744.0;
  const double n = shifted - 6755399441055744.0;
  uint64_t n_bits;  // unsigned, as in exp_f
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  const uint64_t scale_bits = (n_bits - 0x4338000000000000ULL + 1023u) << 52;
  std::memcpy(scale, &scale_bits, sizeof(*scale));
  return (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
}

// e^x - 1 = 2^n (e^r - 1) + (2^n - 1): full relative accuracy near 0 (n = 0 there).
RNNFAST_INLINE double expm1_d(double x) {
  double scale;
  const double r = reduce_exp(x, &scale);
  return scale * expm1_reduced(r) + (scale - 1.0);
}
RNNFAST_INLINE double exp_d(double x) {
  double scale;
  const double r = reduce_exp(x, &scale);
  return scale * expm1_reduced(r) + scale;
}

// Past the exp's clamp the sigmoid is 0 (the clamped exp would give its smallest normal
// value instead, and a gate of -inf times an infinite state must be NaN, as in torch).
RNNFAST_INLINE float sigmoid_act(float x) {
  const float s = 1.0f / (1.0f + exp_f(-x));
  return x < -88.0f ? 0.0f : s;
}
RNNFAST_INLINE double sigmoid_act(double x) {
  const double s = 1.0 / (1.0 + exp_d(-x));
  return x < -709.0 ? 0.0 : s;
}

RNNFAST_INLINE float tanh_act(float x) {
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
// tanh |x| = e / (e + 2) with e = e^{2|x|} - 1 (exact to rounding near 0, 1 past |x| = 19)
RNNFAST_INLINE double tanh_act(double x) {
  const double e = expm1_d(2.0 * std::fabs(x));
  return std::copysign(e / (e + 2.0), x);
}

// relu keeps NaN, as torch.relu does
template <typename scalar_t>
RNNFAST_INLINE scalar_t relu_act(scalar_t x) { return x < scalar_t(0) ? scalar_t(0) : x; }

// ---- Elman -----------------------------------------------------------------------

// Block functions take pointers at row 0, unit 0 of [rows, ...] arrays whose gate blocks
// are H apart, and work on units [u0, u0 + count) of every row: the weight-stationary
// float path gives each thread a fixed slice of units; the generic path passes all units
// of a slice of rows.

// In place: pre-activation -> h.
template <typename scalar_t>
void elman_forward_block(scalar_t* pre, int64_t rows, int64_t H, int64_t u0, int64_t count,
                         int64_t activation) {
  for (int64_t n = 0; n < rows; ++n) {
    out_ptr<scalar_t> p = pre + n * H + u0;
    if (activation == 0) {
      #pragma GCC ivdep
      for (int64_t k = 0; k < count; ++k) p[k] = tanh_act(p[k]);
    } else if (activation == 1) {
      #pragma GCC ivdep
      for (int64_t k = 0; k < count; ++k) p[k] = relu_act(p[k]);
    }
  }
}

template <typename scalar_t>
RNNFAST_NOINLINE void elman_backward_row(in_ptr<scalar_t> dy, in_ptr<scalar_t> dh_carry,
                               in_ptr<scalar_t> h, out_ptr<scalar_t> dpre, int64_t count,
                               int64_t activation) {
  if (activation == 0) {
    #pragma GCC ivdep
    for (int64_t k = 0; k < count; ++k)
      dpre[k] = (dy[k] + dh_carry[k]) * (scalar_t(1) - h[k] * h[k]);
  } else if (activation == 1) {
    #pragma GCC ivdep
    for (int64_t k = 0; k < count; ++k)
      dpre[k] = h[k] > scalar_t(0) ? dy[k] + dh_carry[k] : scalar_t(0);
  } else {
    #pragma GCC ivdep
    for (int64_t k = 0; k < count; ++k) dpre[k] = dy[k] + dh_carry[k];
  }
}

// dpre = (dy + dh_carry) * act'(pre), with act' written in terms of h.
template <typename scalar_t>
void elman_backward_block(const scalar_t* dy, const scalar_t* dh_carry, const scalar_t* h,
                          scalar_t* dpre, int64_t rows, int64_t H, int64_t u0, int64_t count,
                          int64_t activation) {
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t o = n * H + u0;
    elman_backward_row(dy + o, dh_carry + o, h + o, dpre + o, count, activation);
  }
}

// ---- LSTM ------------------------------------------------------------------------

// One row of the LSTM step; kCache selects training (store i, f, g, o) at compile time
// so that the loop has no branch in it.
template <bool kCache, typename scalar_t>
RNNFAST_NOINLINE void lstm_forward_row(in_ptr<scalar_t> p, in_ptr<scalar_t> cp, out_ptr<scalar_t> hn,
                             out_ptr<scalar_t> cn, out_ptr<scalar_t> s, int64_t H, int64_t count) {
  // one pointer per gate block: GCC vectorises [j] accesses, not [k * H + j]
  in_ptr<scalar_t> pi = p, pf = p + H, pg = p + 2 * H, po = p + 3 * H;
  out_ptr<scalar_t> si = s, sf = s + H, sg = s + 2 * H, so = s + 3 * H;
  #pragma GCC ivdep
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t i = sigmoid_act(pi[j]);
    const scalar_t f = sigmoid_act(pf[j]);
    const scalar_t g = tanh_act(pg[j]);
    const scalar_t o = sigmoid_act(po[j]);
    const scalar_t cv = f * cp[j] + i * g;
    if (kCache) {
      si[j] = i;
      sf[j] = f;
      sg[j] = g;
      so[j] = o;
    }
    cn[j] = cv;
    hn[j] = o * tanh_act(cv);
  }
}

// pre [rows, 4H] (all biases and both GEMMs included); c_prev row stride ld_c_prev;
// h [rows, H]; c row stride ld_c; cache [rows, 5H] = i, f, g, o, c (null in inference).
template <typename scalar_t>
void lstm_forward_block(const scalar_t* pre, const scalar_t* c_prev, int64_t ld_c_prev,
                        scalar_t* h, scalar_t* c, int64_t ld_c, scalar_t* cache, int64_t rows,
                        int64_t H, int64_t u0, int64_t count) {
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* p = pre + n * 4 * H + u0;
    const scalar_t* cp = c_prev + n * ld_c_prev + u0;
    scalar_t* hn = h + n * H + u0;
    scalar_t* cn = c + n * ld_c + u0;
    if (cache) {
      lstm_forward_row<true>(p, cp, hn, cn, cache + n * 5 * H + u0, H, count);
    } else {
      lstm_forward_row<false>(p, cp, hn, cn, static_cast<scalar_t*>(nullptr), H, count);
    }
  }
}

template <typename scalar_t>
RNNFAST_NOINLINE void lstm_backward_row(in_ptr<scalar_t> dy, in_ptr<scalar_t> dh_carry, out_ptr<scalar_t> dc,
                              in_ptr<scalar_t> s, in_ptr<scalar_t> cp, out_ptr<scalar_t> dg,
                              int64_t H, int64_t count) {
  in_ptr<scalar_t> si = s, sf = s + H, sg = s + 2 * H, so = s + 3 * H, sc = s + 4 * H;
  out_ptr<scalar_t> di = dg, df = dg + H, dgg = dg + 2 * H, dout = dg + 3 * H;
  #pragma GCC ivdep
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t i = si[j], f = sf[j], g = sg[j], o = so[j];
    const scalar_t tc = tanh_act(sc[j]);
    const scalar_t dh = dy[j] + dh_carry[j];
    const scalar_t dcv = dc[j] + dh * o * (scalar_t(1) - tc * tc);
    di[j] = dcv * g * i * (scalar_t(1) - i);
    df[j] = dcv * cp[j] * f * (scalar_t(1) - f);
    dgg[j] = dcv * i * (scalar_t(1) - g * g);
    dout[j] = dh * tc * o * (scalar_t(1) - o);
    dc[j] = dcv * f;
  }
}

// dy, dh_carry [rows, H]; dc [rows, H] holds dL/dc_t on entry and dL/dc_{t-1} on exit;
// cache [rows, 5H] of step t; c_prev row stride ld_c_prev; dgates [rows, 4H] out.
template <typename scalar_t>
void lstm_backward_block(const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc,
                         const scalar_t* cache, const scalar_t* c_prev, int64_t ld_c_prev,
                         scalar_t* dgates, int64_t rows, int64_t H, int64_t u0, int64_t count) {
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t o = n * H + u0;
    lstm_backward_row(dy + o, dh_carry + o, dc + o, cache + n * 5 * H + u0,
                      c_prev + n * ld_c_prev + u0, dgates + n * 4 * H + u0, H, count);
  }
}

// ---- GRU -------------------------------------------------------------------------

// One row of the GRU step; kCache as for the LSTM.
template <bool kCache, typename scalar_t>
RNNFAST_NOINLINE void gru_forward_row(in_ptr<scalar_t> x3, in_ptr<scalar_t> h3, in_ptr<scalar_t> b_hn,
                            in_ptr<scalar_t> hp, out_ptr<scalar_t> hn, out_ptr<scalar_t> s,
                            int64_t H, int64_t count) {
  in_ptr<scalar_t> xr = x3, xz = x3 + H, xn = x3 + 2 * H;
  in_ptr<scalar_t> hr = h3, hz = h3 + H, hnl = h3 + 2 * H;
  out_ptr<scalar_t> sr = s, sz = s + H, sn = s + 2 * H, sl = s + 3 * H;
  #pragma GCC ivdep
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t r = sigmoid_act(xr[j] + hr[j]);
    const scalar_t z = sigmoid_act(xz[j] + hz[j]);
    const scalar_t hn_lin = hnl[j] + b_hn[j];
    const scalar_t nv = tanh_act(xn[j] + r * hn_lin);
    hn[j] = (scalar_t(1) - z) * nv + z * hp[j];
    if (kCache) {
      sr[j] = r;
      sz[j] = z;
      sn[j] = nv;
      sl[j] = hn_lin;
    }
  }
}

// xp [rows, 3H] = W_ih x + b_ih + (b_hr, b_hz, 0); hh [rows, 3H] = W_hh h_prev (no bias);
// b_hn [H] (zeros without bias); h_prev, h [rows, H]; cache [rows, 4H] = r, z, n and
// W_hn h + b_hn, or null in inference.
template <typename scalar_t>
void gru_forward_block(const scalar_t* xp, const scalar_t* hh, const scalar_t* b_hn,
                       const scalar_t* h_prev, scalar_t* h, scalar_t* cache, int64_t rows,
                       int64_t H, int64_t u0, int64_t count) {
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* x3 = xp + n * 3 * H + u0;
    const scalar_t* h3 = hh + n * 3 * H + u0;
    const int64_t o = n * H + u0;
    if (cache) {
      gru_forward_row<true>(x3, h3, b_hn + u0, h_prev + o, h + o, cache + n * 4 * H + u0, H,
                            count);
    } else {
      gru_forward_row<false>(x3, h3, b_hn + u0, h_prev + o, h + o,
                             static_cast<scalar_t*>(nullptr), H, count);
    }
  }
}

template <typename scalar_t>
RNNFAST_NOINLINE void gru_backward_row(in_ptr<scalar_t> dy, out_ptr<scalar_t> dh_carry,
                             in_ptr<scalar_t> hp, in_ptr<scalar_t> s, out_ptr<scalar_t> gi,
                             out_ptr<scalar_t> gh, int64_t H, int64_t count) {
  in_ptr<scalar_t> sr = s, sz = s + H, sn = s + 2 * H, sl = s + 3 * H;
  out_ptr<scalar_t> gir = gi, giz = gi + H, gin = gi + 2 * H;
  out_ptr<scalar_t> ghr = gh, ghz = gh + H, ghn = gh + 2 * H;
  #pragma GCC ivdep
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t r = sr[j], z = sz[j], nv = sn[j], hn_lin = sl[j];
    const scalar_t dh = dy[j] + dh_carry[j];
    const scalar_t dn = dh * (scalar_t(1) - z) * (scalar_t(1) - nv * nv);
    const scalar_t dz = dh * (hp[j] - nv) * z * (scalar_t(1) - z);
    const scalar_t dr = dn * hn_lin * r * (scalar_t(1) - r);
    gir[j] = dr;
    giz[j] = dz;
    gin[j] = dn;
    ghr[j] = dr;
    ghz[j] = dz;
    ghn[j] = dn * r;
    dh_carry[j] = dh * z;
  }
}

// dy [rows, H]; dh_carry [rows, H] holds the recurrent gradient into h_t on entry and
// z * dL/dh_t on exit (the GEMM with W_hh is added to it afterwards); h_prev [rows, H];
// cache [rows, 4H]; dg_ih, dg_hh [rows, 3H] out (they differ in the n block only).
template <typename scalar_t>
void gru_backward_block(const scalar_t* dy, scalar_t* dh_carry, const scalar_t* h_prev,
                        const scalar_t* cache, scalar_t* dg_ih, scalar_t* dg_hh, int64_t rows,
                        int64_t H, int64_t u0, int64_t count) {
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t o = n * H + u0;
    gru_backward_row(dy + o, dh_carry + o, h_prev + o, cache + n * 4 * H + u0,
                     dg_ih + n * 3 * H + u0, dg_hh + n * 3 * H + u0, H, count);
  }
}
