// bfloat16 GEMMs with float32 results, for CPUs with AVX512-BF16 (vdpbf16ps: 16 float32
// sums, each += a0*b0 + a1*b1 over two bfloat16 pairs, twice the multiply-adds of a float32
// FMA per instruction). They serve the forward of bfloat16 layers: the input projection of
// all steps and the recurrent GEMM of each step, where h_{t-1} is rounded to bfloat16 (as
// torch.nn's oneDNN LSTM and rnnfast's CUDA kernels do). The inputs of a bfloat16 layer are
// bfloat16 values already, so x, W_ih and W_hh enter exactly; products are exact in float32
// and the sums run in float32.
//
// Packed weights (made once per op call): w [P rows, K] -> [ceil(H/16) blocks][ceil(K/2)
// pairs][G][16 units][2], where P = G*H and row k*H + u is unit u of gate k; units and the
// odd K padded with zeros. A 512-bit load is one gate's 16 units at a pair of K.
//
// Included once, by kernels.cpp, in a namespace of its own compiled for AVX-512 with
// avx512bf16, after step_gemm_impl.h (row_tiles, splits_for). No std:: containers or ATen
// calls here: an inline function instantiated under these target options could be the copy
// the linker keeps for the whole library; buffers and threads come from kernels.cpp.

#include <immintrin.h>

constexpr int64_t kBf16Lanes = 16;

// the bfloat16 bits of v, rounded to nearest even (v is finite or inf; NaN stays NaN)
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Rows [0, M) of a [M, K] (rows ld_a apart) as pairs of bfloat16 in one uint32 each,
// Kp = ceil(K/2) pairs a row (the odd K's last pair padded with zero), in groups of NR rows
// interleaved by pair: row n = g * NR + r at out[g * NR * Kp + p * w + r], w = the group's
// rows (NR, or what is left for the last). A tile's broadcasts of one pair then come from
// one cache line rather than one line per row.
inline void to_bf16_pairs(const float* a, int64_t ld_a, int64_t M, int64_t K, int64_t NR,
                          uint32_t* out) {
  const int64_t Kp = (K + 1) / 2, K32 = K - K % 32;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = m / NR, r = m % NR, w = std::min(NR, M - g * NR);
    const float* src = a + m * ld_a;
    uint32_t* dst = out + g * NR * Kp + r;
    int64_t j = 0;
    for (; j < K32; j += 32) {
      // _mm512_cvtne2ps_pbh(hi, lo): lo's 16 values in the low half, rounded to nearest
      // even; as uint32 pairs, element i = (src[j + 2i], src[j + 2i + 1])
      const __m512 lo = _mm512_loadu_ps(src + j), hi = _mm512_loadu_ps(src + j + 16);
      alignas(64) uint32_t v[16];
      _mm512_store_si512(v, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      for (int i = 0; i < 16; ++i) dst[(j / 2 + i) * w] = v[i];
    }
    for (; j < K; j += 2) {
      const uint32_t a0 = bf16_bits(src[j]);
      const uint32_t a1 = j + 1 < K ? bf16_bits(src[j + 1]) : 0u;
      dst[(j / 2) * w] = a0 | (a1 << 16);
    }
  }
}

// The same from bfloat16 values: a row's pairs are its uint32 words, copied into place.
inline void to_bf16_pairs(const uint16_t* a, int64_t ld_a, int64_t M, int64_t K, int64_t NR,
                          uint32_t* out) {
  const int64_t Kp = (K + 1) / 2, K2 = K / 2;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = m / NR, r = m % NR, w = std::min(NR, M - g * NR);
    const uint16_t* src = a + m * ld_a;
    uint32_t* dst = out + g * NR * Kp + r;
    for (int64_t p = 0; p < K2; ++p) {
      uint32_t v;
      std::memcpy(&v, src + 2 * p, 4);
      dst[p * w] = v;
    }
    if (K % 2 != 0) dst[K2 * w] = src[K - 1];
  }
}

// 16 vectors of 16 uint32 transposed in place: v[i][j] <- v[j][i].
inline void transpose16(__m512i v[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // 128-bit lane l of t[i]: v[i][4l], v[i+1][4l], ...
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // lane l of u[i + m]: column 4l + m of rows i..i+3
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // column 4l + m: lane l of u[m], u[4 + m], u[8 + m], u[12 + m]
    const __m512i a01 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44);
    const __m512i a23 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xee);
    const __m512i b01 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
    const __m512i b23 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xee);
    v[m] = _mm512_shuffle_i32x4(a01, b01, 0x88);
    v[4 + m] = _mm512_shuffle_i32x4(a01, b01, 0xdd);
    v[8 + m] = _mm512_shuffle_i32x4(a23, b23, 0x88);
    v[12 + m] = _mm512_shuffle_i32x4(a23, b23, 0xdd);
  }
}

