// The SIMT execution model: every thread of a block is a fiber on a stack of its own; a block
// runs on one OS thread, fiber after fiber, each until it reaches a block barrier, a warp
// collective or its end. A barrier completes when every thread of the block waits at it; a warp
// collective when every lane its mask names waits at one with the same mask. Whatever can never
// complete (a lane of the mask that exited, threads at different barriers, a deadlock) is a
// synccheck finding, never a hang. Blocks run one after another, or over RK_EMU_WORKERS threads.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "../include/rk_emu.h"
#include "emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace rk_emu {

// ---- kernels --------------------------------------------------------------------------------
namespace {
std::mutex& kernels_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_map<std::string, const KernelInfo*>& kernels() {
  static std::unordered_map<std::string, const KernelInfo*> k;
  return k;
}
}  // namespace

const KernelInfo* find_kernel(const char* name) {
  std::lock_guard<std::mutex> lock(kernels_mutex());
  auto it = kernels().find(name);
  return it == kernels().end() ? nullptr : it->second;
}

std::vector<const KernelInfo*> all_kernels() {
  std::lock_guard<std::mutex> lock(kernels_mutex());
  std::vector<const KernelInfo*> out;
  for (auto& [name, k] : kernels()) out.push_back(k);
  std::sort(out.begin(), out.end(), [](auto* a, auto* b) { return std::strcmp(a->name, b->name) < 0; });
  return out;
}

}  // namespace rk_emu

extern "C" void rk_emu_register_kernel(const rk_emu::KernelInfo* info) {
  std::lock_guard<std::mutex> lock(rk_emu::kernels_mutex());
  if (!rk_emu::kernels().emplace(info->name, info).second) {
    std::fprintf(stderr, "rk-emu: kernel %s is defined twice (%s)\n", info->name, info->file);
    std::abort();
  }
}

namespace rk_emu {

// ---- context switch -------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void rk_emu_switch(void** from, void* to);
extern "C" void rk_emu_fiber_start();

static void switch_to(void** from, void* to) { rk_emu_switch(from, to); }

// A stack that starts `entry(arg)` when switched to.
static void* make_stack(char* top, void (*entry)(Fiber*), Fiber* arg) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15}) - 8;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;                                          // r15
  sp[2] = 0;                                          // r14
  sp[3] = reinterpret_cast<uint64_t>(entry);          // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);            // r12
  sp[5] = 0;                                          // rbx
  sp[6] = 0;                                          // rbp
  sp[7] = reinterpret_cast<uint64_t>(&rk_emu_fiber_start);
  return sp;
}
#else
// Portable fallback: ucontext (slower: a signal-mask system call per switch).
struct UContextFiber {
  ucontext_t ctx;
};
static void switch_to(void** from, void* to) {
  thread_local UContextFiber scheduler;
  auto* f = static_cast<UContextFiber*>(*from ? *from : (*from = &scheduler));
  swapcontext(&f->ctx, &static_cast<UContextFiber*>(to)->ctx);
}
static void* make_stack(char* top, void (*entry)(Fiber*), Fiber* arg) {
  auto* u = reinterpret_cast<UContextFiber*>((reinterpret_cast<uintptr_t>(top) - sizeof(UContextFiber)) & ~uintptr_t{63});
  getcontext(&u->ctx);
  u->ctx.uc_stack.ss_sp = arg->stack_lo;
  u->ctx.uc_stack.ss_size = reinterpret_cast<char*>(u) - arg->stack_lo;
  u->ctx.uc_link = nullptr;
  makecontext(&u->ctx, reinterpret_cast<void (*)()>(entry), 1, arg);
  return u;
}
#endif

// ---- workers --------------------------------------------------------------------------------
namespace {
thread_local Worker* tls_worker = nullptr;

// Owns this OS thread's worker and releases its stacks when the thread ends (the helper threads
// of RK_EMU_WORKERS end with their launch).
struct WorkerOwner {
  ~WorkerOwner() {
    if (tls_worker == nullptr) return;
    if (tls_worker->stacks != nullptr) munmap(tls_worker->stacks, tls_worker->stack_slots * tls_worker->stack_stride);
    delete tls_worker;
    tls_worker = nullptr;
  }
};
thread_local WorkerOwner owner;
}  // namespace

