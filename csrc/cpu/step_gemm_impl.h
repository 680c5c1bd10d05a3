// The recurrent GEMMs of one time step in float32, weight-stationary: each thread owns a
// fixed range of unit blocks of the hidden state for the whole sequence, so its slice
// of W_hh stays in its own core's cache from step to step (at small batch the step is
// bound by reading W_hh; BLAS re-reads and re-packs all of it every step).
//
// Packed layouts (made once per op call, units padded to a multiple of L with zeros, L =
// kLanes, the unit block: 16 in the AVX-512 build, else 8):
//   forward  wf [H/L blocks][H (j)][G][L units]: gate pre-activations of block b are
//            sum_j h[n][j] * wf[b][j][k][:], one L-wide FMA per (n, j, gate)
//   backward wb [H/L blocks][G*H (g)][L units]: dh_prev[n][Lb:Lb+L] = sum_g dg[n][g] * wb[b][g][:]
//
// Like pointwise_impl.h, included once per ISA (AVX-512, AVX2+FMA, baseline) by
// kernels.cpp, which defines RNNFAST_LANES (the vector width in floats) and
// RNNFAST_ACC_REGS (the accumulator vectors a tile keeps: 12 of AVX2's 16 registers, 24 of
// AVX-512's 32) first. GCC's vector extensions lower the vector types to whatever the
// target has. Each output is summed by one thread in a fixed order: results do not depend
// on the thread count.

constexpr int kLanes = RNNFAST_LANES;
constexpr int kAccRegs = RNNFAST_ACC_REGS;

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8_unaligned __attribute__((vector_size(32), aligned(4), __may_alias__));
typedef float vfl __attribute__((vector_size(4 * kLanes)));
typedef float vfl_unaligned __attribute__((vector_size(4 * kLanes), aligned(4), __may_alias__));

inline vf8 load8(const float* p) { return *reinterpret_cast<const vf8_unaligned*>(p); }
inline void store8(float* p, const vf8& v) { *reinterpret_cast<vf8_unaligned*>(p) = v; }
inline vfl loadl(const float* p) { return *reinterpret_cast<const vfl_unaligned*>(p); }
inline void storel(float* p, const vfl& v) { *reinterpret_cast<vfl_unaligned*>(p) = v; }

// Independent accumulator sets per output: an FMA chain waits ~4 cycles per step, so with
// fewer than 8 accumulators in flight (few rows, few gates) the K loop is split into S
// interleaved partial sums, added at the end (a fixed order: still deterministic).
constexpr int splits_for(int accumulators) {
  return accumulators >= 8 ? 1 : (accumulators >= 4 ? 2 : 4);
}

// Rows [0, NR) x gates [0, GP) of out[n][k * gate_stride + u] (+)= sum_j h[n][j] * w[j][k][u]
// for u < valid, where w advances w_stride floats per j. NR x GP vectors of accumulators:
// kAccRegs of them, plus the GP weight vectors and one broadcast, fill the registers.
// SPLITS: the K loop's partial sums (0: splits_for(NR * GP)).
template <int GP, int NR, bool PREFETCH_OUT = true, int SPLITS = 0>
inline void gates_tile(const float* __restrict__ w, int64_t w_stride, const float* __restrict__ h,
                       int64_t ld_h, int64_t K, float* __restrict__ out, int64_t ld_out,
                       int64_t gate_stride, int64_t valid, bool accumulate,
                       int64_t w_gate_stride = kLanes, const float* next_w = nullptr) {
  constexpr int S = SPLITS > 0 ? SPLITS : splits_for(NR * GP);
  // the outputs are rows 4*G*H bytes apart, last written by the input projection (long
  // gone from L1): fetch them while the K loop runs, not at the end
  if (accumulate && PREFETCH_OUT)
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < GP; ++k) __builtin_prefetch(out + r * ld_out + k * gate_stride, 1, 3);
  vfl acc[S][NR][GP];
  for (int q = 0; q < S; ++q)
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < GP; ++k) acc[q][r][k] = vfl{};
  auto step = [&](int q, int64_t j) {
    vfl wv[GP];
    for (int k = 0; k < GP; ++k) wv[k] = loadl(w + j * w_stride + k * w_gate_stride);
    if (next_w != nullptr)
      for (int k = 0; k < GP; ++k) __builtin_prefetch(next_w + j * w_stride + k * w_gate_stride);
    for (int r = 0; r < NR; ++r) {
      const float x = h[r * ld_h + j];
      for (int k = 0; k < GP; ++k) acc[q][r][k] += wv[k] * x;
    }
  };
  int64_t j = 0;
  for (; j + S <= K; j += S)
    for (int q = 0; q < S; ++q) step(q, j + q);
  for (; j < K; ++j) step(0, j);
  for (int q = 1; q < S; ++q)
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < GP; ++k) acc[0][r][k] += acc[q][r][k];
  for (int r = 0; r < NR; ++r) {
    for (int k = 0; k < GP; ++k) {
      float* o = out + r * ld_out + k * gate_stride;
      const vfl v = acc[0][r][k];
      if (valid == kLanes) {
        storel(o, accumulate ? loadl(o) + v : v);
      } else {
        for (int64_t u = 0; u < valid; ++u) o[u] = accumulate ? o[u] + v[u] : v[u];
      }
    }
  }
}

