// SIMT emulation harness: builds CUDA kernel sources with the host C++ compiler and runs
// them on the CPU, for tests.
//
// What it provides:
//   * threadIdx, blockIdx, blockDim, gridDim (x, y, z);
//   * __global__, __device__, __forceinline__, __launch_bounds__ (no-ops), __shared__ (one
//     copy per OS thread, so shared by every thread of the block being run);
//   * __syncthreads() with real barrier semantics: every thread of the block runs as a
//     fiber with its own stack, and a thread that reaches the barrier waits until
//     all live threads of the block have reached it (threads that returned do not count);
//   * warp shuffles (__shfl_sync, __shfl_xor_sync, __shfl_down_sync, __shfl_up_sync) and
//     votes (__ballot_sync, __any_sync, __all_sync): the live lanes of the warp exchange
//     values at a warp barrier, so every live lane of the warp must make the call;
//   * atomics (atomicAdd, atomicMax, atomicMin, atomicExch, atomicCAS): a grid runs on one
//     OS thread and fibers switch only at barriers, so they are plain read-modify-writes;
//   * __half and __nv_bfloat16 as 16-bit storage types with round-to-nearest-even conversions;
//   * the math intrinsics the kernels use (expf, __expf, rsqrtf, fmaxf, sincosf, ...).
//
// How it runs a launch: simt::launch(grid, block, body) runs the thread blocks one after
// another on the calling OS thread; within a block, fibers run in rounds, each until it
// waits at a barrier or returns, in a pseudo-random order that changes every round (seeded by
// PAGEMESH_SIMT_SEED, fixed by default). Several OS threads may run launches at once (all state is
// thread-local). Each thread has a 128 KiB stack. The lane masks of the *_sync calls are not checked: the kernels call them
// with every lane of the warp.
//
// Kernels that need something missing here extend this header.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace simt {

constexpr int kWarpSize = 32;
constexpr size_t kStackSize = 128 * 1024;

// A saved execution context. On x86-64 a context switch is a few instructions (callee-saved
// registers and the stack pointer); elsewhere it falls back to ucontext, which also saves the
// signal mask through a system call on every switch.
#if defined(__x86_64__) && defined(__ELF__)
#define PM_SIMT_FAST_SWITCH 1
struct Context {
  void* sp;
};
extern "C" void pm_simt_switch(void** save_sp, void* load_sp);
// Saves callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp (rdi), switches to load_sp (rsi) and restores the same from there.
asm(R"(
  .text
  .weak pm_simt_switch
  .type pm_simt_switch, @function
pm_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pm_simt_switch, .-pm_simt_switch
)");
inline void switch_context(Context* from, Context* to) { pm_simt_switch(&from->sp, to->sp); }
// Lays out a stack that pm_simt_switch "returns" into `entry` from.
inline void make_context(Context* c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                     // entry's return address (never used)
  *--sp = reinterpret_cast<uint64_t>(entry);     // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = 0;         // rbp, rbx, r12-r15
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  c->sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
__attribute__((noinline)) inline void make_context(Context* c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  uint3 tid;
  bool done;
};

struct BlockState {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  int current = 0;
  int live = 0;
  unsigned bar_gen = 0;
  int bar_arrived = 0;
  std::vector<unsigned> warp_gen;
  std::vector<int> warp_arrived, warp_live;
  std::vector<uint64_t> exchange;  // [warp][lane]
  Context scheduler;
  void (*invoke)(void*) = nullptr;
  void* body = nullptr;
};

inline thread_local BlockState* tls_block = nullptr;
inline thread_local std::vector<char>* tls_stacks = nullptr;

inline BlockState& block() { return *tls_block; }
inline Fiber& self() { return tls_block->fibers[tls_block->current]; }
inline int linear_tid() {
  const Fiber& f = self();
  const dim3& b = tls_block->block;
  return static_cast<int>((f.tid.z * b.y + f.tid.y) * b.x + f.tid.x);
}

// Hands control back to the scheduler; the fiber resumes on its next turn.
inline void yield() {
  BlockState& b = block();
  switch_context(&b.fibers[b.current].ctx, &b.scheduler);
}

// Waits until every live thread of the block has arrived.
inline void block_barrier() {
  BlockState& b = block();
  const unsigned gen = b.bar_gen;
  if (++b.bar_arrived == b.live) {
    b.bar_arrived = 0;
    ++b.bar_gen;
    return;
  }
  while (b.bar_gen == gen) yield();
}

// Waits until every live lane of warp `w` has arrived.
inline void warp_barrier(int w) {
  BlockState& b = block();
  const unsigned gen = b.warp_gen[w];
  if (++b.warp_arrived[w] == b.warp_live[w]) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
    return;
  }
  while (b.warp_gen[w] == gen) yield();
}

