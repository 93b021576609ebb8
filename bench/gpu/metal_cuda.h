// metal_cuda.h: run Metal kernel bodies (the text mx.fast.metal_kernel gets) as CUDA, the GPU
// counterpart of tests/metal_emu/metal_emu.h. bench/gpu/run_kernels.py builds each kernel the
// way tests/metal_emu/emulate.py does (its signature code, MLX's parameter order), includes this
// header instead of metal_emu.h, and adds a __global__ wrapper that computes the Metal
// attributes from the CUDA indices.
//
// Compile with NVRTC and `-default-device` (--device-as-default-execution-space): the .metal
// files' own helper functions (`inline float kda_log1p(float)`) carry no __device__, exactly as
// in Metal, and must not need one. nvcc has no such option, so NVRTC only.
//
// Mapping:
//   threadgroup (memory)          __shared__ (a `threadgroup` declaration inside the kernel)
//   threadgroup_barrier(flags)    __syncthreads()
//   simdgroup_barrier(flags)      __syncwarp()
//   SIMD group (32 lanes)         warp: Metal numbers SIMD groups by linear thread index / 32,
//                                 as CUDA numbers warps, so lane = thread_index % 32
//   simd_sum / max / min / ...    butterfly of __shfl_xor_sync over the full warp
//   simd_shuffle_xor / shuffle / shuffle_up / shuffle_down / broadcast
//                                 __shfl_xor_sync / __shfl_sync / __shfl_up_sync / __shfl_down_sync
//   simd_all / simd_any           __all_sync / __any_sync
//   thread_position_in_grid ...   blockIdx * blockDim + threadIdx and friends (mcuda:: below)
//   device / constant / thread    nothing (CUDA pointers are generic)
//   bfloat, bfloat16_t            __nv_bfloat16 (cuda_bf16.h; a bit-exact fallback without it)
//   half, float16_t               __half (cuda_fp16.h; PTX cvt fallback without it)
//   floatN, intN, uintN, ...      mcuda::vec<T, N>: Metal's constructors (broadcast, element
//                                 list, conversion) and element-wise operators
//   metal::exp / fast:: / precise::  CUDA's device math (precise unless -use_fast_math)
// Limits: SIMD operations must be reached by all 32 lanes of a full warp (threadgroups a
// multiple of 32 threads); no atomics, textures, simdgroup matrices or quad groups; vector
// swizzles other than .x .y .z .w are not supported.
#pragma once

#if __has_include(<cuda_bf16.h>) && !defined(MCUDA_NO_CUDA_HEADERS)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define MCUDA_HAVE_CUDA_HEADERS 1
#endif

#define MCUDA_HD __host__ __device__ inline
#define MCUDA_D __device__ inline

// ---------------------------------------------------------------------------------------------
// Scalar types (NVRTC has no <cstdint>; these are glibc's LP64 definitions, so a second
// identical typedef from any header is harmless)
// ---------------------------------------------------------------------------------------------
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

#ifdef MCUDA_HAVE_CUDA_HEADERS
typedef __half half;
typedef __half float16_t;
typedef __nv_bfloat16 bfloat;
typedef __nv_bfloat16 bfloat16_t;
// Metal promotes half / bfloat mixed with float to float; CUDA's types convert to every
// built-in type, so `float + bfloat` would be ambiguous without these exact matches.
#define MCUDA_MIXED(T)                                                                       \
  __device__ inline float operator+(float a, T b) { return a + float(b); }                   \
  __device__ inline float operator-(float a, T b) { return a - float(b); }                   \
  __device__ inline float operator*(float a, T b) { return a * float(b); }                   \
  __device__ inline float operator/(float a, T b) { return a / float(b); }                   \
  __device__ inline float operator+(T a, float b) { return float(a) + b; }                   \
  __device__ inline float operator-(T a, float b) { return float(a) - b; }                   \
  __device__ inline float operator*(T a, float b) { return float(a) * b; }                   \
  __device__ inline float operator/(T a, float b) { return float(a) / b; }                   \
  __device__ inline float& operator+=(float& a, T b) { return a += float(b); }               \
  __device__ inline float& operator-=(float& a, T b) { return a -= float(b); }               \
  __device__ inline float& operator*=(float& a, T b) { return a *= float(b); }               \
  __device__ inline float& operator/=(float& a, T b) { return a /= float(b); }
