// kda_decode.metal: the KDA recurrence token after token, the fp32 state held in registers.
// Its main use is decode (T = 1); Fused also does the layer's per-token prologue (q/k L2 norm,
// q scale, forget gate from f, beta from its logit), saving ~8 tiny dispatches per layer.
//
// Buffers (B batch, T tokens, H heads; H, Dk, Dv, Fused are template parameters):
//   q, k      [B, T, H, Dk]  any float. Fused: raw (after conv + SiLU); normalised here
//                            (x / sqrt(sum x^2 + 1e-6)) and q scaled by Dk^-0.5.
//                            Else: already normalised and scaled.
//   v         [B, T, H, Dv]  any float
//   g         [B, T, H, Dk]  Fused: f, the gate pre-activation before dt_bias.
//                            Else: the log-space gate (<= 0), per channel.
//   beta      [B, T, H]      Fused: the logit b, beta = sigmoid(b). Else: beta in (0, 1).
//   A_log     [H]            Fused only: g = -exp(A_log[h]) * softplus(f + dt_bias)
//   dt_bias   [H * Dk]       Fused only (else any 1-element array, never read)
//   state_in  [B, H, Dv, Dk] float32, Dk contiguous (kimi_mlx.kda layout)
//   T         scalar int
//   y         [B, T, H, Dv]  InT
//   state_out [B, H, Dv, Dk] StT (float32)
// Grid (Threads, Dv / Rows, B * H), threadgroup (Threads, 1, 1): one threadgroup per (b, h, Rows rows of
// Dv). Four lanes own one row of the state; lane j of a row holds channels c = 4 i + j.
// Per token: S *= exp(g); kv = S k; S += beta (v - kv) k^T; y = S q (rows of S, sums over Dk).

// Template Threads (threads per threadgroup, a multiple of 32) and Rows (Dv rows per threadgroup,
// Threads = 4 lanes x Rows): given by the caller, kimi_mlx/kda/metal.py DECODE_THREADS / DECODE_ROWS.

// log(1 + x) for x >= 0, exact to a few ulp also for tiny x (the MSL has no log1p).
inline float kda_log1p(float x) {
  float u = 1.0f + x;
  return u == 1.0f ? x : log(u) * (x / (u - 1.0f));
}

// softplus(x) = log(1 + e^x), without overflow for large x.
inline float kda_softplus(float x) {
  return max(x, 0.0f) + kda_log1p(exp(-fabs(x)));
}

// @kernel kda_decode(q, k, v, g, beta, A_log, dt_bias, state_in, T) -> (y, state_out)
  constexpr int NSG = Threads / 32;
  constexpr int NC = Dk / 4;                    // state channels per lane
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
  threadgroup float snorm[2][NSG][2];           // Fused: per-SIMD-group sums of q^2 and k^2

  float S[NC];
  const long row0 = ((long)(b * H + h) * Dv + dv) * Dk;
  for (int i = 0; i < NC; ++i) {
    S[i] = static_cast<float>(state_in[row0 + 4 * i + part]);
  }
  const float neg_A = Fused ? -exp(static_cast<float>(A_log[h])) : 0.0f;

  for (int t = 0; t < T; ++t) {
    const int p = t & 1;
    const long tok = (long)(b * T + t) * H + h;  // the (b, t, h) position
    float ssq = 0.0f, ssk = 0.0f;
    for (int c = tid; c < Dk; c += Threads) {
      const float qc = static_cast<float>(q[tok * Dk + c]);
      const float kc = static_cast<float>(k[tok * Dk + c]);
      float gc = static_cast<float>(g[tok * Dk + c]);
      if (Fused) {
        gc = neg_A * kda_softplus(gc + static_cast<float>(dt_bias[h * Dk + c]));
        ssq += qc * qc;
        ssk += kc * kc;
      }
      sq[p][c] = qc;
      sk[p][c] = kc;
      sa[p][c] = exp(gc);
    }
    if (Fused) {
      ssq = simd_sum(ssq);
      ssk = simd_sum(ssk);
      if (thread_index_in_simdgroup == 0) {
        snorm[p][simdgroup_index_in_threadgroup][0] = ssq;
        snorm[p][simdgroup_index_in_threadgroup][1] = ssk;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float rq = 1.0f, rk = 1.0f, bt = static_cast<float>(beta[tok]);
    if (Fused) {
      float nq = 0.0f, nk = 0.0f;
      for (int s = 0; s < NSG; ++s) {
        nq += snorm[p][s][0];
        nk += snorm[p][s][1];
      }
      rq = rsqrt(nq + 1e-6f) * rsqrt(float(Dk));
      rk = rsqrt(nk + 1e-6f);
      bt = 1.0f / (1.0f + exp(-bt));
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
    const float delta = bt * (static_cast<float>(v[tok * Dv + dv]) - kv * rk) * rk;

    // The delta-rule write, then the output row.
    float o = 0.0f;
    for (int i = 0; i < NC; ++i) {
      const int c = 4 * i + part;
      S[i] += sk[p][c] * delta;
      o += S[i] * sq[p][c];
    }
    o += simd_shuffle_xor(o, 1);
    o += simd_shuffle_xor(o, 2);
    if (part == 0) {
      y[tok * Dv + dv] = static_cast<InT>(o * rq);
    }
  }

  for (int i = 0; i < NC; ++i) {
    state_out[row0 + 4 * i + part] = static_cast<StT>(S[i]);
  }