Worker& worker() {
  if (tls_worker == nullptr) {
    tls_worker = new Worker();
    (void)&owner;  // registers the owner's destructor for this thread
  }
  return *tls_worker;
}

Worker* current_worker() {
  Worker* w = tls_worker;
  return (w != nullptr && w->in_kernel) ? w : nullptr;
}

void yield(Worker& w) {
  Fiber* f = w.current;
  switch_to(&f->sp, w.scheduler_sp);
}

[[noreturn]] void abort_fiber(int cuda_error) {
  Worker& w = worker();
  w.fatal = true;
  if (w.fatal_error == 0) w.fatal_error = cuda_error;
  yield(w);
  std::abort();  // an aborted fiber is never resumed
}

static void fiber_main(Fiber* f) {
  Worker& w = worker();
  w.kernel->thunk(w.params);
  f->state = Fiber::State::Done;
  yield(w);
  std::abort();
}

static void ensure_stacks(Worker& w, uint32_t threads) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t stride = ((config().stack_bytes + page - 1) / page + 1) * page;  // + a guard page
  if (w.stack_slots >= threads && w.stack_stride == stride) return;
  if (w.stacks != nullptr) munmap(w.stacks, w.stack_slots * w.stack_stride);
  // Room for this block size, rounded up to a power of two (at most 1024 threads a block).
  std::size_t slots = 32;
  while (slots < threads) slots *= 2;
  void* m = mmap(nullptr, slots * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("rk-emu: mapping the fiber stacks");
    std::abort();
  }
  w.stacks = static_cast<char*>(m);
  w.stack_slots = slots;
  w.stack_stride = stride;
  for (std::size_t i = 0; i < slots; ++i) mprotect(w.stacks + i * stride, page, PROT_NONE);  // overflow guard
}

// ---- the scheduler ------------------------------------------------------------------------------
namespace {

const char* collective_name(int kind) {
  switch (kind) {
    case 0: return "__shfl_sync";
    case 1: return "__shfl_up_sync";
    case 2: return "__shfl_down_sync";
    case 3: return "__shfl_xor_sync";
    case 10: return "__ballot_sync";
    case 11: return "__any_sync";
    case 12: return "__all_sync";
    default: return "__syncwarp";
  }
}

const char* barrier_name(int kind) {
  switch (kind) {
    case 1: return "__syncthreads_or";
    case 2: return "__syncthreads_and";
    case 3: return "__syncthreads_count";
    default: return "__syncthreads";
  }
}

std::string where(const Fiber& f) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u)", f.x, f.y, f.z);
  return buf;
}

std::string site_of(const Fiber& f) {
  const std::string line = source_line(f.site);
  return line.empty() ? std::string() : " at " + line;
}

// Synccheck finding while the scheduler (not a fiber) runs: stops the block.
void sync_error(Worker& w, const std::string& message) {
  if (config().synccheck) {
    report(Checker::Synccheck, nullptr, message);
  } else {
    report(Checker::Launch, nullptr, message + " (the block cannot go on)");
  }
  w.fatal = true;
  if (w.fatal_error == 0) w.fatal_error = 719;  // CUDA_ERROR_LAUNCH_FAILED
}

uint32_t lane_count(const Worker& w, uint32_t warp) { return std::min<uint32_t>(kWarp, w.threads - warp * kWarp); }

std::string mask_hex(unsigned mask) {
  char hex[16];
  std::snprintf(hex, sizeof hex, "0x%08x", mask);
  return hex;
}