// Every live lane of the warp publishes `bits`; returns what lane `src` published.
inline uint64_t exchange(uint64_t bits, int src) {
  BlockState& b = block();
  const int t = linear_tid();
  const int w = t / kWarpSize;
  const int lane = t % kWarpSize;
  b.exchange[w * kWarpSize + lane] = bits;
  warp_barrier(w);
  const uint64_t got = b.exchange[w * kWarpSize + src];
  warp_barrier(w);
  return got;
}

// Every live lane of the warp publishes a predicate; returns the ballot of the live lanes.
inline unsigned ballot(bool pred) {
  BlockState& b = block();
  const int t = linear_tid();
  const int w = t / kWarpSize;
  const int lane = t % kWarpSize;
  b.exchange[w * kWarpSize + lane] = pred ? 1 : 0;
  warp_barrier(w);
  unsigned mask = 0;
  const int lanes = std::min(kWarpSize, static_cast<int>(b.fibers.size()) - w * kWarpSize);
  for (int l = 0; l < lanes; ++l) {
    if (!b.fibers[w * kWarpSize + l].done && b.exchange[w * kWarpSize + l]) mask |= 1u << l;
  }
  warp_barrier(w);
  return mask;
}

// A thread returned: it no longer counts at barriers, which may release the others.
inline void retire() {
  BlockState& b = block();
  Fiber& f = self();
  f.done = true;
  const int w = linear_tid() / kWarpSize;
  --b.live;
  --b.warp_live[w];
  if (b.bar_arrived > 0 && b.bar_arrived == b.live) {
    b.bar_arrived = 0;
    ++b.bar_gen;
  }
  if (b.warp_arrived[w] > 0 && b.warp_arrived[w] == b.warp_live[w]) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
  }
}

// Where every fiber starts: runs the kernel, then hands back to the scheduler for good.
inline void trampoline() {
  BlockState& b = block();
  b.invoke(b.body);
  retire();
  switch_context(&b.fibers[b.current].ctx, &b.scheduler);
}

// Seed of the thread schedule: PAGEMESH_SIMT_SEED, else a fixed one (runs are repeatable).
inline uint64_t schedule_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("PAGEMESH_SIMT_SEED");
    return env != nullptr ? std::strtoull(env, nullptr, 10) : 0x5eed5eedull;
  }();
  return seed;
}

inline uint64_t next_random(uint64_t& state) {  // xorshift64*
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545f4914f6cdd1dull;
}

