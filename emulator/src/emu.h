// Internal interfaces of the emulated device: configuration, findings, device memory, the SIMT
// runtime and the per-OS-thread worker that runs blocks. See docs/emulator.md for the design.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "registry.h"

struct uint3;
struct dim3;

namespace rk_emu {

// ---- configuration (environment, read once) ------------------------------------------------
struct Config {
  bool memcheck = true, racecheck = true, initcheck = true, synccheck = true;
  bool shuffle = false;  // RK_EMU_SCHEDULE=shuffle:<seed>
  uint64_t seed = 0;
  int workers = 1;              // RK_EMU_WORKERS: OS threads running the blocks of one launch
  std::size_t stack_bytes = 0;  // RK_EMU_STACK_KB
  bool memory_pools = true;     // RK_EMU_MEMORY_POOLS=0 reports no pools (attribute 115)
  std::string report_path, kernel_log_path, traffic_path;
};
const Config& config();

// ---- findings -------------------------------------------------------------------------------
enum class Checker { Memcheck, Racecheck, Initcheck, Synccheck, Undefined, Launch };
const char* checker_name(Checker c);

// Prints one finding (stderr and RK_EMU_REPORT) with the running kernel, block and thread
// prepended, and counts it against the current launch. `pc` (a code address in the kernel, or
// null) is turned into a source line.
void report(Checker c, const void* pc, const std::string& message);
std::string hex(uintptr_t a);  // "0x…", for findings
// file:line (function) of a code address, or "" when unknown.
std::string source_line(const void* pc);
// True when two code addresses are the same source construct (the same inlining chain of
// file:line): a compiler may duplicate one __syncthreads() into several call instructions.
bool same_source(const void* a, const void* b);

// ---- device memory ---------------------------------------------------------------------------
// Every allocation is sized exactly, with guard zones on both sides, and remembered after it is
// freed (a quarantine) so that a late access is reported as a use after free.
void* device_alloc(std::size_t bytes);
bool device_free(void* p);  // false: not a live allocation
// Marks [p, p + n) written by the host side (memcpy / memset), or copies the initialisation of
// `src` (device to device copies).
void mark_initialized(const void* p, std::size_t n);
void copy_initialized(void* dst, const void* src, std::size_t n);
// True when [p, p + n) lies inside one live allocation.
bool device_range_valid(const void* p, std::size_t n);
std::size_t device_bytes_in_use();

// ---- kernels -------------------------------------------------------------------------------
const KernelInfo* find_kernel(const char* name);
std::vector<const KernelInfo*> all_kernels();

struct LaunchResult {
  int error = 0;  // a CUresult
  std::size_t findings = 0;
};

// Runs every block of the grid to the end (or to the first fatal finding) on the calling thread
// (and RK_EMU_WORKERS - 1 helpers).
LaunchResult launch(const KernelInfo* k, dim3 grid, dim3 block, std::size_t dynamic_shared, void* const* params);

// ---- the running fiber, for the checkers ------------------------------------------------------
constexpr int kWarp = 32;

struct Access {
  uintptr_t addr;
  uint32_t size;
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  char* stack_lo = nullptr;
  std::size_t stack_size = 0;
  uint32_t tid = 0;  // linear index in the block
  uint32_t x = 0, y = 0, z = 0;
  enum class State : uint8_t { Ready, Barrier, Warp, Done } state = State::Ready;
  // At a block barrier.
  int bar_kind = 0, bar_pred = 0;
  const void* site = nullptr;
  // At a warp collective: kind (shuffle 0-3, vote 10 + kind), mask, operands and result.
  int coll_kind = 0, arg = 0, width = 32;
  unsigned mask = 0;
  unsigned long long value = 0, result = 0;
  // Global accesses since the warp's last sync point (traffic mode only).
  std::vector<Access> log;
};

struct Traffic {
  uint64_t read_bytes = 0, write_bytes = 0;  // every access of every lane
  // Traffic mode: per warp instruction, the distinct bytes it accesses (a broadcast counts once),
  // the 32-byte sectors it touches and the fewest sectors that could carry those bytes; per
  // launch, the distinct sectors read plus the distinct sectors written.
  uint64_t instruction_bytes = 0, sectors = 0, ideal_sectors = 0, dram_sectors = 0;
};

// One OS thread's state: the block it runs, its fibers and their stacks, and the checkers'
// per-block state. Lives in thread-local storage of the runtime.
struct Worker {
  const KernelInfo* kernel = nullptr;
  void* const* params = nullptr;
  uint32_t grid[3]{}, block[3]{}, block_idx[3]{};
  uint32_t threads = 0;
  std::vector<Fiber> fibers;
  std::vector<uint32_t> warp_waiting, warp_done;  // per warp: lanes at a collective, lanes exited
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  bool in_kernel = false;
  bool fatal = false;  // a fatal finding: the block stops at once
  int fatal_error = 0;
  std::size_t findings = 0;
  uint32_t printed[6]{};  // findings printed this launch, per checker (the rest are counted)
  // Stacks: one mapping, `stack_bytes` (plus a guard page) per fiber.
  char* stacks = nullptr;
  std::size_t stack_slots = 0, stack_stride = 0;
  // Shared memory is this thread's copy of the kernels' `__shared__` variables, which live in
  // the emulator library's TLS block: [tls_lo, tls_lo + tls_size).
  uintptr_t tls_lo = 0;
  std::size_t tls_size = 0;
  // racecheck: epochs advance at every barrier; block_epoch is the first epoch of this block.
  uint32_t epoch = 0, block_epoch = 0;
  struct SharedShadow {
    uint32_t w_epoch, r_epoch;
    uint16_t w_tid, r_tid;
    const void* w_pc;
    const void* r_pc;
  };
  std::vector<SharedShadow> shared_shadow;
  Traffic traffic;
  bool trace = false;  // traffic mode
  uint32_t launch_id = 0;
};

Worker& worker();
Worker* current_worker();  // null outside a kernel
void yield(Worker& w);      // from the running fiber back to the block's scheduler

// Hands control back to the scheduler from a fiber after a fatal finding; never returns.
[[noreturn]] void abort_fiber(int cuda_error);

// The traffic of the warp's lanes `lanes` (a lane mask) since their last sync point.
void flush_warp_log(Worker& w, uint32_t warp, uint32_t lanes);

// The shared-memory region and its shadow for this thread (set up once).
void setup_shared_region(Worker& w);

}  // namespace rk_emu