// Rows [0, NR) x blocks [0, BP) of out[n][L * c + u] (+)= sum_g dg[n][g] * wb[c][g][u], u <
// valid (the last block's count), where block c's weights start c * w_block floats on.
// The K loop is split as for two blocks whatever BP is, so that a block's sums do not
// depend on whether it was paired (that depends on the threads' block ranges).
template <int BP, int NR>
inline void dh_tile(const float* __restrict__ wb, int64_t w_block, const float* __restrict__ dg,
                    int64_t ld_dg, int64_t K, float* __restrict__ out, int64_t ld_out,
                    int64_t valid, bool accumulate, const float* next_w = nullptr) {
  constexpr int S = splits_for(NR * 2);
  vfl acc[S][NR][BP];
  for (int q = 0; q < S; ++q)
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < BP; ++c) acc[q][r][c] = vfl{};
  auto step = [&](int q, int64_t g) {
    vfl wv[BP];
    for (int c = 0; c < BP; ++c) wv[c] = loadl(wb + c * w_block + g * kLanes);
    if (next_w != nullptr)
      for (int c = 0; c < BP; ++c) __builtin_prefetch(next_w + c * w_block + g * kLanes);
    for (int r = 0; r < NR; ++r) {
      const float x = dg[r * ld_dg + g];
      for (int c = 0; c < BP; ++c) acc[q][r][c] += wv[c] * x;
    }
  };
  int64_t g = 0;
  for (; g + S <= K; g += S)
    for (int q = 0; q < S; ++q) step(q, g + q);
  for (; g < K; ++g) step(0, g);
  for (int q = 1; q < S; ++q)
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < BP; ++c) acc[0][r][c] += acc[q][r][c];
  for (int r = 0; r < NR; ++r) {
    for (int c = 0; c < BP; ++c) {
      float* o = out + r * ld_out + c * kLanes;
      const vfl v = acc[0][r][c];
      if (c < BP - 1 || valid == kLanes) {
        storel(o, accumulate ? loadl(o) + v : v);
      } else {
        for (int64_t u = 0; u < valid; ++u) o[u] = accumulate ? o[u] + v[u] : v[u];
      }
    }
  }
}

// Rows of the K (reduction) dimension per pass, in floats of packed weights: keeps the
// slice that a pass reads over and over (once per tile of rows) L1-sized: 32 KiB forward
// (all of H = 256 for LSTM: measured best, with the output prefetch below), 16 KiB for dh.
constexpr int64_t kWeightChunkFloats = 8192;
constexpr int64_t kDhChunkFloats = 4096;

