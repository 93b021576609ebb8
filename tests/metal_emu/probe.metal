// probe.metal: tiny kernels that pin down the emulator's own semantics (tests/test_metal_emulator.py).

// @kernel probe_simd(x) -> (sum, xor1, down3, prefix, bcast, tgsum)
// x and every output: [n] float32. Grid (n, 1, 1), threadgroup (64, 1, 1).
  const uint i = thread_position_in_grid.x;
  const uint tid = thread_index_in_threadgroup;
  const float v = x[i];
  sum[i] = simd_sum(v);
  xor1[i] = simd_shuffle_xor(v, 1);
  down3[i] = simd_shuffle_down(v, 3);
  prefix[i] = simd_prefix_exclusive_sum(v);
  bcast[i] = simd_broadcast(v, 5);
  threadgroup float partial[2];
  threadgroup float buf[64];
  buf[tid] = v;
  const float s = simd_sum(v);
  if (thread_index_in_simdgroup == 0) {
    partial[simdgroup_index_in_threadgroup] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  tgsum[i] = partial[0] + partial[1] + 0.0f * buf[63 - tid];

// @kernel probe_oob(x) -> (y)
// Reads one element past the end of x: the emulator must report it, not return garbage.
  const uint i = thread_position_in_grid.x;
  y[i] = x[i + 1];

// @kernel probe_divergent(x) -> (y)
// A barrier only half the threadgroup reaches: undefined on a GPU, a reported deadlock here.
  const uint i = thread_position_in_grid.x;
  if (thread_index_in_threadgroup < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  y[i] = x[i];

// @kernel probe_unwritten(x) -> (y)
// Leaves odd elements of y unwritten: they must come back NaN.
  const uint i = thread_position_in_grid.x;
  if (i % 2 == 0) {
    y[i] = x[i];
  }

// @kernel probe_types(x, n) -> (y)
// bfloat16 in, template dtype out, a scalar input, vector types, Metal math.
  const uint i = thread_position_in_grid.x;
  if (i < uint(n)) {
    float4 a = float4(static_cast<float>(x[i]));
    a = a * 2.0f + float4(1.0f, 2.0f, 3.0f, 4.0f);
    y[i] = static_cast<OutT>(metal::exp(0.0f) * dot(a, float4(1.0f)) + rsqrt(4.0f) + fast::exp(0.0f));
  }

// @kernel probe_poison(x) -> (y)
// Reads threadgroup memory nobody wrote: poisoned (NaN) in every threadgroup, also the second.
// Template N: the array size (template instances must poison too).
  threadgroup float never_written[N];
  threadgroup float written[N];
  const uint tid = thread_index_in_threadgroup;
  written[tid] = x[thread_position_in_grid.x];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[thread_position_in_grid.x] = never_written[tid] + written[N - 1 - tid];
