// metal_emu.h: run Metal kernel bodies (the text mx.fast.metal_kernel gets) on the CPU.
//
// Concurrency model. Every Metal thread of a threadgroup is one OS thread (std::thread);
// threadgroups of the grid run one after another on that same pool of threads, with threadgroup
// memory poisoned (all bytes 0xFF: float NaN, int -1) before each one. Threads meet only where a
// Metal kernel makes them meet:
//   threadgroup_barrier   all threads of the threadgroup
//   simd_* operations     the 32 lanes of one SIMD group: each lane writes its value into a
//                         per-SIMD-group exchange page, the lanes meet at a barrier, then each
//                         reads what it needs (two pages alternate, so one barrier per op)
// Schedules:
//   free      all threads run at once (real races, nondeterministic)
//   forward / reverse / random
//             one thread runs at a time and the baton passes only at a barrier or SIMD op, to
//             the lowest / highest / a seeded-random runnable thread: deterministic and
//             adversarial, so a missing barrier reads poisoned or stale memory every run
// Errors are reported, never crashed on: device buffers are bounds-checked pointers, a barrier
// that not every thread reaches (divergent barrier or SIMD op) is a deadlock, detected at once
// in the serial schedules and by a watchdog in the free one.
//
// Limits: `threadgroup` may only declare variables (not qualify pointers or parameters); SIMD
// ops must be reached by every lane of the SIMD group; the grid must be a whole number of
// threadgroups; no atomics, textures or simdgroup matrices.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <semaphore>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Scalar and vector types
// ---------------------------------------------------------------------------------------------
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;

struct bfloat16_t {  // Metal bfloat: the top 16 bits of a float, rounded to nearest even
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40);  // keep NaN a NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  bfloat16_t(double d) : bfloat16_t(float(d)) {}
  bfloat16_t(int i) : bfloat16_t(float(i)) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

namespace emu {
template <class T, int N>
struct vec;

#define EMU_VEC_OPS(N)                                                                  \
  T& operator[](int i) { return (&x)[i]; }                                              \
  const T& operator[](int i) const { return (&x)[i]; }                                  \
  friend vec operator+(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] += b[i]; return a; } \
  friend vec operator-(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] -= b[i]; return a; } \
  friend vec operator*(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] *= b[i]; return a; } \
  friend vec operator/(vec a, const vec& b) { for (int i = 0; i < N; ++i) a[i] /= b[i]; return a; } \
  friend vec operator*(vec a, T s) { for (int i = 0; i < N; ++i) a[i] *= s; return a; } \
  friend vec operator*(T s, vec a) { for (int i = 0; i < N; ++i) a[i] *= s; return a; } \
  friend vec operator/(vec a, T s) { for (int i = 0; i < N; ++i) a[i] /= s; return a; } \
  friend vec operator-(vec a) { for (int i = 0; i < N; ++i) a[i] = -a[i]; return a; }   \
  vec& operator+=(const vec& b) { return *this = *this + b; }                           \
  vec& operator-=(const vec& b) { return *this = *this - b; }                           \
  vec& operator*=(const vec& b) { return *this = *this * b; }                           \
  vec& operator*=(T s) { return *this = *this * s; }

template <class T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  constexpr vec(T a, T b) : x(a), y(b) {}
  constexpr explicit vec(T a) : x(a), y(a) {}
  template <class U>
  constexpr explicit vec(const vec<U, 2>& o) : x(T(o.x)), y(T(o.y)) {}
  EMU_VEC_OPS(2)
};
template <class T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  constexpr vec(T a, T b, T c) : x(a), y(b), z(c) {}
  constexpr explicit vec(T a) : x(a), y(a), z(a) {}
  template <class U>
  constexpr explicit vec(const vec<U, 3>& o) : x(T(o.x)), y(T(o.y)), z(T(o.z)) {}
  EMU_VEC_OPS(3)
};
template <class T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  constexpr vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  constexpr explicit vec(T a) : x(a), y(a), z(a), w(a) {}
  template <class U>
  constexpr explicit vec(const vec<U, 4>& o) : x(T(o.x)), y(T(o.y)), z(T(o.z)), w(T(o.w)) {}
  EMU_VEC_OPS(4)
};
#undef EMU_VEC_OPS
}  // namespace emu