// All N rows through tiles of NR rows, the remainder through tiles of 4 (where NR > 4), 2
// and 1: tile(rows_tag, n) is called with std::integral_constant<int, rows>.
template <int NR, typename F>
inline void row_tiles(int64_t N, const F& tile) {
  int64_t n = 0;
  for (; n + NR <= N; n += NR) tile(std::integral_constant<int, NR>{}, n);
  if constexpr (NR > 4)
    for (; n + 4 <= N; n += 4) tile(std::integral_constant<int, 4>{}, n);
  for (; n + 2 <= N; n += 2) tile(std::integral_constant<int, 2>{}, n);
  for (; n < N; ++n) tile(std::integral_constant<int, 1>{}, n);
}

// Gate pre-activations of unit blocks [b0, b1) for all N rows:
// out[n][k * H + u] (+)= sum_j h[n][j] W_hh[k * H + u][j]. out rows are G*H apart.
// Tiles cover all G gates of a block for kAccRegs / G rows, so each pass over a block's
// weights reads each h row once.
template <int G>
void recurrent_gates_blocks(const float* wf, const float* h, int64_t N, int64_t H, float* out,
                            int64_t b0, int64_t b1, bool accumulate, bool descending) {
  // rows per tile. Elman (one gate) takes 6, not 12, and skips the output prefetch: its
  // h rows and output rows are H floats apart (4 KiB when H = 1024), and 12 h streams plus
  // 12 prefetched output lines in one 8-way L1 set thrashed it (N=64, H=1024: 0.64x of
  // torch.nn with both, 0.70x without the prefetch, 0.80x with 6 rows and no prefetch)
  constexpr int NR = G == 1 ? 6 : kAccRegs / G;
  constexpr int64_t KC = kWeightChunkFloats / (G * kLanes);
  if constexpr (G == 1) {
    // Elman: two full blocks per tile, as if they were two gates, so that each broadcast
    // of h feeds two FMAs (8 loads per 12 FMAs rather than 14). Pairs are taken from the
    // end the snake order starts at; the rest goes through single blocks below.
    const int64_t full = H / kLanes;
    while (b1 - b0 >= 2) {
      const int64_t b = descending ? b1 - 2 : b0;
      if (b + 1 >= full) break;  // the pair would hold the partial block
      for (int64_t k0 = 0; k0 < H; k0 += KC / 2) {
        const int64_t kc = std::min(KC / 2, H - k0);
        const bool acc = accumulate || k0 > 0;
        const float* w = wf + (b * H + k0) * kLanes;
        row_tiles<NR>(N, [&](auto rows, int64_t n) {
          gates_tile<2, decltype(rows)::value, false>(w, kLanes, h + n * H + k0, H, kc,
                                                      out + n * H + b * kLanes, H, kLanes, kLanes,
                                                      acc, H * kLanes);
        });
      }
      if (descending) {
        b1 -= 2;
      } else {
        b0 += 2;
      }
    }
  }
  for (int64_t i = 0; i < b1 - b0; ++i) {
    const int64_t b = descending ? b1 - 1 - i : b0 + i;
    const int64_t u = b * kLanes, valid = std::min<int64_t>(kLanes, H - u);
    for (int64_t k0 = 0; k0 < H; k0 += KC) {
      const int64_t kc = std::min(KC, H - k0);
      const bool acc = accumulate || k0 > 0;
      const float* w = wf + (b * H + k0) * G * kLanes;
      // The first row tile fetches the weights of the chunk that comes next (this block's
      // next, or the next block's first) while it runs: a block of W_hh that is not in
      // this core's L2 (H = 1024: 256 KiB a block, 8 MiB a thread) otherwise arrives
      // from L3 at the demand of the next chunk's first tile.
      const int64_t next_b = descending ? b - 1 : b + 1;
      const float* next_w = k0 + KC < H ? w + KC * G * kLanes
                            : i + 1 < b1 - b0 ? wf + next_b * H * G * kLanes
                                              : nullptr;
      row_tiles<NR>(N, [&](auto rows, int64_t n) {
        // Elman's lone blocks split K as its pairs do, so that a block's sums do not depend
        // on whether it was paired (that depends on the threads' block ranges)
        constexpr int R = decltype(rows)::value;
        gates_tile<G, R, /*PREFETCH_OUT=*/(G > 1), splits_for(R * (G == 1 ? 2 : G))>(
            w, G * kLanes, h + n * H + k0, H, kc, out + n * G * H + u, G * H, H, valid, acc,
            kLanes, n == 0 ? next_w : nullptr);
      });
    }
  }
}