MCUDA_MIXED(__half)
MCUDA_MIXED(__nv_bfloat16)
#undef MCUDA_MIXED
#else
// Without the CUDA headers: bfloat as the top 16 bits of a float (round to nearest even, NaN
// kept a NaN: as metal_emu.h), half through PTX conversions.
struct bfloat16_t {
  unsigned short bits;
  bfloat16_t() = default;
  MCUDA_HD bfloat16_t(float f) {
    unsigned u = __float_as_uint(f);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40)
                                            : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  MCUDA_HD bfloat16_t(double d) : bfloat16_t(float(d)) {}
  MCUDA_HD bfloat16_t(int i) : bfloat16_t(float(i)) {}
  MCUDA_HD operator float() const { return __uint_as_float(unsigned(bits) << 16); }
};
typedef bfloat16_t bfloat;
struct half {
  unsigned short bits;
  half() = default;
  MCUDA_D half(float f) { asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(f)); }
  MCUDA_D half(double d) : half(float(d)) {}
  MCUDA_D half(int i) : half(float(i)) {}
  MCUDA_D operator float() const {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
  }
};
typedef half float16_t;
#endif

// The emulator's signature code names device buffers emu::dptr<T> (a bounds-checked pointer
// there); here they are plain pointers.
namespace emu {
template <class T>
using dptr = T*;
}

// ---------------------------------------------------------------------------------------------
// Metal vector types
// ---------------------------------------------------------------------------------------------
namespace mcuda {
template <class T, int N>
struct vec;

#define MCUDA_VEC_OPS(N)                                                                            \
  MCUDA_HD T& operator[](int i) { return (&x)[i]; }                                                 \
  MCUDA_HD const T& operator[](int i) const { return (&x)[i]; }                                     \
  friend MCUDA_HD vec operator+(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] += b[i]; return a; } \
  friend MCUDA_HD vec operator-(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] -= b[i]; return a; } \
  friend MCUDA_HD vec operator*(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] *= b[i]; return a; } \
  friend MCUDA_HD vec operator/(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] /= b[i]; return a; } \
  friend MCUDA_HD vec operator+(vec a, T s) { for (int i = 0; i < N; ++i) a[i] += s; return a; }            \
  friend MCUDA_HD vec operator-(vec a, T s) { for (int i = 0; i < N; ++i) a[i] -= s; return a; }            \
  friend MCUDA_HD vec operator*(vec a, T s) { for (int i = 0; i < N; ++i) a[i] *= s; return a; }            \
  friend MCUDA_HD vec operator*(T s, vec a) { for (int i = 0; i < N; ++i) a[i] *= s; return a; }            \
  friend MCUDA_HD vec operator/(vec a, T s) { for (int i = 0; i < N; ++i) a[i] /= s; return a; }            \
  friend MCUDA_HD vec operator-(vec a) { for (int i = 0; i < N; ++i) a[i] = -a[i]; return a; }              \
  MCUDA_HD vec& operator+=(const vec& b) { return *this = *this + b; }                              \
  MCUDA_HD vec& operator-=(const vec& b) { return *this = *this - b; }                              \
  MCUDA_HD vec& operator*=(const vec& b) { return *this = *this * b; }                              \
  MCUDA_HD vec& operator/=(const vec& b) { return *this = *this / b; }                              \
  MCUDA_HD vec& operator*=(T s) { return *this = *this * s; }                                       \
  MCUDA_HD vec& operator/=(T s) { return *this = *this / s; }

template <class T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  MCUDA_HD constexpr vec(T a, T b) : x(a), y(b) {}
  MCUDA_HD constexpr explicit vec(T a) : x(a), y(a) {}
  template <class U>
  MCUDA_HD constexpr explicit vec(const vec<U, 2>& o) : x(T(o.x)), y(T(o.y)) {}
  MCUDA_VEC_OPS(2)
};
template <class T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  MCUDA_HD constexpr vec(T a, T b, T c) : x(a), y(b), z(c) {}
  MCUDA_HD constexpr explicit vec(T a) : x(a), y(a), z(a) {}
  template <class U>
  MCUDA_HD constexpr explicit vec(const vec<U, 3>& o) : x(T(o.x)), y(T(o.y)), z(T(o.z)) {}
  MCUDA_VEC_OPS(3)
};
template <class T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  MCUDA_HD constexpr vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  MCUDA_HD constexpr explicit vec(T a) : x(a), y(a), z(a), w(a) {}
  template <class U>
  MCUDA_HD constexpr explicit vec(const vec<U, 4>& o) : x(T(o.x)), y(T(o.y)), z(T(o.z)), w(T(o.w)) {}
  MCUDA_VEC_OPS(4)
};
#undef MCUDA_VEC_OPS
}  // namespace mcuda