// Runs `body` as a grid of `grid` thread blocks of `threads` threads each.
template <class F>
void launch(dim3 grid, dim3 threads, F&& body) {
  const int n = static_cast<int>(threads.x * threads.y * threads.z);
  if (n <= 0 || n > 1024) {
    std::fprintf(stderr, "simt: block of %d threads\n", n);
    std::abort();
  }
  if (tls_stacks == nullptr) tls_stacks = new std::vector<char>();
  if (tls_stacks->size() < n * kStackSize) tls_stacks->resize(n * kStackSize);
  const int warps = (n + kWarpSize - 1) / kWarpSize;
  BlockState state;
  state.grid = grid;
  state.block = threads;
  state.fibers.resize(n);
  state.warp_gen.assign(warps, 0);
  state.exchange.assign(warps * kWarpSize, 0);
  state.invoke = [](void* p) { (*static_cast<F*>(p))(); };
  state.body = static_cast<void*>(&body);
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = t;
  BlockState* outer = tls_block;
  tls_block = &state;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        state.block_idx = uint3(bx, by, bz);
        state.live = n;
        state.bar_arrived = 0;
        state.warp_arrived.assign(warps, 0);
        state.warp_live.assign(warps, 0);
        for (int t = 0; t < n; ++t) {
          Fiber& f = state.fibers[t];
          f.tid = uint3(t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y));
          f.done = false;
          ++state.warp_live[t / kWarpSize];
          make_context(&f.ctx, tls_stacks->data() + t * kStackSize, kStackSize, trampoline);
        }
        // Each round resumes the live threads in a fresh pseudo-random order, so that a kernel
        // that leans on an order the hardware does not promise (a missing barrier) is likely
        // to read stale data here too.
        uint64_t rng = schedule_seed() ^ (0x9e3779b97f4a7c15ull * (1 + bx + grid.x * (by + grid.y * bz)));
        for (bool any = true; any;) {
          any = false;
          for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random(rng) % (i + 1)]);
          for (int t : order) {
            if (state.fibers[t].done) continue;
            any = true;
            state.current = t;
            switch_context(&state.scheduler, &state.fibers[t].ctx);
          }
        }
      }
  tls_block = outer;
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffled values fit 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

inline int lane_id() { return linear_tid() % kWarpSize; }

}  // namespace simt

#define threadIdx (::simt::self().tid)
#define blockIdx (::simt::block().block_idx)
#define blockDim (::simt::block().block)
#define gridDim (::simt::block().grid)
#define warpSize 32

inline void __syncthreads() { simt::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::warp_barrier(simt::linear_tid() / simt::kWarpSize); }

template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = simt::lane_id();
  const int from = (lane / width) * width + (src % width);
  return simt::from_bits<T>(simt::exchange(simt::to_bits(v), from));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = simt::lane_id();
  int from = lane ^ mask;
  if (from / width != lane / width) from = lane;
  return simt::from_bits<T>(simt::exchange(simt::to_bits(v), from));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  int from = lane + static_cast<int>(delta);
  if (from / width != lane / width) from = lane;
  return simt::from_bits<T>(simt::exchange(simt::to_bits(v), from));
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  int from = lane - static_cast<int>(delta);
  if (from < 0 || from / width != lane / width) from = lane;
  return simt::from_bits<T>(simt::exchange(simt::to_bits(v), from));
}
inline unsigned __ballot_sync(unsigned, int pred) { return simt::ballot(pred != 0); }
inline int __any_sync(unsigned, int pred) { return simt::ballot(pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const unsigned live = simt::ballot(true);
  return (simt::ballot(pred != 0) & live & mask) == (live & mask);
}

template <class T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  *p = std::max(old, v);
  return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
  T old = *p;
  *p = std::min(old, v);
  return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <class T>
inline T atomicCAS(T* p, T compare, T v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline void sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __int_as_float(int i) { return simt::from_bits<float>(static_cast<uint32_t>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(simt::to_bits(f)); }
using std::max;
using std::min;

// 16-bit float storage types, converted with round-to-nearest-even like the CUDA intrinsics.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    out = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  return simt::from_bits<float>(out);
}

inline __half __float2half(float f) {
  const uint32_t x = static_cast<uint32_t>(simt::to_bits(f));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0))};
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (ax < 0x38800000u) {                                                 // subnormal or zero
    const float a = simt::from_bits<float>(ax);
    const float scaled = a * 16777216.0f;  // units of 2^-24
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
    return {static_cast<uint16_t>(sign | m)};
  }
  uint32_t v = ax - 0x38000000u;  // rebias 127 -> 15
  const uint32_t rest = v & 0x1fffu;
  v >>= 13;
  if (rest > 0x1000u || (rest == 0x1000u && (v & 1u))) ++v;
  return {static_cast<uint16_t>(sign | v)};
}

inline float __bfloat162float(__nv_bfloat16 h) { return simt::from_bits<float>(static_cast<uint32_t>(h.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t x = static_cast<uint32_t>(simt::to_bits(f));
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return {static_cast<uint16_t>(rounded >> 16)};
}