#define EMU_VEC_TYPES(T, name) \
  typedef emu::vec<T, 2> name##2; \
  typedef emu::vec<T, 3> name##3; \
  typedef emu::vec<T, 4> name##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(half, half)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(ushort, ushort)
EMU_VEC_TYPES(bool, bool)
#undef EMU_VEC_TYPES

// ---------------------------------------------------------------------------------------------
// Errors, checked device pointers, thread context
// ---------------------------------------------------------------------------------------------
namespace emu {

struct Ids;

struct ErrorState {
  std::mutex m;
  std::atomic<bool> set{false};
  char msg[1024] = {0};
};
inline ErrorState g_error;

inline void report(const char* fmt, ...) {
  std::lock_guard<std::mutex> lock(g_error.m);
  if (g_error.set.load()) return;  // keep the first error: later ones are usually its echoes
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_error.msg, sizeof(g_error.msg), fmt, args);
  va_end(args);
  g_error.set.store(true);
}

struct Sync;
struct Barrier;

// Per-thread view of where this Metal thread is; set once per OS thread of a launch.
struct Ctx {
  int tid = 0, lane = 0, sg = 0, width = 32;
  unsigned parity = 0;  // which exchange page the next SIMD op uses
  unsigned group[3] = {0, 0, 0};
  Sync* sync = nullptr;
  Barrier* tg_barrier = nullptr;
  Barrier* sg_barrier = nullptr;
  unsigned char (*pages)[2][32][32] = nullptr;  // this SIMD group's exchange pages
};
inline thread_local Ctx* tls = nullptr;

template <class T>
T& out_of_bounds(const char* name, long index, long size) {
  const Ctx* c = tls;
  report("out-of-bounds access %s[%ld] (buffer has %ld elements) by thread %d of threadgroup "
         "(%u, %u, %u)", name, index, size, c ? c->tid : -1, c ? c->group[0] : 0,
         c ? c->group[1] : 0, c ? c->group[2] : 0);
  alignas(64) static thread_local unsigned char scratch[64];
  std::memset(scratch, 0xff, sizeof(scratch));
  return *reinterpret_cast<T*>(scratch);
}

// A `device` buffer: pointer arithmetic as in Metal, every element access bounds-checked.
template <class T>
struct dptr {
  T* base = nullptr;
  long size = 0, off = 0;
  const char* name = "?";
  dptr() = default;
  dptr(T* b, long n, const char* nm, long o = 0) : base(b), size(n), off(o), name(nm) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  dptr(const dptr<U>& o) : base(o.base), size(o.size), off(o.off), name(o.name) {}
  T& operator[](long i) const {
    long j = off + i;
    if (j < 0 || j >= size) return out_of_bounds<T>(name, j, size);
    return base[j];
  }
  T& operator*() const { return (*this)[0]; }
  T* operator->() const { return &(*this)[0]; }
  dptr operator+(long d) const { return dptr(base, size, name, off + d); }
  dptr operator-(long d) const { return dptr(base, size, name, off - d); }
  dptr& operator+=(long d) { off += d; return *this; }
  dptr& operator-=(long d) { off -= d; return *this; }
  dptr& operator++() { ++off; return *this; }
  dptr& operator--() { --off; return *this; }
  long operator-(const dptr& o) const { return off - o.off; }
  bool operator==(const dptr& o) const { return base == o.base && off == o.off; }
  bool operator!=(const dptr& o) const { return !(*this == o); }
};
template <class T>
dptr<T> operator+(long d, const dptr<T>& p) { return p + d; }

// ---------------------------------------------------------------------------------------------
// Barriers and schedules
// ---------------------------------------------------------------------------------------------
enum Schedule { kFree = 0, kForward = 1, kReverse = 2, kRandom = 3 };