// Metal's names for them. CUDA's own float2 ... uint4 are plain structs without Metal's
// constructors or operators, so the names are macros onto mcuda::vec from here on (defined
// after the CUDA headers: nothing of CUDA's sees them).
#define float2 mcuda::vec<float, 2>
#define float3 mcuda::vec<float, 3>
#define float4 mcuda::vec<float, 4>
#define half2 mcuda::vec<half, 2>
#define half3 mcuda::vec<half, 3>
#define half4 mcuda::vec<half, 4>
#define int2 mcuda::vec<int, 2>
#define int3 mcuda::vec<int, 3>
#define int4 mcuda::vec<int, 4>
#define uint2 mcuda::vec<uint, 2>
#define uint3 mcuda::vec<uint, 3>
#define uint4 mcuda::vec<uint, 4>
#define short2 mcuda::vec<short, 2>
#define short3 mcuda::vec<short, 3>
#define short4 mcuda::vec<short, 4>
#define ushort2 mcuda::vec<ushort, 2>
#define ushort3 mcuda::vec<ushort, 3>
#define ushort4 mcuda::vec<ushort, 4>
#define bool2 mcuda::vec<bool, 2>
#define bool3 mcuda::vec<bool, 3>
#define bool4 mcuda::vec<bool, 4>

// ---------------------------------------------------------------------------------------------
// Metal attributes, from the CUDA indices (what the generated __global__ wrapper passes)
// ---------------------------------------------------------------------------------------------
namespace mcuda {
template <class D>  // CUDA's dim3 / uint3 (their names are Metal's from here on)
MCUDA_D mcuda::vec<uint, 3> v3(const D& d) { return mcuda::vec<uint, 3>(d.x, d.y, d.z); }
MCUDA_D uint thread_index_in_threadgroup() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
MCUDA_D uint threads_per_threadgroup_count() { return blockDim.x * blockDim.y * blockDim.z; }
MCUDA_D mcuda::vec<uint, 3> thread_position_in_grid() {
  return mcuda::vec<uint, 3>(blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y,
                             blockIdx.z * blockDim.z + threadIdx.z);
}
MCUDA_D mcuda::vec<uint, 3> thread_position_in_threadgroup() { return v3(threadIdx); }
MCUDA_D mcuda::vec<uint, 3> threadgroup_position_in_grid() { return v3(blockIdx); }
MCUDA_D mcuda::vec<uint, 3> threads_per_threadgroup() { return v3(blockDim); }
MCUDA_D mcuda::vec<uint, 3> threadgroups_per_grid() { return v3(gridDim); }
MCUDA_D mcuda::vec<uint, 3> threads_per_grid() {
  return mcuda::vec<uint, 3>(gridDim.x * blockDim.x, gridDim.y * blockDim.y, gridDim.z * blockDim.z);
}
MCUDA_D uint simdgroup_index_in_threadgroup() { return thread_index_in_threadgroup() / 32u; }
MCUDA_D uint thread_index_in_simdgroup() { return thread_index_in_threadgroup() % 32u; }
MCUDA_D uint simdgroups_per_threadgroup() { return (threads_per_threadgroup_count() + 31u) / 32u; }
MCUDA_D uint threads_per_simdgroup() { return 32u; }
MCUDA_D uint thread_execution_width() { return 32u; }

// Any trivially copyable value through a warp shuffle, 32 bits at a time.
template <class T, class F>
MCUDA_D T shuffle_words(const T& x, F f) {
  constexpr int n = (sizeof(T) + 3) / 4;
  union U {
    T v;
    unsigned w[n];
    MCUDA_D U() {}
  } in, out;
  for (int i = 0; i < n; ++i) in.w[i] = 0u;
  in.v = x;
  for (int i = 0; i < n; ++i) out.w[i] = f(in.w[i]);
  return out.v;
}
constexpr unsigned kFullMask = 0xffffffffu;
}  // namespace mcuda

// ---------------------------------------------------------------------------------------------
// The Metal standard library surface
// ---------------------------------------------------------------------------------------------
namespace metal {
enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
MCUDA_HD mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

// CUDA's device math has the float overloads Metal's have (exp(float) is expf, ...).
using ::abs;
using ::ceil;
using ::cos;
using ::exp;
using ::exp2;
using ::fabs;
using ::floor;
using ::fma;
using ::fmax;
using ::fmin;
using ::isinf;
using ::isnan;
using ::log;
using ::log2;
using ::max;
using ::min;
using ::pow;
using ::round;
using ::rsqrt;
using ::sin;
using ::sqrt;
using ::tanh;
using ::trunc;

template <class T>
MCUDA_D T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T>
MCUDA_D T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
MCUDA_D T dot(const mcuda::vec<T, N>& a, const mcuda::vec<T, N>& b) {
  T s = T(0);
  for (int i = 0; i < N; ++i) s += a[i] * b[i];
  return s;
}
template <class To, class From>
MCUDA_D To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type between types of different sizes");
  union {
    From f;
    To t;
  } u{x};
  return u.t;
}

