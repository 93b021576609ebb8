// kda_decode.metal: the KDA recurrence token after token, the fp32 state held in registers.
// Its main use is decode (T = 1). Two variants, by the template flag Layer:
//   plain  the recurrence on prepared inputs (normalised q, k; log-space g; beta): kda_metal
//   Layer  a KDA layer's step from its projections to what o_proj reads (kimi_mlx/kda_layer.py's
//          math, kimi_mlx/kda/prologue.py's decode_layer_ops in MLX ops): the three short convs
//          + SiLU (their windows read, the new ones written), q/k L2 norm, q scale, forget gate
//          from f, beta from its logit, the recurrence, then RMSNorm(o) times sigmoid(gate)
// The same body runs as Metal (mx.fast.metal_kernel) and as CUDA (mx.fast.cuda_kernel, with
// metal/cuda_compat.h before this header), and on the CPU emulator in tests.
//
// Buffers (B batch, T tokens, H heads, C = H Dk, Cv = H Dv, K conv width; H, Dk, Dv, K, Layer
// are template parameters; a buffer a variant does not read is any 1-element array):
//   q, k      [B, T, H, Dk]  any float. Plain: normalised, q scaled by Dk^-0.5.
//                            Layer: q is the raw projections [q | k | v] side by side
//                            [B, T, 2C + Cv] (before the conv); k unused. After the conv, q and
//                            k are normalised here (x / sqrt(sum x^2 + 1e-6)), q times Dk^-0.5.
//   v         [B, T, H, Dv]  any float (Layer: unused, v is in q)
//   g         [B, T, H, Dk]  Layer: f, the gate pre-activation before dt_bias.
//                            Plain: the log-space gate (<= 0), per channel.
//   beta      [B, T, H]      Layer: the logit b, beta = sigmoid(b). Plain: beta in (0, 1).
//   A_log     [H]            Layer: g = -exp(A_log[h]) * softplus(f + dt_bias)
//   dt_bias   [H * Dk]       Layer
//   state_in  [B, H, Dv, Dk] float32, Dk contiguous (kimi_mlx.kda layout)
//   sizes     [1] int32      T (an array, not a scalar: MLX passes 0-d inputs by reference in
//                            Metal and by pointer in CUDA; a 1-element array is a pointer in both)
//   conv_w    [2C + Cv, K]   Layer: the three convs' weights stacked (q, k, v channels)
//   wq, wk    [B, K-1, C]    Layer: the conv windows (the last K-1 projections before these T)
//   wv        [B, K-1, Cv]
//   gate      [B, T, H, Dv]  Layer: the output gate's pre-activation (g_b projection)
//   norm_w    [Dv]           Layer: the output RMSNorm's weight
//   norm_eps  [1] float32    Layer: its epsilon
//   y         [B, T, H, Dv]  InT. Layer: RMSNorm(o) * norm_w * sigmoid(gate); else o
//   state_out [B, H, Dv, Dk] StT (float32)
//   wq_out, wk_out, wv_out   Layer: the new windows, shapes of wq, wk, wv, in InT (else 1 element,
//                            never written). Layer: InT is the projections' (activation) dtype.
// Grid (Threads, Dv / Rows, B * H), threadgroup (Threads, 1, 1): one threadgroup per (b, h, Rows rows of
// Dv). Four lanes own one row of the state; lane j of a row holds channels c = 4 i + j.
// Layer needs the whole head in one threadgroup for the norm: Rows = Dv.
// Per token: S *= exp(g); kv = S k; S += beta (v - kv) k^T; y = S q (rows of S, sums over Dk).

// Template Threads (threads per threadgroup, a multiple of 32) and Rows (Dv rows per threadgroup,
// Threads = 4 lanes x Rows): given by the caller, kimi_mlx/kda/metal.py.

// Helper functions carry KDA_FUNC: plain `inline` in Metal; metal/cuda_compat.h makes them
// __device__ functions for CUDA (MLX's NVRTC call has no default-device option).
#ifndef KDA_FUNC
#define KDA_FUNC inline
#endif

