// cuda_compat.h: the Metal names our kernel bodies (metal/*.metal) use, as CUDA, so the same
// bodies run through mx.fast.cuda_kernel on MLX's CUDA backend. kimi_mlx/kda/metal.py puts this
// text before a .metal file's header and passes the two as cuda_kernel's `header`.
//
// What MLX does with them (mlx/backend/cuda/custom_kernel.cpp, MLX 0.32): the source is its own
// prelude (mlx/backend/cuda/device/utils.cuh: cuda_bf16.h, cuda_fp16.h, cuda/std), then this
// header, then `namespace mlx::core::cu { __global__ void custom_kernel_<name><template hash>(
// const T* input..., T* output...) { <template arguments as constexpr / using> <body> } }`,
// compiled by NVRTC (no --device-as-default-execution-space, hence KDA_FUNC below). Unlike
// Metal's, the CUDA signature has no thread attributes (they are macros here) and passes a 0-d
// input as a pointer (Metal: a reference), so scalars travel as 1-element arrays in both.
// The grid is in threads, as in Metal (MLX divides it by the threadgroup).
//
// Mapping:
//   KDA_FUNC (a helper function)        __device__ inline
//   bfloat16_t, float16_t, half, uint   __nv_bfloat16, __half, __half, unsigned int
//   threadgroup (a variable)            __shared__ (declared in the kernel: one per block)
//   threadgroup_barrier(flags)          __syncthreads()
//   SIMD group of 32 lanes              a warp: both number them by linear thread index / 32
//   simd_sum, simd_max, simd_min        butterfly of __shfl_xor_sync over the full warp
//   simd_shuffle_xor, simd_shuffle      __shfl_xor_sync, __shfl_sync
//   thread_index_in_threadgroup ...     from threadIdx / blockIdx / blockDim / gridDim
//   exp, log, rsqrt, max, fabs ...      CUDA's device math (same names, float overloads)
// Limits: SIMD operations must be reached by all 32 lanes of a warp (threadgroups a multiple of
// 32 threads); `threadgroup` only on variable declarations; no `device` / `constant` / `thread`
// qualifiers (see below); no vector types (float4 ...),
// atomics, textures or simdgroup matrices: the bodies use none of them. tests/test_kda_cuda.py
// compiles every kernel configuration through this header where nvcc is at hand.

#define KDA_FUNC __device__ inline

typedef unsigned int uint;
typedef __nv_bfloat16 bfloat16_t;
typedef __nv_bfloat16 bfloat;
typedef __half float16_t;
typedef __half half;

// Metal's thread attributes (kernel parameters there), computed from CUDA's built-in indices.
#define thread_index_in_threadgroup (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))
#define threadgroup_position_in_grid blockIdx
#define threads_per_threadgroup blockDim
#define threadgroups_per_grid gridDim
#define thread_position_in_threadgroup threadIdx
#define thread_position_in_grid \
  make_uint3(blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y, \
             blockIdx.z * blockDim.z + threadIdx.z)
#define simdgroup_index_in_threadgroup (thread_index_in_threadgroup / 32u)
#define thread_index_in_simdgroup (thread_index_in_threadgroup % 32u)
#define threads_per_simdgroup 32u

// Threadgroup memory is CUDA's shared memory. Metal's other address spaces (device, constant,
// thread) are NOT mapped: CUDA pointers are generic, and CUDA builds its own __device__ out of
// the word `device` (__location__(device)), which an empty `device` macro would break; the
// bodies name none of them.
#define threadgroup __shared__

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
__device__ inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

// __syncthreads orders all memory; Metal's flags only narrow what a barrier orders.
__device__ inline void threadgroup_barrier(mem_flags) { __syncthreads(); }
__device__ inline void simdgroup_barrier(mem_flags) { __syncwarp(); }

template <class T>
__device__ inline T simd_shuffle_xor(T x, unsigned mask) { return __shfl_xor_sync(0xffffffffu, x, int(mask)); }
template <class T>
__device__ inline T simd_shuffle(T x, unsigned lane) { return __shfl_sync(0xffffffffu, x, int(lane)); }
template <class T>
__device__ inline T simd_sum(T x) {
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}
template <class T>
__device__ inline T simd_max(T x) {
  for (int m = 16; m > 0; m >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
template <class T>
__device__ inline T simd_min(T x) {
  for (int m = 16; m > 0; m >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