// Lane `l` of `warp` has just arrived at a warp collective (w.waiting has its bit): completes
// the collective when every lane of its mask waits at one.
void arrive_at_warp(Worker& w, uint32_t warp, uint32_t l) {
  const uint32_t base = warp * kWarp, lanes = lane_count(w, warp);
  const uint32_t exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  Fiber& lead = w.fibers[base + l];
  const unsigned mask = lead.mask;
  const char* op = collective_name(lead.coll_kind);
  if ((mask & (1u << l)) == 0) {
    return sync_error(w, std::string(op) + " in " + where(lead) + site_of(lead) + ": its mask " + mask_hex(mask) +
                             " does not name the calling lane " + std::to_string(l));
  }
  if ((mask & ~exists) != 0) {
    return sync_error(w, std::string(op) + " in " + where(lead) + site_of(lead) + ": mask " + mask_hex(mask) +
                             " names lanes that do not exist (this warp has " + std::to_string(lanes) + " threads)");
  }
  if (const uint32_t gone = mask & w.warp_done[warp]; gone != 0) {
    return sync_error(w, std::string(op) + " in " + where(lead) + site_of(lead) + ": lane " +
                             std::to_string(__builtin_ctz(gone)) + ", named in its mask " + mask_hex(mask) +
                             ", has exited and never arrives");
  }
  if ((w.warp_waiting[warp] & mask) != mask) return;  // a lane of the mask is still running
  for (uint32_t k = 0; k < lanes; ++k) {
    if ((mask & (1u << k)) == 0) continue;
    const Fiber& o = w.fibers[base + k];
    if (o.mask != mask || o.coll_kind != lead.coll_kind || o.width != lead.width) {
      return sync_error(w, std::string("lanes of one warp collective disagree: ") + where(lead) + " calls " + op +
                               " with mask " + mask_hex(mask) + site_of(lead) + ", " + where(o) + " calls " +
                               collective_name(o.coll_kind) + " with mask " + mask_hex(o.mask) + site_of(o));
    }
  }
  // Every lane of the mask is here: exchange.
  unsigned ballot = 0;
  if (lead.coll_kind >= 10)
    for (uint32_t k = 0; k < lanes; ++k)
      if ((mask & (1u << k)) && w.fibers[base + k].value) ballot |= 1u << k;
  for (uint32_t k = 0; k < lanes; ++k) {
    if ((mask & (1u << k)) == 0) continue;
    Fiber& f = w.fibers[base + k];
    if (f.coll_kind < 10) {
      const int width = f.width, lane = static_cast<int>(k);
      const int seg = lane & ~(width - 1);
      int src = lane;
      switch (f.coll_kind) {
        case 0: src = seg + (f.arg & (width - 1)); break;
        case 1: src = lane - f.arg < seg ? lane : lane - f.arg; break;
        case 2: src = lane + f.arg >= seg + width ? lane : lane + f.arg; break;
        default: {
          const int x = lane ^ f.arg;
          src = (x >= seg && x < seg + width) ? x : lane;
        }
      }
      if (src != lane && (src < 0 || src >= static_cast<int>(lanes) || (mask & (1u << src)) == 0)) {
        return sync_error(w, std::string(op) + " in " + where(f) + site_of(f) + " reads lane " + std::to_string(src) +
                                 ", which is not in its mask " + mask_hex(mask) + " (the value would be undefined)");
      }
      f.result = w.fibers[base + src].value;
    } else if (f.coll_kind == 10) {
      f.result = ballot;
    } else if (f.coll_kind == 11) {
      f.result = ballot != 0;
    } else if (f.coll_kind == 12) {
      f.result = ballot == mask;
    } else {
      f.result = 0;
    }
    f.state = Fiber::State::Ready;
  }
  w.warp_waiting[warp] &= ~mask;
  if (w.trace) flush_warp_log(w, warp, mask);
}

// Lane `l` of `warp` has exited: lanes waiting for it at a collective can never go on.
void exit_lane(Worker& w, uint32_t warp, uint32_t l) {
  w.warp_done[warp] |= 1u << l;
  for (uint32_t waiting = w.warp_waiting[warp]; waiting != 0; waiting &= waiting - 1) {
    const Fiber& f = w.fibers[warp * kWarp + __builtin_ctz(waiting)];
    if (f.mask & (1u << l)) {
      return sync_error(w, std::string(collective_name(f.coll_kind)) + " in " + where(f) + site_of(f) + ": lane " +
                               std::to_string(l) + ", named in its mask " + mask_hex(f.mask) +
                               ", has exited and never arrives");
    }
  }
}

