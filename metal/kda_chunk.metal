// kda_chunk.metal: the two sequential pieces of chunked KDA prefill; everything else of the
// chunkwise (WY/UT) form stays in MLX matmuls (kimi_mlx/kda/metal.py says why). Notation of
// kimi_mlx/kda/chunked.py: chunks of C tokens, N chunks per sequence, M = B * H * N; within a
// chunk G_t = cumsum of g (inclusive), S0 the state when the chunk starts.

// kda_chunk_state takes template Threads (threads per threadgroup) and Rows (Dv rows per
// threadgroup) from the caller, kimi_mlx/kda/metal.py DECODE_THREADS / DECODE_ROWS.

// @kernel kda_chunk_ut(A, beta, R) -> (X)
// The UT transform of every chunk, X = (I + diag(beta) strict_lower(A))^-1 diag(beta) R,
// by forward substitution down the chunk: x_t = beta_t r_t - sum_{j<t} beta_t A[t, j] x_j.
// Columns are independent, so one thread per column and no reduction at all.
//   A     [M, C, C]  float32, A[t, j] = sum_c k_t[c] k_j[c] exp(G_t[c] - G_j[c]); only j < t read
//   beta  [M, C]     float32
//   R     [M, C, W]  float32: [k_t exp(G_t) | v_t], W = Dk + Dv
//   X     [M, C, W]  float32: [W | U0] of chunked.py (u = U0 - W S0^T)
// Template C, W. Grid (NT, 1, M), threadgroup (NT, 1, 1), NT a multiple of 32: one threadgroup
// per chunk, threads striding over the W columns.
  const long m = threadgroup_position_in_grid.z;
  const int tid = thread_index_in_threadgroup;
  const int nt = threads_per_threadgroup.x;

  threadgroup float L[C][C];                    // diag(beta) strict_lower(A)
  threadgroup float sb[C];
  for (int e = tid; e < C * C; e += nt) {
    const int t = e / C, j = e % C;
    L[t][j] = j < t ? beta[m * C + t] * A[m * C * C + e] : 0.0f;
  }
  for (int t = tid; t < C; t += nt) {
    sb[t] = beta[m * C + t];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int col = tid; col < W; col += nt) {
    float x[C];
    for (int t = 0; t < C; ++t) {
      const long at = (m * C + t) * W + col;
      float acc = sb[t] * R[at];
      for (int j = 0; j < t; ++j) {
        acc -= L[t][j] * x[j];
      }
      x[t] = acc;
      X[at] = acc;
    }
  }

// @kernel kda_chunk_state(Wk, QS, KS, U0, decay, state_in, sizes) -> (U, OI, state_out)
// Carries the fp32 state S [Dv, Dk] across the N chunks of one (b, h), in threadgroup memory.
// Per chunk, with S its start state:
//   U  = U0 - Wk S^T           the chunk's values corrected for S          [C, Dv]
//   OI = QS S^T                what S alone gives each token's output      [C, Dv]
//   S  = S diag(decay) + U^T KS
// after which MLX adds the in-chunk part: o = A_qk U + OI, all chunks in one matmul.
//   Wk, QS, KS [B, H, N, C, Dk]  float32: W of kda_chunk_ut; q_t exp(G_t); k_t exp(G_C - G_t)
//   U0         [B, H, N, C, Dv]  float32
//   decay      [B, H, N, Dk]     float32: exp(G_C), the chunk's whole decay
//   state_in   [B, H, Dv, Dk]    float32;  sizes: [1] int32, N (a 1-element array: see kda_decode.metal)
//   U, OI      [B, H, N, C, Dv]  float32;  state_out [B, H, Dv, Dk] float32
// Template C, Dk, Dv, Threads, Rows. Grid (Threads, Dv / Rows, B * H), threadgroup (Threads, 1, 1):
// one threadgroup per (b, h, Rows rows of Dv), which walks the chunks in order.
  const int N = sizes[0];
  const int tid = thread_index_in_threadgroup;
  const long bh = threadgroup_position_in_grid.z;
  const int r0 = threadgroup_position_in_grid.y * Rows;

  threadgroup float Ss[Rows][Dk + 1];     // the state rows; +1 puts a row's lanes on distinct banks
  threadgroup float Us[C][Rows];          // this chunk's U, for the state update

  for (int e = tid; e < Rows * Dk; e += Threads) {
    const int r = e / Dk, c = e % Dk;
    Ss[r][c] = state_in[(bh * Dv + r0 + r) * Dk + c];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int r = tid % Rows;               // phase 1: this thread's state row ...
  for (int n = 0; n < N; ++n) {
    const long ck = (bh * N + n) * C;           // the chunk's first token in [B, H, N, C, *]
    // Phase 1: U and OI, one (token, row) pair at a time, reading S only.
    for (int t = tid / Rows; t < C; t += Threads / Rows) {  // ... its tokens
      float pw = 0.0f, pq = 0.0f;
      for (int c = 0; c < Dk; ++c) {
        const float s = Ss[r][c];
        pw += Wk[(ck + t) * Dk + c] * s;
        pq += QS[(ck + t) * Dk + c] * s;
      }
      const long at = (ck + t) * Dv + r0 + r;
      const float u = U0[at] - pw;
      Us[t][r] = u;
      U[at] = u;
      OI[at] = pq;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Phase 2: S = S diag(decay) + U^T KS, each thread updating its own elements.
    for (int e = tid; e < Rows * Dk; e += Threads) {
      const int rr = e / Dk, c = e % Dk;
      float acc = Ss[rr][c] * decay[(bh * N + n) * Dk + c];
      for (int t = 0; t < C; ++t) {
        acc += Us[t][rr] * KS[(ck + t) * Dk + c];
      }
      Ss[rr][c] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (int e = tid; e < Rows * Dk; e += Threads) {
    const int rr = e / Dk, c = e % Dk;
    state_out[(bh * Dv + r0 + rr) * Dk + c] = Ss[rr][c];
  }
