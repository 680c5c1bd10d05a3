// LSTM on CUDA: the persistent kernels (persistent.cuh) where they fit, else per step the
// recurrent GEMM and one fused pointwise kernel (common.cuh).
#include "fused_step.cuh"
#include "persistent.cuh"
#include "step_graph.cuh"

namespace rnnfast::cuda {

// ---- the LSTM's pointwise math, once, for both designs ----

// From the gate pre-activations x_g + hh_g (both biases included) and c_{t-1}: the
// activated gates i, f, g, o and c_t.
template <typename acc_t>
struct LstmGates {
  acc_t i, f, g, o, c;
};
template <typename acc_t>
__device__ __forceinline__ LstmGates<acc_t> lstm_point(acc_t pi, acc_t pf, acc_t pg, acc_t po,
                                                       acc_t c_prev) {
  LstmGates<acc_t> s{sigmoid_act(pi), sigmoid_act(pf), tanh_act(pg), sigmoid_act(po), acc_t(0)};
  s.c = s.f * c_prev + s.i * s.g;
  return s;
}

// i, f, g, o into a workspace row (cr = its unit's first entry; c sits at 4H, written by
// the caller, which may keep c elsewhere)
template <typename acc_t>
__device__ __forceinline__ void lstm_store_gates(acc_t* cr, int64_t H, const LstmGates<acc_t>& s) {
  cr[0] = s.i;
  cr[H] = s.f;
  cr[2 * H] = s.g;
  cr[3 * H] = s.o;
}

// Backward of one unit and row: from its saved i, f, g, o, c (sv[0..5), gathered from its
// workspace row), the total dh and the carried dc_t, the gate gradients into
// dr[0, H, 2H, 3H]; returns dc_{t-1}.
template <typename acc_t>
__device__ __forceinline__ acc_t lstm_point_backward(const acc_t* sv, int64_t H,
                                                     acc_t dh_total, acc_t dc, acc_t c_prev,
                                                     acc_t* dr) {
  const acc_t i = sv[0], f = sv[1], g = sv[2], o = sv[3], c = sv[4];
  const acc_t tc = tanh_act(c);
  const acc_t dc_total = dc + dh_total * o * (acc_t(1) - tc * tc);
  dr[0] = dc_total * g * i * (acc_t(1) - i);
  dr[H] = dc_total * c_prev * f * (acc_t(1) - f);
  dr[2 * H] = dc_total * i * (acc_t(1) - g * g);
  dr[3 * H] = dh_total * tc * o * (acc_t(1) - o);
  return dc_total * f;
}

// ---- persistent kernels: the LSTM's part (see persistent.cuh) ----
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr bool kDirectDh = false;
  static constexpr bool kNeedsHPrev = false;  // forward reads h_{t-1} (the register tile)

  template <typename scalar_t, typename acc_t>
  __device__ static acc_t c_prev(const PersistentParams<scalar_t, acc_t>& p, int64_t s,
                                 int64_t tp, int64_t n, int64_t u) {
    if (p.c_state != nullptr) return p.c_state[n * p.H + u];
    return s == 0 ? p.c0[n * p.H + u] : p.cache[(tp * p.N + n) * 5 * p.H + 4 * p.H + u];
  }

  // the pointwise inputs of unit u, row n at step s: x_i, x_f, x_g, x_o (the input
  // projection, both biases in it) and c_{t-1}
  static constexpr int kLoads = 5;
  template <typename scalar_t, typename acc_t>
  __device__ static void load(const PersistentParams<scalar_t, acc_t>& p, int64_t s, int64_t t,
                              int64_t tp, int64_t n, int64_t u, acc_t (&in)[kLoads]) {
    const int64_t H = p.H;
    gather_gates<4>(p.xp + (t * p.N + n) * 4 * H + u, H, in);
    in[4] = c_prev(p, s, tp, n, u);
  }

  template <typename scalar_t, typename acc_t>
  __device__ static scalar_t forward(const PersistentParams<scalar_t, acc_t>& p, int64_t,
                                     int64_t t, int64_t, int64_t n, int64_t u,
                                     const acc_t (&hh)[4], acc_t, const acc_t (&in)[kLoads]) {
    const int64_t H = p.H, row = t * p.N + n;
    const LstmGates<acc_t> st =
        lstm_point(in[0] + hh[0], in[1] + hh[1], in[2] + hh[2], in[3] + hh[3], in[4]);
    if (p.cache != nullptr) {
      acc_t* cr = p.cache + row * 5 * H + u;
      lstm_store_gates(cr, H, st);
      cr[4 * H] = st.c;
    } else {
      p.c_state[n * H + u] = st.c;
    }
    const scalar_t h = scalar_t(st.o * tanh_act(st.c));
    p.y[row * H + u] = h;
    return h;
  }