// Releases the block barrier when every live thread waits at the same one.
bool try_release_barrier(Worker& w) {
  const Fiber* first = nullptr;
  uint32_t exited = 0;
  for (const Fiber& f : w.fibers) {
    if (f.state == Fiber::State::Done) {
      ++exited;
      continue;
    }
    if (f.state != Fiber::State::Barrier) return false;
    if (first == nullptr) first = &f;
  }
  if (first == nullptr) return false;
  for (const Fiber& f : w.fibers) {
    if (f.state != Fiber::State::Barrier) continue;
    if (f.bar_kind != first->bar_kind || !same_source(f.site, first->site)) {
      sync_error(w, std::string("threads of one block wait at different barriers: ") + where(*first) + " at " +
                        barrier_name(first->bar_kind) + site_of(*first) + ", " + where(f) + " at " +
                        barrier_name(f.bar_kind) + site_of(f));
      return false;
    }
  }
  if (exited > 0) {
    const Fiber* gone = nullptr;
    for (const Fiber& f : w.fibers)
      if (f.state == Fiber::State::Done && gone == nullptr) gone = &f;
    sync_error(w, std::string(barrier_name(first->bar_kind)) + site_of(*first) + " is never reached by " +
                      std::to_string(exited) + " thread(s) of the block that have exited (first: " + where(*gone) +
                      "); a barrier must be reached by every thread of the block");
    return false;
  }
  int any = 0, all = 1, count = 0;
  for (const Fiber& f : w.fibers) {
    any |= f.bar_pred;
    all &= f.bar_pred;
    count += f.bar_pred;
  }
  const int result = first->bar_kind == 1 ? any : first->bar_kind == 2 ? all : first->bar_kind == 3 ? count : 0;
  for (Fiber& f : w.fibers) {
    f.result = static_cast<unsigned long long>(result);
    f.state = Fiber::State::Ready;
  }
  ++w.epoch;
  if (w.trace)
    for (uint32_t warp = 0; warp * kWarp < w.threads; ++warp) flush_warp_log(w, warp, 0xffffffffu);
  return true;
}

// Nothing can move: say who waits for what, grouping the threads that wait at the same place.
void report_deadlock(Worker& w) {
  struct Group {
    std::string what;
    std::vector<uint32_t> tids;
  };
  std::vector<Group> groups;
  for (const Fiber& f : w.fibers) {
    if (f.state == Fiber::State::Done) continue;
    const std::string what = f.state == Fiber::State::Warp
                                 ? std::string(collective_name(f.coll_kind)) + " (mask " + mask_hex(f.mask) + ")" + site_of(f)
                                 : std::string(barrier_name(f.bar_kind)) + site_of(f);
    auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& x) { return x.what == what; });
    if (g == groups.end()) groups.push_back({what, {f.tid}});
    else g->tids.push_back(f.tid);
  }
  std::string msg = "deadlock: no thread of the block can go on;";
  for (const Group& g : groups) {
    std::string ids;
    for (std::size_t i = 0; i < g.tids.size(); ++i) {
      std::size_t j = i;
      while (j + 1 < g.tids.size() && g.tids[j + 1] == g.tids[j] + 1) ++j;
      ids += (ids.empty() ? "" : ",") + std::to_string(g.tids[i]) + (j > i ? "-" + std::to_string(g.tids[j]) : "");
      i = j;
    }
    msg += " threads " + ids + " wait at " + g.what + ";";
  }
  sync_error(w, msg);
}