namespace precise {
using ::exp;
using ::log;
using ::rsqrt;
using ::sqrt;
MCUDA_D float divide(float a, float b) { return __fdiv_rn(a, b); }
}  // namespace precise
namespace fast {
MCUDA_D float exp(float x) { return __expf(x); }
MCUDA_D float exp2(float x) { return exp2f(x); }
MCUDA_D float log(float x) { return __logf(x); }
MCUDA_D float sqrt(float x) { return sqrtf(x); }
MCUDA_D float rsqrt(float x) { return rsqrtf(x); }
MCUDA_D float tanh(float x) { return tanhf(x); }
MCUDA_D float divide(float a, float b) { return __fdividef(a, b); }
}  // namespace fast

// Barriers. Metal's mem_flags pick which memory the barrier orders; __syncthreads orders all.
MCUDA_D void threadgroup_barrier(mem_flags) { __syncthreads(); }
MCUDA_D void simdgroup_barrier(mem_flags) { __syncwarp(); }

// SIMD-group operations over the 32 lanes of a warp.
template <class T>
MCUDA_D T simd_shuffle_xor(T x, ushort mask) {
  return mcuda::shuffle_words(x, [&](unsigned w) { return __shfl_xor_sync(mcuda::kFullMask, w, int(mask)); });
}
template <class T>
MCUDA_D T simd_shuffle(T x, ushort lane) {
  return mcuda::shuffle_words(x, [&](unsigned w) { return __shfl_sync(mcuda::kFullMask, w, int(lane)); });
}
template <class T>
MCUDA_D T simd_broadcast(T x, ushort lane) { return simd_shuffle(x, lane); }
template <class T>
MCUDA_D T simd_broadcast_first(T x) { return simd_shuffle(x, 0); }
template <class T>
MCUDA_D T simd_shuffle_down(T x, ushort delta) {  // lanes past the end keep their own value
  return mcuda::shuffle_words(x, [&](unsigned w) { return __shfl_down_sync(mcuda::kFullMask, w, unsigned(delta)); });
}
template <class T>
MCUDA_D T simd_shuffle_up(T x, ushort delta) {  // lanes before the start keep their own value
  return mcuda::shuffle_words(x, [&](unsigned w) { return __shfl_up_sync(mcuda::kFullMask, w, unsigned(delta)); });
}
template <class T>
MCUDA_D T simd_sum(T x) {
  for (int m = 16; m > 0; m >>= 1) x = T(x + simd_shuffle_xor(x, ushort(m)));
  return x;
}
template <class T>
MCUDA_D T simd_product(T x) {
  for (int m = 16; m > 0; m >>= 1) x = T(x * simd_shuffle_xor(x, ushort(m)));
  return x;
}
template <class T>
MCUDA_D T simd_max(T x) {
  for (int m = 16; m > 0; m >>= 1) {
    T y = simd_shuffle_xor(x, ushort(m));
    x = x > y ? x : y;
  }
  return x;
}
template <class T>
MCUDA_D T simd_min(T x) {
  for (int m = 16; m > 0; m >>= 1) {
    T y = simd_shuffle_xor(x, ushort(m));
    x = x < y ? x : y;
  }
  return x;
}
template <class T>
MCUDA_D T simd_prefix_inclusive_sum(T x) {
  const uint lane = mcuda::thread_index_in_simdgroup();
  for (int d = 1; d < 32; d <<= 1) {
    T y = simd_shuffle_up(x, ushort(d));
    if (lane >= uint(d)) x = T(x + y);
  }
  return x;
}
template <class T>
MCUDA_D T simd_prefix_exclusive_sum(T x) {
  T inc = simd_prefix_inclusive_sum(x);
  T prev = simd_shuffle_up(inc, ushort(1));
  return mcuda::thread_index_in_simdgroup() == 0 ? T(0) : prev;
}
MCUDA_D bool simd_all(bool x) { return __all_sync(mcuda::kFullMask, x); }
MCUDA_D bool simd_any(bool x) { return __any_sync(mcuda::kFullMask, x); }
}  // namespace metal

using namespace metal;

// Address-space qualifiers: CUDA pointers are generic, so `device`, `constant` and `thread` go;
// a `threadgroup` variable is a __shared__ one (the kernel body declares it inside the function,
// which CUDA allows: one per block, like Metal's one per threadgroup).
#define device
#define constant
#define thread
#define threadgroup __shared__