  // phase A's inputs of unit u, row n at step s but the carried dh (phase B writes it after
  // the barrier): the saved i, f, g, o, c, then dy, the carried dc (this thread's own) and
  // c_{t-1}
  static constexpr int kBackwardLoads = 8;
  template <typename scalar_t, typename acc_t>
  __device__ static void load_backward(const PersistentParams<scalar_t, acc_t>& p, int64_t s,
                                       int64_t t, int64_t tp, int64_t n, int64_t u,
                                       acc_t (&in)[kBackwardLoads]) {
    const int64_t H = p.H, row = t * p.N + n;
    gather_gates<5>(p.cache + row * 5 * H + u, H, in);
    in[5] = acc_t(p.dy[row * H + u]);
    in[6] = p.dc[n * H + u];
    in[7] = c_prev(p, s, tp, n, u);
  }

  // (dg_hh is dg_ih: dgh is what it wrote)
  template <typename scalar_t, typename acc_t>
  __device__ static void backward(const PersistentParams<scalar_t, acc_t>& p, int64_t, int64_t t,
                                  int64_t, int64_t n, int64_t u,
                                  const acc_t (&in)[kBackwardLoads], acc_t (&dgh)[4]) {
    const int64_t H = p.H, idx = n * H + u;
    p.dc[idx] = lstm_point_backward(in, 1, in[5] + p.dh[idx], in[6], in[7], dgh);
    acc_t* dg = p.dg_ih + (t * p.N + n) * 4 * H + u;
#pragma unroll
    for (int g = 0; g < 4; ++g) dg[g * H] = dgh[g];
  }
};

// ---- per-step kernels ----

// One step for N rows, H units: gates = xp + hh (xp holds both biases). c in acc_t; cache
// [N, 5H] = i, f, g, o, c when training (c then lives in the cache: c == cache + 4H).
template <typename scalar_t, typename acc_t>
__global__ void lstm_forward_step(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ hh,
                                  const acc_t* c_prev, int64_t ld_c_prev, scalar_t* __restrict__ h,
                                  acc_t* c, int64_t ld_c, acc_t* cache, int64_t N, int64_t H) {
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    const scalar_t* xr = xp + n * 4 * H + u;
    const scalar_t* hr = hh + n * 4 * H + u;
    const LstmGates<acc_t> st = lstm_point(
        acc_t(xr[0]) + acc_t(hr[0]), acc_t(xr[H]) + acc_t(hr[H]),
        acc_t(xr[2 * H]) + acc_t(hr[2 * H]), acc_t(xr[3 * H]) + acc_t(hr[3 * H]),
        c_prev[n * ld_c_prev + u]);
    c[n * ld_c + u] = st.c;
    h[n * H + u] = scalar_t(st.o * tanh_act(st.c));
    if (cache != nullptr) lstm_store_gates(cache + n * 5 * H + u, H, st);
  }
}