// dh[n][u] (+)= sum_g dg[n][g] W_hh[g][u] for the units of blocks [b0, b1), all N rows,
// two blocks per tile where there are two, kAccRegs / 2 rows.
inline void recurrent_dh_blocks(const float* wb, const float* dg, int64_t N, int64_t GH,
                                int64_t H, float* dh, int64_t b0, int64_t b1, bool accumulate,
                                bool descending) {
  constexpr int64_t KC = kDhChunkFloats / (2 * kLanes);
  const int64_t pairs = (b1 - b0 + 1) / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t b = b0 + 2 * (descending ? pairs - 1 - i : i);
    const int64_t bp = std::min<int64_t>(2, b1 - b);
    const int64_t u = b * kLanes, valid = std::min<int64_t>(kLanes, H - (b + bp - 1) * kLanes);
    for (int64_t k0 = 0; k0 < GH; k0 += KC) {
      const int64_t kc = std::min(KC, GH - k0);
      const bool acc = accumulate || k0 > 0;
      const float* w = wb + (b * GH + k0) * kLanes;
      // the first row tile fetches the next chunk's weights, as in recurrent_gates_blocks
      const int64_t next_b = descending ? b - 2 : b + 2;
      const float* next_w = k0 + KC < GH ? w + KC * kLanes
                            : i + 1 < pairs ? wb + next_b * GH * kLanes
                                            : nullptr;
      row_tiles<kAccRegs / 2>(N, [&](auto rows, int64_t n) {
        constexpr int R = decltype(rows)::value;
        const float* pf = n == 0 ? next_w : nullptr;
        if (bp == 2) {
          dh_tile<2, R>(w, GH * kLanes, dg + n * GH + k0, GH, kc, dh + n * H + u, H, valid, acc,
                        pf);
        } else {
          dh_tile<1, R>(w, GH * kLanes, dg + n * GH + k0, GH, kc, dh + n * H + u, H, valid, acc,
                        pf);
        }
      });
    }
  }
}

// ---- small batches: dot-product form straight from W_hh [G*H, H] (row-major), no packing ----
// At one or two rows of h the packed kernels above run one or two FMA chains per weight
// vector plus a broadcast per weight; here R rows of W_hh (R units of one gate) are each
// multiplied with NR rows of h, 8 j's per FMA, in R * NR independent accumulators that are
// summed across lanes once per output at the end (a fixed order: still deterministic).

