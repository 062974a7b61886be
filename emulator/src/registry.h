// The kernel table of the emulated device. Each generated translation unit (scripts/emulator.sh
// writes one per kernels/*.cu) includes the kernel file and then this header, and names every
// `extern "C" __global__` function of it once with RK_EMU_KERNEL. The launcher of each kernel is
// stamped from the kernel's own C signature: it reads parameter i of `kernelParams` as the i-th
// parameter type, so there is no hand-written table of parameter lists.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

namespace rk_emu {

// Calls the kernel with its parameters read from `params` (cuLaunchKernel's kernelParams).
using Thunk = void (*)(void* const* params);

struct KernelInfo {
  const char* name;
  const char* file;
  int max_threads;  // __launch_bounds__, or 1024
  Thunk thunk;
  int param_count;
  const std::size_t* param_sizes;
  const std::size_t* param_aligns;
};

}  // namespace rk_emu

extern "C" void rk_emu_register_kernel(const rk_emu::KernelInfo* info);

namespace rk_emu {

template <auto F>
struct Launcher;

template <typename... A, void (*F)(A...)>
struct Launcher<F> {
  static constexpr std::size_t sizes[] = {sizeof(A)..., 0};
  static constexpr std::size_t aligns[] = {alignof(A)..., 0};

  // Not instrumented: the parameter copies it reads are the launch's, not device memory. The
  // kernel is called through a volatile pointer so that it is never inlined here (its body must
  // keep its instrumentation).
  template <std::size_t... I>
  __attribute__((no_sanitize_thread, no_sanitize_undefined)) static void call(void* const* p,
                                                                              std::index_sequence<I...>) {
    void (*volatile kernel)(A...) = F;
    kernel(*static_cast<std::remove_cvref_t<A>*>(p[I])...);
  }
  __attribute__((no_sanitize_thread, no_sanitize_undefined)) static void thunk(void* const* p) {
    call(p, std::index_sequence_for<A...>{});
  }
};

struct Registrar {
  KernelInfo info;
  Registrar(KernelInfo i) : info(i) { rk_emu_register_kernel(&info); }
};

}  // namespace rk_emu

#define RK_EMU_KERNEL(NAME, FILE, MAX_THREADS)                                                      \
  static rk_emu::Registrar rk_emu_registrar_##NAME(rk_emu::KernelInfo{                              \
      #NAME, FILE, MAX_THREADS, &rk_emu::Launcher<&NAME>::thunk,                                    \
      static_cast<int>(sizeof(rk_emu::Launcher<&NAME>::sizes) / sizeof(std::size_t)) - 1,           \
      rk_emu::Launcher<&NAME>::sizes, rk_emu::Launcher<&NAME>::aligns})