// pairs [j/2, j/2 + 16) of a row of K values (K - j of them left), zeros past K
inline __m512i row_pairs(const float* row, int64_t j, int64_t K) {
  const int64_t left = K - j;
  if (left >= 32)
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + j + 16), _mm512_loadu_ps(row + j));
  const __mmask16 lo = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  const __mmask16 hi = left > 16 ? __mmask16((1u << (left - 16)) - 1) : __mmask16(0);
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, row + j + 16),
                                      _mm512_maskz_loadu_ps(lo, row + j));
}
inline __m512i row_pairs(const uint16_t* row, int64_t j, int64_t K) {
  const int64_t left = K - j;
  if (left >= 32) return _mm512_loadu_si512(row + j);
  return _mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), row + j);
}

// Unit block b of the packing above, for w [G*H rows, K] in float32 (holding bfloat16
// values) or bfloat16 (uint16_t), into dst: per gate, 16 pairs of its 16 rows at a time,
// transposed in registers; units past H and the odd K's last half-pair as zeros.
template <typename W>
void pack_block_bf16(const W* w, int64_t K, int64_t H, int64_t G, int64_t b, uint32_t* dst) {
  const int64_t u0 = b * kBf16Lanes, valid = std::min<int64_t>(kBf16Lanes, H - u0);
  const int64_t Kp = (K + 1) / 2;
  for (int64_t k = 0; k < G; ++k) {
    const W* rows = w + (k * H + u0) * K;
    for (int64_t j = 0; j < K; j += 32) {
      __m512i v[16];
      for (int64_t u = 0; u < 16; ++u)
        v[u] = u < valid ? row_pairs(rows + u * K, j, K) : _mm512_setzero_si512();
      transpose16(v);
      const int64_t p0 = j / 2, pairs = std::min<int64_t>(16, Kp - p0);
      for (int64_t q = 0; q < pairs; ++q)
        _mm512_storeu_si512(dst + ((p0 + q) * G + k) * kBf16Lanes, v[q]);
    }
  }
}

// rows per tile of the bfloat16 GEMMs (and the row groups of to_bf16_pairs): as many as
// keep 24 accumulators, 12 for one gate (Elman forward N = 64, H = 1024 on a Zen 5: 8 rows,
// 8 accumulators in flight, ran at 0.77x torch.nn, 12 at 1.14x)
constexpr int64_t bf16_tile_rows(int64_t G) { return G == 1 ? 12 : 24 / G; }

// Rows [0, NR) x gates [0, GP) of out[n][k * gate_stride + u] = (accumulate ? out : 0) +
// bias[k * gate_stride + u] (if given) + sum_p a[p * ld_p + n] . w[p][k][u] for u < valid,
// over the pairs p < Kp; w advances w_stride uint16 per pair, 2 * kBf16Lanes per gate.
template <int GP, int NR>
inline void gates_tile_bf16(const uint16_t* __restrict__ w, int64_t w_stride,
                            const uint32_t* __restrict__ a, int64_t ld_p, int64_t Kp,
                            float* __restrict__ out, int64_t ld_out, int64_t gate_stride,
                            int64_t valid, bool accumulate, const float* bias,
                            const uint16_t* next_w = nullptr) {
  constexpr int S = splits_for(NR * GP);
  // the outputs of the first K chunk of a step were last written by the input projection,
  // long gone from L1: fetch them while the K loop runs, not at the end (as the float32
  // tiles do; not for one gate, whose rows H floats apart would crowd one L1 set)
  if (accumulate && GP > 1)
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < GP; ++k) __builtin_prefetch(out + r * ld_out + k * gate_stride, 1, 3);
  __m512 acc[S][NR][GP];
  for (int q = 0; q < S; ++q)
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < GP; ++k) acc[q][r][k] = _mm512_setzero_ps();
  auto step = [&](int q, int64_t p) {
    __m512bh wv[GP];
    for (int k = 0; k < GP; ++k)
      wv[k] = (__m512bh)_mm512_loadu_si512(w + p * w_stride + k * 2 * kBf16Lanes);
    if (next_w != nullptr)
      for (int k = 0; k < GP; ++k) __builtin_prefetch(next_w + p * w_stride + k * 2 * kBf16Lanes);
    for (int r = 0; r < NR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[p * ld_p + r]));
      for (int k = 0; k < GP; ++k) acc[q][r][k] = _mm512_dpbf16_ps(acc[q][r][k], wv[k], av);
    }
  };
  int64_t p = 0;
  for (; p + S <= Kp; p += S)
    for (int q = 0; q < S; ++q) step(q, p + q);
  for (; p < Kp; ++p) step(0, p);
  for (int q = 1; q < S; ++q)
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < GP; ++k) acc[0][r][k] = _mm512_add_ps(acc[0][r][k], acc[q][r][k]);
  const __mmask16 mask = valid >= kBf16Lanes ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
  for (int r = 0; r < NR; ++r) {
    for (int k = 0; k < GP; ++k) {
      float* o = out + r * ld_out + k * gate_stride;
      __m512 v = acc[0][r][k];
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), v);
      if (bias != nullptr) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, bias + k * gate_stride), v);
      _mm512_mask_storeu_ps(o, mask, v);
    }
  }
}