// s[r] = the sum of the 8 lanes of a[r], for r < R (R = 8 or 4).
template <int R>
inline void sum_lanes(const vf8* a, float* s) {
  auto hadd = [](vf8 x, vf8 y) {
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  // t0[r] (r < 4) and t0[r + 4]: the low and high halves' sums of a[r]
  const vf8 t0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
  if constexpr (R == 8) {
    const vf8 t1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
    store8(s, __builtin_shufflevector(t0, t1, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(t0, t1, 4, 5, 6, 7, 12, 13, 14, 15));
  } else {
    static_assert(R == 4, "sum_lanes: R is 4 or 8");
    for (int r = 0; r < 4; ++r) s[r] = t0[r] + t0[r + 4];
  }
}

// out[n][r] (+)= sum_j h[n][j] * w[r][j] for n < NR, r < rows (<= R); rows of w are ld_w
// apart (rows past `rows` read the last valid row again and are not stored).
template <int R, int NR>
inline void dot_tile(const float* __restrict__ w, int64_t ld_w, int64_t rows,
                     const float* __restrict__ h, int64_t ld_h, int64_t K,
                     float* __restrict__ out, int64_t ld_out, bool accumulate) {
  const float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + std::min<int64_t>(r, rows - 1) * ld_w;
  vf8 acc[NR][R];
  for (int n = 0; n < NR; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = vf8{};
  const int64_t K8 = K - K % 8;
  for (int64_t j = 0; j < K8; j += 8) {
    vf8 hv[NR];
    for (int n = 0; n < NR; ++n) hv[n] = load8(h + n * ld_h + j);
    for (int r = 0; r < R; ++r) {
      const vf8 wv = load8(wr[r] + j);
      for (int n = 0; n < NR; ++n) acc[n][r] += wv * hv[n];
    }
  }
  for (int n = 0; n < NR; ++n) {
    float s[8] = {};
    sum_lanes<R>(acc[n], s);
    for (int64_t j = K8; j < K; ++j)
      for (int r = 0; r < R; ++r) s[r] += wr[r][j] * h[n * ld_h + j];
    float* o = out + n * ld_out;
    for (int64_t r = 0; r < rows; ++r) o[r] = accumulate ? o[r] + s[r] : s[r];
  }
}

// The same result as recurrent_gates_blocks, from W_hh itself: each block's units 8 at a
// time, rows in pairs through R = 4 tiles, a last odd row through an R = 8 tile.
template <int G>
void recurrent_gates_rows(const float* w_hh, const float* h, int64_t N, int64_t H, float* out,
                          int64_t b0, int64_t b1, bool accumulate, bool descending) {
  for (int64_t i = 0; i < (b1 - b0) * (kLanes / 8); ++i) {
    const int64_t b = descending ? b1 * (kLanes / 8) - 1 - i : b0 * (kLanes / 8) + i;
    const int64_t u = b * 8;
    if (u >= H) continue;  // the last block's empty half
    const int64_t valid = std::min<int64_t>(8, H - u);
    for (int k = 0; k < G; ++k) {
      const float* w = w_hh + (k * H + u) * H;
      float* o = out + k * H + u;
      int64_t n = 0;
      for (; n + 2 <= N; n += 2) {
        dot_tile<4, 2>(w, H, std::min<int64_t>(4, valid), h + n * H, H, H, o + n * G * H, G * H,
                       accumulate);
        if (valid > 4)
          dot_tile<4, 2>(w + 4 * H, H, valid - 4, h + n * H, H, H, o + n * G * H + 4, G * H,
                         accumulate);
      }
      if (n < N) dot_tile<8, 1>(w, H, valid, h + n * H, H, H, o + n * G * H, G * H, accumulate);
    }
  }
}

// ---- weight gradients: out [P, K] = a^T b over rows m, a [m][P], b [m][K] ----
// dW = dg^T x (or h_{t-1}) from the gate gradients as they lie, row-major [rows, G*H]: no
// transposed copies. A tile holds kTnRows rows of out (that many consecutive entries of
// each a row, broadcast) by kTnVecs vectors of columns (one b row's, loaded), and sums a
// chunk of kTnRowChunk rows of a and b in registers; each chunk's sums are added to out in
// row order (a fixed order per output, one thread per output: deterministic).
// Built for AVX-512 only (weight_grad_f32 in kernels.cpp). Measured alone on 2 Zen 5 cores:
// 200-250 GFMA/s at M = 1024-6400, P = 512-4096, K = 128-1024, against 95-110 for MKL's
// a^T b and 113-198 for oneDNN with transposed chunks.
constexpr int kTnVecs = 4;
constexpr int kTnRows = kAccRegs / kTnVecs;  // 6
// rows of a and b a tile sums before it goes on: the chunk of b that the tiles of one
// column block read over and over (256 rows x 4 vectors: 64 KiB) stays near L1. Chunks of
// 64 to 1024 rows measured: 256 and 512 best, 1024 up to 0.7x as fast; copying each chunk
// of a into tile order first (its rows are 4-8 KiB apart, one L1 set) lost 5-20%.
constexpr int64_t kTnRowChunk = 256;
// rows of out that go through all column blocks before the next ones start: their chunk of
// a (256 rows by 48 floats, rows up to 16 KiB apart) stays in L2 across the column blocks
// rather than coming again from L3 for each (48, 96, 192 and all of a thread's rows
// measured: 48 best, 2-5% ahead of all rows at P = 1024-4096)
constexpr int64_t kTnOutRowBlock = 48;

// out[r][c] (+)= sum_{m < M} a[m * lda + r] * b[m * ldb + c] for r < PR, c < cols
// (cols <= KV * kLanes; b holds KV whole vectors a row, loaded whatever cols is).
template <int PR, int KV>
inline void tn_tile(const float* __restrict__ a, int64_t lda, const float* __restrict__ b,
                    int64_t ldb, int64_t M, float* __restrict__ out, int64_t ld_out,
                    int64_t cols, bool accumulate) {
  vfl acc[PR][KV];
  for (int r = 0; r < PR; ++r)
    for (int v = 0; v < KV; ++v) acc[r][v] = vfl{};
  for (int64_t m = 0; m < M; ++m) {
    vfl bv[KV];
    for (int v = 0; v < KV; ++v) bv[v] = loadl(b + m * ldb + v * kLanes);
    for (int r = 0; r < PR; ++r) {
      const float x = a[m * lda + r];
      for (int v = 0; v < KV; ++v) acc[r][v] += bv[v] * x;
    }
  }
  for (int r = 0; r < PR; ++r)
    for (int v = 0; v < KV; ++v) {
      float* o = out + r * ld_out + v * kLanes;
      const int64_t n = std::min<int64_t>(kLanes, cols - v * kLanes);
      if (n == kLanes) {
        storel(o, accumulate ? loadl(o) + acc[r][v] : acc[r][v]);
      } else {
        for (int64_t u = 0; u < n; ++u) o[u] = accumulate ? o[u] + acc[r][v][u] : acc[r][v][u];
      }
    }
}

// Rows [p0, p1) of out [P, K] (ld_out K) = the sum over the segments of a^T b. Each
// segment has its own a (rows lda apart) and b (rows ldb apart) and row count. tail: where
// K is not a multiple of kLanes, its last K % kLanes columns of every row of b, all
// segments' rows in order, zero-padded to kLanes (made by the caller).
using ::rnnfast::cpu::TnSegment;
inline void weight_grad_tn(const TnSegment* segs, int nseg, int64_t lda, int64_t ldb, int64_t K,
                           const float* tail, float* out, int64_t p0, int64_t p1) {
  const int64_t full = K - K % kLanes;  // columns in whole vectors
  int64_t tail_row = 0;                 // the segment's first row in `tail`
  bool acc = false;                     // the first chunk writes, the others add
  for (int s = 0; s < nseg; ++s) {
    const TnSegment& g = segs[s];
    for (int64_t m0 = 0; m0 < g.rows; m0 += kTnRowChunk) {
      const int64_t mc = std::min(kTnRowChunk, g.rows - m0);
      const float* a = g.a + m0 * lda;
      const float* b = g.b + m0 * ldb;
      for (int64_t q0 = p0; q0 < p1; q0 += kTnOutRowBlock) {
        const int64_t q1 = std::min(p1, q0 + kTnOutRowBlock);
        // rows [q0, q1) of out by one column block: vectors of bv, rows ldv apart; rows and
        // whole vectors both in row_tiles' steps (6 or 4 at a time, then 4, 2, 1)
        auto block = [&](auto vecs, const float* bv, int64_t ldv, int64_t c0, int64_t cols) {
          row_tiles<kTnRows>(q1 - q0, [&](auto rows, int64_t n) {
            tn_tile<decltype(rows)::value, decltype(vecs)::value>(
                a + q0 + n, lda, bv, ldv, mc, out + (q0 + n) * K + c0, K, cols, acc);
          });
        };
        row_tiles<kTnVecs>(full / kLanes, [&](auto vecs, int64_t v) {
          block(vecs, b + v * kLanes, ldb, v * kLanes, decltype(vecs)::value * kLanes);
        });
        if (full < K)
          block(std::integral_constant<int, 1>{}, tail + (tail_row + m0) * kLanes, kLanes, full,
                K - full);
      }
      acc = true;
    }
    tail_row += g.rows;
  }
}