uint64_t splitmix(uint64_t& s) {
  s += 0x9e3779b97f4a7c15ull;
  uint64_t z = s;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void run_block(Worker& w, uint64_t linear_block) {
  const uint32_t n = w.threads;
  w.fibers.resize(n);
  for (uint32_t t = 0; t < n; ++t) {
    Fiber& f = w.fibers[t];
    f.tid = t;
    f.x = t % w.block[0];
    f.y = (t / w.block[0]) % w.block[1];
    f.z = t / (w.block[0] * w.block[1]);
    f.state = Fiber::State::Ready;
    f.stack_lo = w.stacks + t * w.stack_stride;
    f.stack_size = w.stack_stride;
    f.sp = make_stack(f.stack_lo + w.stack_stride, &fiber_main, &f);
    f.log.clear();
  }
  w.block_epoch = ++w.epoch;
  w.warp_waiting.assign((n + kWarp - 1) / kWarp, 0);
  w.warp_done.assign((n + kWarp - 1) / kWarp, 0);
  std::vector<uint32_t> order(n);
  for (uint32_t t = 0; t < n; ++t) order[t] = t;
  uint64_t rng = config().seed ^ (linear_block * 0x2545f4914f6cdd1dull);
  for (;;) {
    if (config().shuffle)
      for (uint32_t i = n; i > 1; --i) std::swap(order[i - 1], order[splitmix(rng) % i]);
    for (uint32_t t : order) {
      Fiber& f = w.fibers[t];
      if (f.state != Fiber::State::Ready) continue;
      w.current = &f;
      switch_to(&w.scheduler_sp, f.sp);
      w.current = nullptr;
      if (w.fatal) return;
      if (f.state == Fiber::State::Warp) {
        w.warp_waiting[t / kWarp] |= 1u << (t % kWarp);
        arrive_at_warp(w, t / kWarp, t % kWarp);
      } else if (f.state == Fiber::State::Done) {
        exit_lane(w, t / kWarp, t % kWarp);
      }
      if (w.fatal) return;
    }
    bool ready = false, done = true;
    for (const Fiber& f : w.fibers) {
      ready |= f.state == Fiber::State::Ready;
      done &= f.state == Fiber::State::Done;
    }
    if (done) break;
    if (ready) continue;
    if (try_release_barrier(w)) continue;
    if (w.fatal) return;
    report_deadlock(w);
    return;
  }
  if (w.trace)
    for (uint32_t warp = 0; warp * kWarp < n; ++warp) flush_warp_log(w, warp, 0xffffffffu);
}

}  // namespace

// ---- launches -------------------------------------------------------------------------------
namespace {

struct Grid {
  const KernelInfo* kernel;
  void* const* params;
  dim3 grid, block;
  uint64_t blocks;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::atomic<int> error{0};
  std::atomic<std::size_t> findings{0};
  uint32_t launch_id = 0;
  std::mutex traffic_mutex;
  Traffic traffic;
};

void run_blocks(Grid& g) {
  Worker& w = worker();
  setup_shared_region(w);
  ensure_stacks(w, g.block.x * g.block.y * g.block.z);
  w.kernel = g.kernel;
  w.params = g.params;
  w.grid[0] = g.grid.x, w.grid[1] = g.grid.y, w.grid[2] = g.grid.z;
  w.block[0] = g.block.x, w.block[1] = g.block.y, w.block[2] = g.block.z;
  w.threads = g.block.x * g.block.y * g.block.z;
  w.fatal = false;
  w.fatal_error = 0;
  w.findings = 0;
  std::fill(std::begin(w.printed), std::end(w.printed), 0u);
  w.traffic = Traffic{};
  w.trace = !config().traffic_path.empty();
  w.launch_id = g.launch_id;
  w.in_kernel = true;
  while (!g.stop.load(std::memory_order_relaxed)) {
    const uint64_t b = g.next.fetch_add(1);
    if (b >= g.blocks) break;
    w.block_idx[0] = static_cast<uint32_t>(b % g.grid.x);
    w.block_idx[1] = static_cast<uint32_t>((b / g.grid.x) % g.grid.y);
    w.block_idx[2] = static_cast<uint32_t>(b / (static_cast<uint64_t>(g.grid.x) * g.grid.y));
    run_block(w, b);
    if (w.fatal) {
      int expected = 0;
      g.error.compare_exchange_strong(expected, w.fatal_error);
      g.stop = true;
    }
  }
  w.in_kernel = false;
  g.findings += w.findings;
  std::lock_guard<std::mutex> lock(g.traffic_mutex);
  g.traffic.read_bytes += w.traffic.read_bytes;
  g.traffic.write_bytes += w.traffic.write_bytes;
  g.traffic.sectors += w.traffic.sectors;
  g.traffic.ideal_sectors += w.traffic.ideal_sectors;
  g.traffic.dram_sectors += w.traffic.dram_sectors;
  g.traffic.instruction_bytes += w.traffic.instruction_bytes;
}

void append_line(const std::string& path, const std::string& line) {
  if (path.empty()) return;
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  if (FILE* f = std::fopen(path.c_str(), "a")) {
    std::fputs(line.c_str(), f);
    std::fclose(f);
  }
}

}  // namespace