// Pairs of K per pass: a pass's weights (G * 64 bytes a pair) stay within 32 KiB of L1.
// (LSTM, N = 64, C = 16, H = 1024 on a Zen 5: 16 KiB and 8 KiB passes took 1.2x-1.3x as
// long, 64 KiB and all of K within 5%, the run's noise.)
inline int64_t bf16_chunk_pairs(int64_t G) { return std::max<int64_t>(1, 32768 / (G * 64)); }

// Unit blocks [b0, b1) of out[n][k * H + u] (+)= sum_p a[n][p] . w[b][p][k][u] (+ bias) for
// rows [0, M), a in pairs and row groups of bf16_tile_rows(G) (to_bf16_pairs), Kp pairs, w
// packed as above.
template <int G>
void gates_blocks_bf16(const uint16_t* wp, const uint32_t* a, int64_t M, int64_t Kp, int64_t H,
                       float* out, int64_t b0, int64_t b1, bool accumulate, bool descending,
                       const float* bias) {
  constexpr int NR = bf16_tile_rows(G);
  const int64_t KC = bf16_chunk_pairs(G);
  for (int64_t i = 0; i < b1 - b0; ++i) {
    const int64_t b = descending ? b1 - 1 - i : b0 + i;
    const int64_t u = b * kBf16Lanes, valid = std::min<int64_t>(kBf16Lanes, H - u);
    for (int64_t k0 = 0; k0 < Kp || k0 == 0; k0 += KC) {
      const int64_t kc = std::min(KC, Kp - k0);
      const bool acc = accumulate || k0 > 0;
      const float* bs = k0 + KC >= Kp && bias != nullptr ? bias + u : nullptr;  // once, last
      const uint16_t* w = wp + (b * Kp + k0) * G * 2 * kBf16Lanes;
      // the first row tile fetches the weights of the chunk that comes next (this block's
      // next, or the next block's first), as the float32 kernels do
      const int64_t next_b = descending ? b - 1 : b + 1;
      const uint16_t* next_w = k0 + KC < Kp ? w + KC * G * 2 * kBf16Lanes
                               : i + 1 < b1 - b0 ? wp + next_b * Kp * G * 2 * kBf16Lanes
                                                 : nullptr;
      row_tiles<NR>(M, [&](auto rows, int64_t n) {
        const int64_t g = n / NR, width = std::min<int64_t>(NR, M - g * NR);
        const uint32_t* ap = a + g * NR * Kp + k0 * width + n % NR;
        gates_tile_bf16<G, decltype(rows)::value>(w, G * 2 * kBf16Lanes, ap, width, kc,
                                                  out + n * G * H + u, G * H, H, valid, acc, bs,
                                                  n == 0 ? next_w : nullptr);
      });
      if (Kp == 0) break;
    }
  }
}

// The recurrent GEMM of one step for unit blocks [b0, b1): out[n][k*H + u] (+)= (bf16(h)
// W_hh^T)[n][k*H + u]. h [N, H] in float32 is rounded to bfloat16 first, by each thread
// for itself into `pairs` (N * ceil(H/2)): N*H conversions against its N*H*G*H/threads
// multiply-adds.
template <int G>
void recurrent_gates_blocks_bf16(const uint16_t* wp, const float* h, int64_t N, int64_t H,
                                 float* out, int64_t b0, int64_t b1, bool accumulate,
                                 bool descending, uint32_t* pairs) {
  to_bf16_pairs(h, H, N, H, bf16_tile_rows(G), pairs);
  gates_blocks_bf16<G>(wp, pairs, N, (H + 1) / 2, H, out, b0, b1, accumulate, descending,
                       nullptr);
}

// The backward's dh step for unit blocks [b0, b1): dh [N, H] (+)= bf16(dg) [N, K] W_hh, K =
// G*H, through the one-gate tile, with W_hh^T [H, K] packed as one gate; dg rounded to
// bfloat16 by each thread for itself into `pairs` (N * ceil(K/2)).
inline void recurrent_dh_blocks_bf16(const uint16_t* wp, const float* dg, int64_t N, int64_t K,
                                     int64_t H, float* dh, int64_t b0, int64_t b1,
                                     bool accumulate, bool descending, uint32_t* pairs) {
  to_bf16_pairs(dg, K, N, K, bf16_tile_rows(1), pairs);
  gates_blocks_bf16<1>(wp, pairs, N, (K + 1) / 2, H, dh, b0, b1, accumulate, descending,
                       nullptr);
}

// Rows [m0, m0 + M) of out [., G*H] = x [., K] W^T + bias, x in bfloat16 (uint16_t) or in
// float32 holding bfloat16 values, through `pairs` (M * ceil(K/2)).
template <int G, typename X>
void projection_rows_bf16(const uint16_t* wp, const X* x, int64_t m0, int64_t M, int64_t K,
                          int64_t H, const float* bias, float* out, uint32_t* pairs) {
  const int64_t nb = (H + kBf16Lanes - 1) / kBf16Lanes;
  to_bf16_pairs(x + m0 * K, K, M, K, bf16_tile_rows(G), pairs);
  gates_blocks_bf16<G>(wp, pairs, M, (K + 1) / 2, H, out + m0 * G * H, 0, nb, false, false,
                       bias);
}