struct Barrier {
  int id = 0;
  int count = 0;
  std::vector<int> members;    // thread ids that meet here
  void (*on_complete)(void*) = nullptr;  // run by the last arrival before anyone leaves
  void* arg = nullptr;
  std::atomic<int> arrived{0};
  std::atomic<uint32_t> gen{0};
};

struct Sync {
  int schedule = kFree;
  int nthreads = 0;
  std::atomic<bool> aborted{false};
  std::atomic<uint64_t> progress{0};
  std::vector<Barrier*> barriers;
  // Serial schedules: one baton, handed over only at barriers.
  std::mutex m;
  std::vector<std::unique_ptr<std::counting_semaphore<1 << 20>>> sems;
  std::vector<int> state;  // -1 runnable, -2 finished, >= 0 waiting at that barrier id
  std::mt19937_64 rng;

  void init(int schedule_, int n, uint64_t seed) {
    schedule = schedule_;
    nthreads = n;
    rng.seed(seed);
    state.assign(n, -1);
    for (int i = 0; i < n; ++i) sems.emplace_back(new std::counting_semaphore<1 << 20>(0));
  }

  void abort_all(const char* why) {
    if (aborted.exchange(true)) return;
    report("%s", why);
    for (Barrier* b : barriers) {  // wake everyone; barriers are no-ops from now on
      b->gen.fetch_add(1);
      b->gen.notify_all();
    }
    for (auto& s : sems) s->release();
  }

  int pick() {  // the next thread to hold the baton (caller holds m)
    int found = -1, nrun = 0;
    for (int t = 0; t < nthreads; ++t) {
      if (state[t] != -1) continue;
      ++nrun;
      if (schedule == kForward && found < 0) found = t;
      if (schedule == kReverse) found = t;
    }
    if (schedule == kRandom && nrun > 0) {
      int k = int(rng() % uint64_t(nrun));
      for (int t = 0; t < nthreads; ++t)
        if (state[t] == -1 && k-- == 0) return t;
    }
    return found;
  }

  // Caller holds the lock: pass the baton on and (unless finished) wait until it comes back.
  void hand_over(std::unique_lock<std::mutex>& lock, int tid, bool finished = false) {
    int next = pick();
    if (next < 0) {
      bool waiting = false;
      for (int s : state) waiting |= s >= 0;
      lock.unlock();
      if (waiting)
        abort_all("deadlock: a threadgroup barrier or SIMD operation is not reached by every "
                  "thread that takes part in it (divergent control flow?)");
      return;
    }
    if (next == tid) return;
    sems[next]->release();
    lock.unlock();
    if (!finished) sems[tid]->acquire();
  }

  void begin(int tid) {
    if (schedule != kFree) sems[tid]->acquire();
  }

  void start_serial() {
    if (schedule == kFree) return;
    std::lock_guard<std::mutex> lock(m);
    int first = pick();
    sems[first]->release();
  }

  void finish(int tid) {
    if (schedule == kFree) {
      progress.fetch_add(1);
      return;
    }
    std::unique_lock<std::mutex> lock(m);
    state[tid] = -2;
    hand_over(lock, tid, true);
  }