LaunchResult launch(const KernelInfo* k, dim3 grid, dim3 block, std::size_t /*dynamic_shared*/, void* const* params) {
  // The parameters are copied: the caller's array may be reused as soon as the launch returns.
  std::vector<std::size_t> offsets(k->param_count);
  std::size_t bytes = 0;
  for (int i = 0; i < k->param_count; ++i) {
    bytes = (bytes + k->param_aligns[i] - 1) / k->param_aligns[i] * k->param_aligns[i];
    offsets[i] = bytes;
    bytes += k->param_sizes[i];
  }
  std::vector<std::max_align_t> storage(bytes / sizeof(std::max_align_t) + 1);
  auto* base = reinterpret_cast<char*>(storage.data());
  std::vector<void*> copies(k->param_count + 1);
  for (int i = 0; i < k->param_count; ++i) {
    std::memcpy(base + offsets[i], params[i], k->param_sizes[i]);
    copies[i] = base + offsets[i];
  }

  static std::mutex logged_mutex;
  static std::unordered_map<std::string, bool> logged;
  if (!config().kernel_log_path.empty()) {
    std::lock_guard<std::mutex> lock(logged_mutex);
    if (!logged[k->name]) {
      logged[k->name] = true;
      append_line(config().kernel_log_path, std::string(k->name) + "\n");
    }
  }

  Grid g;
  g.kernel = k;
  g.params = copies.data();
  g.grid = grid;
  g.block = block;
  g.blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  static std::atomic<uint32_t> launches{0};
  g.launch_id = ++launches;
  const int helpers = static_cast<int>(std::min<uint64_t>(config().workers, g.blocks)) - 1;
  std::vector<std::thread> threads;
  for (int i = 0; i < helpers; ++i) threads.emplace_back([&g] { run_blocks(g); });
  run_blocks(g);
  for (auto& t : threads) t.join();

  if (!config().traffic_path.empty()) {
    char line[512];
    std::snprintf(line, sizeof line,
                  "launch %s grid=%u,%u,%u block=%u,%u,%u read=%llu write=%llu instruction=%llu distinct=%llu "
                  "sectors=%llu ideal=%llu\n",
                  k->name, grid.x, grid.y, grid.z, block.x, block.y, block.z,
                  static_cast<unsigned long long>(g.traffic.read_bytes),
                  static_cast<unsigned long long>(g.traffic.write_bytes),
                  static_cast<unsigned long long>(g.traffic.instruction_bytes),
                  static_cast<unsigned long long>(g.traffic.dram_sectors * 32),
                  static_cast<unsigned long long>(g.traffic.sectors),
                  static_cast<unsigned long long>(g.traffic.ideal_sectors));
    append_line(config().traffic_path, line);
  }
  LaunchResult r;
  r.findings = g.findings;
  r.error = g.error;
  if (r.error == 0 && r.findings > 0) r.error = 719;  // hazards fail the launch: the suite must run clean
  return r;
}

}  // namespace rk_emu