// log(1 + x) for x >= 0, exact to a few ulp also for tiny x (the MSL has no log1p).
KDA_FUNC float kda_log1p(float x) {
  float u = 1.0f + x;
  return u == 1.0f ? x : log(u) * (x / (u - 1.0f));
}

// softplus(x) = log(1 + e^x), without overflow for large x.
KDA_FUNC float kda_softplus(float x) {
  return max(x, 0.0f) + kda_log1p(exp(-fabs(x)));
}

KDA_FUNC float kda_silu(float x) {
  return x / (1.0f + exp(-x));
}

// @kernel kda_decode(q, k, v, g, beta, A_log, dt_bias, state_in, sizes, conv_w, wq, wk, wv, gate, norm_w, norm_eps) -> (y, state_out, wq_out, wk_out, wv_out)
  constexpr int NSG = Threads / 32;
  constexpr int NC = Dk / 4;                    // state channels per lane
  constexpr int C = H * Dk, Cv = H * Dv, Wd = 2 * C + Cv;  // Layer: widths of q (or k), v, q|k|v
  const int T = sizes[0];
  const int tid = thread_index_in_threadgroup;
  const int part = tid % 4;                     // which 4th of the channels
  const int dv = threadgroup_position_in_grid.y * Rows + tid / 4;
  const int b = threadgroup_position_in_grid.z / H;
  const int h = threadgroup_position_in_grid.z % H;

  // The current token's q, k and decay exp(g), computed once per threadgroup. Two copies by
  // token parity, so a thread may write token t + 1 while a slower one still reads token t.
  threadgroup float sq[2][Dk];
  threadgroup float sk[2][Dk];
  threadgroup float sa[2][Dk];
  threadgroup float sred[2][NSG][3];            // per-SIMD-group sums (Layer): q^2, k^2, o^2

  float S[NC];
  const long row0 = ((long)(b * H + h) * Dv + dv) * Dk;
  for (int i = 0; i < NC; ++i) {
    S[i] = static_cast<float>(state_in[row0 + 4 * i + part]);
  }
  const float neg_A = Layer ? -exp(static_cast<float>(A_log[h])) : 0.0f;

  for (int t = 0; t < T; ++t) {
    const int p = t & 1;
    const long tok = (long)(b * T + t) * H + h;  // the (b, t, h) position
    float ssq = 0.0f, ssk = 0.0f;
    for (int c = tid; c < Dk; c += Threads) {
      float qc, kc;
      if (Layer) {
        // Short conv over [window | projections] of channel h Dk + c of q (s = 0) and k (s = 1).
        float acc[2] = {0.0f, 0.0f};
        for (int s = 0; s < 2; ++s) {
          const int ch = s * C + h * Dk + c;
          for (int j = 0; j < K; ++j) {
            const int i = t + j;                // position in [window (K-1) | T tokens]
            const float x = i < K - 1 ? static_cast<float>((s == 0 ? wq : wk)[((long)b * (K - 1) + i) * C + h * Dk + c])
                                      : static_cast<float>(q[((long)b * T + i - (K - 1)) * Wd + ch]);
            acc[s] += x * static_cast<float>(conv_w[ch * K + j]);
          }
        }
        qc = kda_silu(acc[0]);
        kc = kda_silu(acc[1]);
      } else {
        qc = static_cast<float>(q[tok * Dk + c]);
        kc = static_cast<float>(k[tok * Dk + c]);
      }
      float gc = static_cast<float>(g[tok * Dk + c]);
      if (Layer) {
        gc = neg_A * kda_softplus(gc + static_cast<float>(dt_bias[h * Dk + c]));
        ssq += qc * qc;
        ssk += kc * kc;
      }
      sq[p][c] = qc;
      sk[p][c] = kc;
      sa[p][c] = exp(gc);
    }
    if (Layer) {
      ssq = simd_sum(ssq);
      ssk = simd_sum(ssk);
      if (thread_index_in_simdgroup == 0) {
        sred[p][simdgroup_index_in_threadgroup][0] = ssq;
        sred[p][simdgroup_index_in_threadgroup][1] = ssk;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float rq = 1.0f, rk = 1.0f, bt = static_cast<float>(beta[tok]);
    if (Layer) {
      float nq = 0.0f, nk = 0.0f;
      for (int s = 0; s < NSG; ++s) {
        nq += sred[p][s][0];
        nk += sred[p][s][1];
      }
      rq = rsqrt(nq + 1e-6f) * rsqrt(float(Dk));
      rk = rsqrt(nk + 1e-6f);
      bt = 1.0f / (1.0f + exp(-bt));
    }

    float vt;
    if (Layer) {  // the v channel's short conv (each lane of the row computes it: no exchange)
      const int ch = 2 * C + h * Dv + dv;
      float acc = 0.0f;
      for (int j = 0; j < K; ++j) {
        const int i = t + j;
        const float x = i < K - 1 ? static_cast<float>(wv[((long)b * (K - 1) + i) * Cv + h * Dv + dv])
                                  : static_cast<float>(q[((long)b * T + i - (K - 1)) * Wd + ch]);
        acc += x * static_cast<float>(conv_w[ch * K + j]);
      }
      vt = kda_silu(acc);
    } else {
      vt = static_cast<float>(v[tok * Dv + dv]);
    }

    // Decay, then what the state predicts for k: a dot product over the row's 4 lanes.
    float kv = 0.0f;
    for (int i = 0; i < NC; ++i) {
      const int c = 4 * i + part;
      S[i] *= sa[p][c];
      kv += S[i] * sk[p][c];
    }
    kv += simd_shuffle_xor(kv, 1);
    kv += simd_shuffle_xor(kv, 2);
    const float delta = bt * (vt - kv * rk) * rk;

    // The delta-rule write, then the output row.
    float o = 0.0f;
    for (int i = 0; i < NC; ++i) {
      const int c = 4 * i + part;
      S[i] += sk[p][c] * delta;
      o += S[i] * sq[p][c];
    }
    o += simd_shuffle_xor(o, 1);
    o += simd_shuffle_xor(o, 2);
    o *= rq;
    if (Layer) {  // RMSNorm over the head's Dv rows (all in this threadgroup), then the gate
      float so = simd_sum(part == 0 ? o * o : 0.0f);
      if (thread_index_in_simdgroup == 0) {
        sred[p][simdgroup_index_in_threadgroup][2] = so;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float no = 0.0f;
      for (int s = 0; s < NSG; ++s) {
        no += sred[p][s][2];
      }
      const float gt = static_cast<float>(gate[tok * Dv + dv]);
      o *= rsqrt(no / float(Dv) + static_cast<float>(norm_eps[0])) * static_cast<float>(norm_w[dv])
           / (1.0f + exp(-gt));
    }
    if (part == 0) {
      y[tok * Dv + dv] = static_cast<InT>(o);
    }
  }

  for (int i = 0; i < NC; ++i) {
    state_out[row0 + 4 * i + part] = static_cast<StT>(S[i]);
  }
  if (Layer) {  // the new windows: the last K-1 of [window | T projections], per channel
    for (int i = 0; i < K - 1; ++i) {
      const int src = T + i;                    // position in [window (K-1) | T tokens]
      const long at = (long)b * (K - 1) + i;
      for (int c = tid; c < Dk; c += Threads) {
        for (int s = 0; s < 2; ++s) {
          const int lc = h * Dk + c;
          const float x = src < K - 1 ? static_cast<float>((s == 0 ? wq : wk)[((long)b * (K - 1) + src) * C + lc])
                                      : static_cast<float>(q[((long)b * T + src - (K - 1)) * Wd + s * C + lc]);
          (s == 0 ? wq_out : wk_out)[at * C + lc] = static_cast<InT>(x);
        }
      }
      if (part == 0) {
        const int lc = h * Dv + dv;
        const float x = src < K - 1 ? static_cast<float>(wv[((long)b * (K - 1) + src) * Cv + lc])
                                    : static_cast<float>(q[((long)b * T + src - (K - 1)) * Wd + 2 * C + lc]);
        wv_out[at * Cv + lc] = static_cast<InT>(x);
      }
    }
  }
