// moe_route.metal: a MoE router's expert choice for one token per threadgroup, in ONE kernel.
// The math of kimi_mlx/moe.py's `route` (the reference, MLX ops: sigmoid, add, argpartition,
// take_along_axis, sum, divide, multiply: 6 kernels per MoE layer and decode step):
//   score_e  = sigmoid(logit_e)                       (float32)
//   choice_e = score_e + bias_e                       (the correction bias picks, never weighs)
//   ids      = the K experts of largest choice        (ties: the lower expert index)
//   weights  = score_ids / (sum score_ids + 1e-20) * scale     (Renorm; else score_ids * scale)
// The same body runs as Metal (mx.fast.metal_kernel) and as CUDA (mx.fast.cuda_kernel, with
// metal/cuda_compat.h before this header), and on the CPU emulator in tests.
//
// Buffers (N tokens, E experts):
//   logits  [N, E]  float32 router logits
//   bias    [E]     float32 e_score_correction_bias
//   scale   [1]     float32 routed_scaling_factor (an array: see kda_decode.metal's `sizes`)
//   ids     [N, K]  uint32, in the order chosen (largest choice first)
//   weights [N, K]  float32
// With Shared (the shared expert rides as expert E with weight 1, kimi_mlx/fused.py's FusedMoE):
//   ids     [N, 2K+2]  rows of the stacked gate/up weights: (ids, E, ids + E + 1, 2E + 1)
//   weights [N, K+1]   (weights, 1)
// Grid (Threads, N, 1), threadgroup (Threads, 1, 1); Threads a multiple of 32, K <= E; E, K, Threads,
// Renorm, Shared are template parameters.
// Thread t owns experts t, t + Threads, ...; each of the K rounds takes the largest free choice
// of the threadgroup (a SIMD reduction, then one over the SIMD groups) and frees it no more.
// A NaN choice counts as the lowest value (the ids stay in range whatever the logits).

#ifndef KDA_FUNC
#define KDA_FUNC inline
#endif

#define ROUTE_LOWEST (-3.0e38f)
#define ROUTE_NONE 0x7fffffff

// @kernel moe_route(logits, bias, scale) -> (ids, weights)
  const int t = int(thread_position_in_threadgroup.x);
  const int n = int(threadgroup_position_in_grid.y);
  constexpr int PER = (E + Threads - 1) / Threads;
  constexpr int GROUPS = Threads / 32;
  threadgroup float group_value[GROUPS];
  threadgroup int group_index[GROUPS];
  threadgroup float chosen_score[K];
  threadgroup int chosen_index[K];

  float score[PER];
  float choice[PER];
  bool free_expert[PER];
  for (int j = 0; j < PER; ++j) {
    const int e = t + j * Threads;
    free_expert[j] = e < E;
    score[j] = 0.0f;
    choice[j] = ROUTE_LOWEST;
    if (e < E) {
      const float x = float(logits[n * E + e]);
      const float s = 1.0f / (1.0f + exp(-x));
      const float c = s + float(bias[e]);
      score[j] = s;
      choice[j] = (c == c) ? max(c, ROUTE_LOWEST) : ROUTE_LOWEST;
    }
  }

  for (int r = 0; r < K; ++r) {
    // This thread's best free expert (ascending e, strict >: a tie keeps the lower index).
    float value = ROUTE_LOWEST;
    int index = ROUTE_NONE;
    for (int j = 0; j < PER; ++j) {
      if (free_expert[j] && (index == ROUTE_NONE || choice[j] > value)) {
        value = choice[j];
        index = t + j * Threads;
      }
    }
    const float best = simd_max(value);
    const int lowest = simd_min((index != ROUTE_NONE && value == best) ? index : ROUTE_NONE);
    if (thread_index_in_simdgroup == 0) {
      group_value[simdgroup_index_in_threadgroup] = best;
      group_index[simdgroup_index_in_threadgroup] = lowest;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float win_value = ROUTE_LOWEST;
    int win = ROUTE_NONE;
    for (int g = 0; g < GROUPS; ++g) {  // every thread finds the same winner
      const int i = group_index[g];
      const float v = group_value[g];
      if (i != ROUTE_NONE && (win == ROUTE_NONE || v > win_value || (v == win_value && i < win))) {
        win_value = v;
        win = i;
      }
    }
    if (win != ROUTE_NONE && win % Threads == t) {
      free_expert[win / Threads] = false;
      chosen_score[r] = score[win / Threads];
      chosen_index[r] = win;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  if (t < K) {
    float total = 0.0f;
    for (int r = 0; r < K; ++r) {
      total += chosen_score[r];
    }
    float w = chosen_score[t];
    if (Renorm) {
      w = w / (total + 1e-20f);
    }
    const uint id = uint(chosen_index[t]);
    if (Shared) {
      weights[n * (K + 1) + t] = w * scale[0];
      ids[n * (2 * K + 2) + t] = id;
      ids[n * (2 * K + 2) + K + 1 + t] = id + uint(E + 1);
      if (t == 0) {
        weights[n * (K + 1) + K] = 1.0f;
        ids[n * (2 * K + 2) + K] = uint(E);
        ids[n * (2 * K + 2) + 2 * K + 1] = uint(2 * E + 1);
      }
    } else {
      weights[n * K + t] = w * scale[0];
      ids[n * K + t] = id;
    }
  }