  void wait(Barrier& b, int tid) {
    if (aborted.load(std::memory_order_acquire)) return;
    if (schedule != kFree) {
      std::unique_lock<std::mutex> lock(m);
      if (aborted.load()) return;
      state[tid] = b.id;
      if (b.arrived.fetch_add(1) + 1 == b.count) {
        b.arrived.store(0);
        if (b.on_complete) b.on_complete(b.arg);
        for (int t : b.members) state[t] = -1;
        progress.fetch_add(1);
      }
      hand_over(lock, tid);
      return;
    }
    uint32_t g = b.gen.load(std::memory_order_acquire);
    if (b.arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == b.count) {
      b.arrived.store(0, std::memory_order_relaxed);
      if (b.on_complete) b.on_complete(b.arg);
      progress.fetch_add(1, std::memory_order_relaxed);
      b.gen.fetch_add(1, std::memory_order_release);
      b.gen.notify_all();
    } else {
      while (b.gen.load(std::memory_order_acquire) == g) {
        if (aborted.load(std::memory_order_acquire)) return;
        b.gen.wait(g, std::memory_order_acquire);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Threadgroup memory: every `threadgroup` variable lands in one linker section, poisoned
// before each threadgroup (Metal leaves it uninitialised).
// ---------------------------------------------------------------------------------------------
extern "C" char __start_emu_tg[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_tg[] __attribute__((weak, visibility("hidden")));

inline void poison_threadgroup_memory(void*) {
  if (__start_emu_tg && __stop_emu_tg) std::memset(__start_emu_tg, 0xff, __stop_emu_tg - __start_emu_tg);
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------
struct Ids {
  emu::vec<uint, 3> thread_position_in_grid, threadgroup_position_in_grid,
      thread_position_in_threadgroup, threads_per_threadgroup, threadgroups_per_grid,
      threads_per_grid;
  uint thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
};

// Runs `kernel(ids)` for every thread of the grid. Returns 0, or 1 with the error in err.
template <class F>
int launch(const unsigned grid[3], const unsigned tg[3], int schedule, uint64_t seed,
           double timeout_s, F&& kernel, char* err, int errlen) {
  {
    std::lock_guard<std::mutex> lock(g_error.m);
    g_error.set.store(false);
    g_error.msg[0] = 0;
  }
  for (int d = 0; d < 3; ++d) {
    if (tg[d] == 0 || grid[d] % tg[d] != 0) {
      std::snprintf(err, errlen, "grid (%u, %u, %u) is not a whole number of threadgroups "
                    "(%u, %u, %u)", grid[0], grid[1], grid[2], tg[0], tg[1], tg[2]);
      return 1;
    }
  }
  const int nt = int(tg[0] * tg[1] * tg[2]);
  const int nsg = (nt + 31) / 32;
  const unsigned ng[3] = {grid[0] / tg[0], grid[1] / tg[1], grid[2] / tg[2]};
  const long ngroups = long(ng[0]) * ng[1] * ng[2];
  if (nt > 1024) {
    std::snprintf(err, errlen, "threadgroup of %d threads: Metal allows at most 1024", nt);
    return 1;
  }

  Sync sync;
  sync.init(schedule, nt, seed);
  Barrier tg_barrier, end_barrier;
  std::vector<Barrier> sg_barriers(nsg);
  std::vector<unsigned char> pages_mem(size_t(nsg) * 2 * 32 * 32 + 64);
  auto* pages = reinterpret_cast<unsigned char(*)[2][32][32]>(
      (reinterpret_cast<uintptr_t>(pages_mem.data()) + 63) & ~uintptr_t(63));
  int next_id = 0;
  auto setup = [&](Barrier& b, int first, int count) {
    b.id = next_id++;
    b.count = count;
    for (int t = first; t < first + count; ++t) b.members.push_back(t);
    sync.barriers.push_back(&b);
  };
  setup(tg_barrier, 0, nt);
  setup(end_barrier, 0, nt);
  end_barrier.on_complete = poison_threadgroup_memory;
  for (int s = 0; s < nsg; ++s) setup(sg_barriers[s], 32 * s, std::min(32, nt - 32 * s));
  poison_threadgroup_memory(nullptr);

  std::atomic<int> done{0};
  auto body = [&](int tid) {
    Ctx ctx;
    ctx.tid = tid;
    ctx.sg = tid / 32;
    ctx.lane = tid % 32;
    ctx.width = std::min(32, nt - 32 * ctx.sg);
    ctx.sync = &sync;
    ctx.tg_barrier = &tg_barrier;
    ctx.sg_barrier = &sg_barriers[ctx.sg];
    ctx.pages = &pages[ctx.sg];
    tls = &ctx;
    sync.begin(tid);
    Ids ids;
    const uint lx = tid % tg[0], ly = (tid / tg[0]) % tg[1], lz = tid / (tg[0] * tg[1]);
    ids.thread_position_in_threadgroup = {lx, ly, lz};
    ids.threads_per_threadgroup = {tg[0], tg[1], tg[2]};
    ids.threadgroups_per_grid = {ng[0], ng[1], ng[2]};
    ids.threads_per_grid = {grid[0], grid[1], grid[2]};
    ids.thread_index_in_threadgroup = uint(tid);
    ids.simdgroup_index_in_threadgroup = uint(ctx.sg);
    ids.thread_index_in_simdgroup = uint(ctx.lane);
    ids.simdgroups_per_threadgroup = uint(nsg);
    ids.threads_per_simdgroup = 32;
    ids.thread_execution_width = 32;
    for (long g = 0; g < ngroups && !sync.aborted.load(); ++g) {
      const uint gx = uint(g % ng[0]), gy = uint((g / ng[0]) % ng[1]), gz = uint(g / (long(ng[0]) * ng[1]));
      ctx.group[0] = gx, ctx.group[1] = gy, ctx.group[2] = gz;
      ids.threadgroup_position_in_grid = {gx, gy, gz};
      ids.thread_position_in_grid = {gx * tg[0] + lx, gy * tg[1] + ly, gz * tg[2] + lz};
      kernel(static_cast<const Ids&>(ids));
      sync.wait(end_barrier, tid);  // the next threadgroup reuses these threads and memory
    }
    done.fetch_add(1);
    sync.finish(tid);
    tls = nullptr;
  };

  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (int t = 0; t < nt; ++t) threads.emplace_back(body, t);
  sync.start_serial();
  // Watchdog: a free-running launch that stops completing barriers has deadlocked.
  uint64_t last = sync.progress.load();
  auto since = std::chrono::steady_clock::now();
  while (done.load() < nt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    uint64_t now = sync.progress.load();
    if (now != last) {
      last = now;
      since = std::chrono::steady_clock::now();
    } else if (std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count() > timeout_s) {
      sync.abort_all("deadlock: no barrier completed within the watchdog timeout (a threadgroup "
                     "barrier or SIMD operation not reached by every thread?)");
    }
  }
  for (auto& t : threads) t.join();
  if (g_error.set.load()) {
    std::snprintf(err, errlen, "%s", g_error.msg);
    return 1;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// SIMD-group operations
// ---------------------------------------------------------------------------------------------
template <class T>
struct Exchange {
  const unsigned char (*slots)[32];
  int width, lane;
  T get(int l) const {
    if (l < 0 || l >= width) {
      report("SIMD shuffle from lane %d of a %d-lane SIMD group", l, width);
      return T();
    }
    T v;
    std::memcpy(static_cast<void*>(&v), slots[l], sizeof(T));
    return v;
  }
};

template <class T>
Exchange<T> exchange(const T& x) {
  static_assert(sizeof(T) <= 32, "SIMD op on a type wider than 32 bytes");
  Ctx& c = *tls;
  auto& page = (*c.pages)[c.parity & 1u];
  ++c.parity;
  std::memcpy(page[c.lane], static_cast<const void*>(&x), sizeof(T));
  c.sync->wait(*c.sg_barrier, c.tid);
  return Exchange<T>{page, c.width, c.lane};
}

template <class T, class Op>
T tree(const Exchange<T>& e, int lo, int hi, Op op) {  // pairwise, the same order on every lane
  if (hi - lo == 1) return e.get(lo);
  int mid = lo + (hi - lo + 1) / 2;
  return op(tree(e, lo, mid, op), tree(e, mid, hi, op));
}
}  // namespace emu

// ---------------------------------------------------------------------------------------------
// The Metal standard library surface the kernels use
// ---------------------------------------------------------------------------------------------
namespace metal {
enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

using std::abs;
using std::ceil;
using std::cos;
using std::exp;
using std::exp2;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::isinf;
using std::isnan;
using std::log;
using std::log2;
using std::pow;
using std::round;
using std::sin;
using std::sqrt;
using std::tanh;
using std::trunc;

inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
template <class T>
inline T max(T a, T b) { return a > b ? a : b; }
template <class T>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
inline T dot(const emu::vec<T, N>& a, const emu::vec<T, N>& b) {
  T s = T(0);
  for (int i = 0; i < N; ++i) s += a[i] * b[i];
  return s;
}
template <class To, class From>
inline To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type between types of different sizes");
  To y;
  std::memcpy(static_cast<void*>(&y), static_cast<const void*>(&x), sizeof(To));
  return y;
}

namespace precise {
using std::exp;
using std::log;
using std::sqrt;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float divide(float a, float b) { return a / b; }
}  // namespace precise
namespace fast {
using std::exp;
using std::exp2;
using std::log;
using std::sqrt;
using std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float divide(float a, float b) { return a / b; }
}  // namespace fast

inline void threadgroup_barrier(mem_flags) {
  emu::Ctx& c = *emu::tls;
  c.sync->wait(*c.tg_barrier, c.tid);
}
inline void simdgroup_barrier(mem_flags) {
  emu::Ctx& c = *emu::tls;
  c.sync->wait(*c.sg_barrier, c.tid);
}

template <class T>
T simd_sum(T x) {
  auto e = emu::exchange(x);
  return emu::tree(e, 0, e.width, [](const T& a, const T& b) { return T(a + b); });
}
template <class T>
T simd_product(T x) {
  auto e = emu::exchange(x);
  return emu::tree(e, 0, e.width, [](const T& a, const T& b) { return T(a * b); });
}
template <class T>
T simd_max(T x) {
  auto e = emu::exchange(x);
  return emu::tree(e, 0, e.width, [](const T& a, const T& b) { return a > b ? a : b; });
}
template <class T>
T simd_min(T x) {
  auto e = emu::exchange(x);
  return emu::tree(e, 0, e.width, [](const T& a, const T& b) { return a < b ? a : b; });
}
template <class T>
T simd_prefix_inclusive_sum(T x) {
  auto e = emu::exchange(x);
  T s = e.get(0);
  for (int l = 1; l <= e.lane; ++l) s = T(s + e.get(l));
  return s;
}
template <class T>
T simd_prefix_exclusive_sum(T x) {
  auto e = emu::exchange(x);
  T s = T(0);
  for (int l = 0; l < e.lane; ++l) s = T(s + e.get(l));
  return s;
}
inline bool simd_all(bool x) {
  auto e = emu::exchange(x);
  bool r = true;
  for (int l = 0; l < e.width; ++l) r = r && e.get(l);
  return r;
}
inline bool simd_any(bool x) {
  auto e = emu::exchange(x);
  bool r = false;
  for (int l = 0; l < e.width; ++l) r = r || e.get(l);
  return r;
}
template <class T>
T simd_shuffle(T x, ushort lane) { return emu::exchange(x).get(lane); }
template <class T>
T simd_broadcast(T x, ushort lane) { return emu::exchange(x).get(lane); }
template <class T>
T simd_broadcast_first(T x) { return emu::exchange(x).get(0); }
template <class T>
T simd_shuffle_xor(T x, ushort mask) {
  auto e = emu::exchange(x);
  return e.get(e.lane ^ int(mask));
}
template <class T>
T simd_shuffle_down(T x, ushort delta) {
  auto e = emu::exchange(x);
  return e.lane + int(delta) < e.width ? e.get(e.lane + int(delta)) : x;
}
template <class T>
T simd_shuffle_up(T x, ushort delta) {
  auto e = emu::exchange(x);
  return e.lane >= int(delta) ? e.get(e.lane - int(delta)) : x;
}
}  // namespace metal

using namespace metal;

// Address-space qualifiers. `threadgroup` variables are shared by the threads of a threadgroup:
// here one static object per declaration (threadgroups run one at a time), in section emu_tg.
#define device
#define constant
#define thread
#define threadgroup static __attribute__((section("emu_tg")))