// Backward of one step: from dy[t] + the carried dh and dc, the gate pre-activation
// gradients dg [N, 4H] (and in dg16 [N, 4H] in scalar_t, the dh GEMM's operand, unless
// null; see StepGemm::dg16) and dc_{t-1} (in place in dc). dh is only read here; the
// GEMM after this kernel overwrites it with dg W_hh.
template <typename scalar_t, typename acc_t>
__global__ void lstm_backward_step(const scalar_t* __restrict__ dy, const acc_t* __restrict__ dh,
                                   acc_t* __restrict__ dc, const acc_t* __restrict__ cache,
                                   const acc_t* __restrict__ c_prev, int64_t ld_c_prev,
                                   acc_t* __restrict__ dg, scalar_t* __restrict__ dg16,
                                   int64_t N, int64_t H) {
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    acc_t sv[5], g[4];
    gather_gates<5>(cache + n * 5 * H + u, H, sv);
    dc[idx] = lstm_point_backward(sv, 1, acc_t(dy[idx]) + dh[idx], dc[idx],
                                  c_prev[n * ld_c_prev + u], g);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      dg[n * 4 * H + k * H + u] = g[k];
      if (dg16 != nullptr) dg16[n * 4 * H + k * H + u] = scalar_t(g[k]);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cuda(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool reverse,
    bool training) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_forward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_same_shape(op, "c0", c0, h0.sizes(), x);
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  const auto acc = workspace_dtype(x.scalar_type());
  Tensor y = at::empty({T, N, H}, x.options());
  Tensor workspace = at::empty({training ? T : 0, N, 5 * H}, x.options().dtype(acc));
  Tensor c_turns;  // the per-step path's c in inference (two turns)
  const Tensor c0_acc = c0.to(acc).contiguous();
  if (T == 0 || N == 0 || H == 0) {
    return {y, h0.clone(), c0.clone(), workspace};
  }
  const Tensor xp = input_projection(x, w_ih, sum_biases(b_ih, b_hh));
  Tensor c_state;  // the persistent path's c in inference
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::string refused;  // why the forced persistent path cannot run, or empty
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "lstm_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* yp = y.data_ptr<scalar_t>();
        acc_t* ws = workspace.data_ptr<acc_t>();
        const PersistentLaunch plan =
            plan_persistent<LstmCell, scalar_t, acc_t, false>(N, H, x.scalar_type(), training);
        if (!plan.refused.empty()) {
          refused = plan.refused;  // thrown below, from C++ (see check_persistent_refusal)
          return;
        }
        // the per-step path fused or as a CUDA graph (a bad knob value raised below whichever
        // path runs)
        const auto [fused, graphed] =
            step_choice<scalar_t>(plan.kernel == nullptr, H, /*backward=*/false, refused);
        if (!refused.empty()) return;
        if (plan.kernel != nullptr || fused || graphed) {
          if (!training) c_state = c0_acc.clone();
          const Tensor h0a = fused ? aligned16(h0) : h0, w_hha = fused ? aligned16(w_hh) : w_hh;
          PersistentParams<scalar_t, acc_t> p{};
          p.T = T, p.N = N, p.H = H, p.reverse = reverse;
          p.xp = xp.data_ptr<scalar_t>(), p.w_hh = w_hha.data_ptr<scalar_t>();
          p.h0 = h0a.data_ptr<scalar_t>(), p.c0 = c0_acc.data_ptr<acc_t>(), p.y = yp;
          p.cache = training ? ws : nullptr;
          p.c_state = training ? nullptr : c_state.data_ptr<acc_t>();
          if (graphed) {
            if (run_step_graph_forward<LstmCell>(p, w_hh, stream)) return;
            c_state = Tensor();  // the loop below keeps c in c_turns
          } else if (fused) {
            refused = run_fused_steps<LstmCell>(p, stream);  // raised below
            return;
          } else {
            refused = launch_persistent(plan, p, x);  // a launch error, raised below
            return;
          }
        }
        if (!training) c_turns = at::empty({2, N, H}, x.options().dtype(acc));
        acc_t* ct = training ? nullptr : c_turns.data_ptr<acc_t>();
        Tensor hh = at::empty({N, 4 * H}, x.options());
        const StepGemm gemm(w_hh);
        for (int64_t s = 0; s < T; ++s) {
          const int64_t t = time_index(s, T, reverse), tp = time_index(s - 1, T, reverse);
          gemm.gates(h0, y, s == 0 ? -1 : tp, hh);
          const acc_t* c_prev;
          int64_t ld_c_prev, ld_c;
          acc_t *c_out, *cache = nullptr;
          if (training) {
            cache = ws + t * N * 5 * H;
            c_out = cache + 4 * H;
            ld_c = 5 * H;
            c_prev = s == 0 ? c0_acc.data_ptr<acc_t>() : ws + tp * N * 5 * H + 4 * H;
            ld_c_prev = s == 0 ? H : 5 * H;
          } else {
            c_out = ct + (s % 2) * N * H;
            ld_c = H;
            c_prev = s == 0 ? c0_acc.data_ptr<acc_t>() : ct + ((s - 1) % 2) * N * H;
            ld_c_prev = H;
          }
          lstm_forward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              xp.data_ptr<scalar_t>() + t * N * 4 * H, hh.data_ptr<scalar_t>(), c_prev,
              ld_c_prev, yp + t * N * H, c_out, ld_c, cache, N, H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        refused = gemm.error();  // raised below, as a refusal is
      });
  check_persistent_refusal(op, refused);
  const int64_t last = time_index(T - 1, T, reverse);
  Tensor cn = training             ? workspace[last].narrow(1, 4 * H, H)
               : c_state.defined() ? c_state
                                   : c_turns[(T - 1) % 2];
  return {y, y[last].clone(), cn.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true),
          workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cuda(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_backward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  check_cuda(op, x);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  const auto acc = workspace_dtype(x.scalar_type());
  check_same_shape(op, "c0", c0, {N, H}, x);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  check_same_shape(op, "dcn", dcn, {N, H}, x);
  check_workspace(op, workspace, 5 * H, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dh = dhn.to(acc, false, /*copy=*/true);
  Tensor dc = dcn.to(acc, false, /*copy=*/true);
  if (T == 0 || N == 0 || H == 0) {
    return {at::zeros_like(x), dh.to(x.scalar_type()), dc.to(x.scalar_type()),
            at::zeros_like(w_ih), at::zeros_like(w_hh), at::zeros({4 * H}, x.options())};
  }
  Tensor dg = at::empty({T, N, 4 * H}, x.options().dtype(acc));
  const Tensor c0_acc = c0.to(acc).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::string refused;  // why the forced persistent path cannot run, or empty
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "lstm_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* ws = workspace.data_ptr<acc_t>();
        acc_t* dgp = dg.data_ptr<acc_t>();
        const PersistentLaunch plan =
            plan_persistent<LstmCell, scalar_t, acc_t, true>(N, H, x.scalar_type());
        if (!plan.refused.empty()) {
          refused = plan.refused;  // thrown below, from C++ (see check_persistent_refusal)
          return;
        }
        // the per-step path's bfloat16 backward fused or as a CUDA graph
        const auto [fused, graphed] =
            step_choice<scalar_t>(plan.kernel == nullptr, H, /*backward=*/true, refused);
        if (!refused.empty()) return;
        if (plan.kernel != nullptr || fused || graphed) {
          PersistentParams<scalar_t, acc_t> p{};
          p.T = T, p.N = N, p.H = H, p.reverse = reverse;
          p.w_hh = w_hh.data_ptr<scalar_t>(), p.c0 = c0_acc.data_ptr<acc_t>();
          p.cache = const_cast<acc_t*>(ws), p.dy = dy.data_ptr<scalar_t>();
          p.dh = dh.data_ptr<acc_t>(), p.dc = dc.data_ptr<acc_t>();
          p.dg_ih = dgp, p.dg_hh = dgp;
          if (!graphed) {
            // a launch error, raised below
            refused = fused ? run_fused_backward<LstmCell>(p, w_hh, stream)
                            : launch_persistent(plan, p, x);
            return;
          }
          if (run_step_graph_backward<LstmCell>(p, w_hh, stream)) return;
        }
        const StepGemm gemm(w_hh, N);
        scalar_t* dg16p = gemm.dg16<scalar_t>();
        for (int64_t s = T - 1; s >= 0; --s) {
          const int64_t t = time_index(s, T, reverse), tp = time_index(s - 1, T, reverse);
          const acc_t* c_prev = s == 0 ? c0_acc.data_ptr<acc_t>() : ws + tp * N * 5 * H + 4 * H;
          lstm_backward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              dy.data_ptr<scalar_t>() + t * N * H, dh.data_ptr<acc_t>(), dc.data_ptr<acc_t>(),
              ws + t * N * 5 * H, c_prev, s == 0 ? H : 5 * H, dgp + t * N * 4 * H, dg16p, N,
              H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          gemm.dh(dg, t, dh, /*accumulate=*/false);
        }
        refused = gemm.error();  // raised below, as a refusal is
      });
  check_persistent_refusal(op, refused);
  const SequenceGrads g = sequence_grads(dg, dg, x, y, h0, w_ih, reverse);
  return {g.dx, dh.to(x.scalar_type()), dc.to(x.scalar_type()), g.dw_ih, g.dw_hh, g.db_ih};
}

}  // namespace rnnfast::cuda

TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  m.impl("lstm_forward", &rnnfast::cuda::lstm_forward_cuda);
  m.impl("lstm_backward", &rnnfast::cuda::lstm_backward_cuda);
}
