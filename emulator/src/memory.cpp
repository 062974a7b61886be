// Device memory and the checkers that watch every access the kernels make.
//
// The kernel files are compiled with GCC's -fsanitize=thread instrumentation, which calls
// __tsan_read4(addr), __tsan_write16(addr), __tsan_read_range(addr, n), ... before every load
// and store, and -fsanitize=alignment,bounds,... whose __ubsan_handle_* calls report misaligned
// or null pointers and local array indices out of range. No sanitizer runtime is linked: this
// file defines the __tsan_* entry points (undefined.cpp the __ubsan_* ones) and classifies each
// address:
//   - the running fiber's own stack: local memory, not checked;
//   - this OS thread's TLS block of the emulator library: shared memory (the kernels'
//     `__shared__` variables are thread_local, see rk_emu.h): racecheck and uninitialised reads;
//   - anything else must lie inside a live device allocation: memcheck (out of bounds, use after
//     free, a host pointer), initcheck (a read of bytes nothing wrote), traffic counts.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>

#include "../include/rk_emu.h"
#include "emu.h"

namespace rk_emu {

// ---- allocations ----------------------------------------------------------------------------
namespace {

constexpr std::size_t kGuardBefore = 256;     // allocations are 256-byte aligned, as cuMemAlloc's
constexpr std::size_t kGuardAfter = 512;      // at least, past the exact end
constexpr std::size_t kQuarantine = 1u << 29;  // freed bytes kept mapped to catch late accesses

struct Allocation {
  uintptr_t base = 0;
  std::size_t size = 0;
  char* map = nullptr;
  std::size_t map_size = 0;
  std::atomic<bool> live{true};
  std::unique_ptr<std::atomic<uint8_t>[]> init;  // one bit per byte: written since allocated
  std::atomic<bool> uninit_reported{false};
  // Traffic mode: per 32-byte sector, the last launch that read it and the last that wrote it
  // (2 entries per sector): the distinct sectors a launch reads and writes are the DRAM traffic
  // of a cache that keeps everything the launch touched.
  std::atomic<std::atomic<uint32_t>*> touched{nullptr};

  uintptr_t guard_lo() const { return base - kGuardBefore; }
  uintptr_t guard_hi() const { return reinterpret_cast<uintptr_t>(map) + map_size; }
};

struct Heap {
  std::shared_mutex mu;
  std::map<uintptr_t, Allocation*> by_base;  // live and quarantined
  std::deque<Allocation*> quarantine;
  std::size_t quarantine_bytes = 0, in_use = 0;
  std::atomic<uint64_t> generation{1};  // bumped whenever an Allocation is deleted
};

Heap& heap() {
  static Heap* h = new Heap();  // never destroyed: kernels of other threads may still look
  return *h;
}

thread_local Allocation* cached = nullptr;
thread_local uint64_t cached_generation = 0;

// The allocation whose guarded range holds `a` (its data or a guard zone), or null. Caller holds
// the lock.
Allocation* lookup_locked(Heap& h, uintptr_t a) {
  auto it = h.by_base.upper_bound(a);
  if (it != h.by_base.end() && a >= it->second->guard_lo()) return it->second;
  if (it == h.by_base.begin()) return nullptr;
  --it;
  return a < it->second->guard_hi() ? it->second : nullptr;
}

Allocation* lookup(uintptr_t a, std::size_t n) {
  Heap& h = heap();
  const uint64_t gen = h.generation.load(std::memory_order_acquire);
  Allocation* c = cached;
  if (c != nullptr && cached_generation == gen && a >= c->base && a + n <= c->base + c->size) return c;
  std::shared_lock<std::shared_mutex> lock(h.mu);
  Allocation* found = lookup_locked(h, a);
  if (found != nullptr && a >= found->base && a + n <= found->base + found->size) {
    cached = found;
    cached_generation = gen;
  }
  return found;
}

void set_bits(Allocation& al, std::size_t off, std::size_t n) {
  std::size_t i = off, end = off + n;
  for (; i < end && (i & 7); ++i) al.init[i >> 3].fetch_or(uint8_t(1u << (i & 7)), std::memory_order_relaxed);
  for (; i + 8 <= end; i += 8) al.init[i >> 3].store(0xff, std::memory_order_relaxed);
  for (; i < end; ++i) al.init[i >> 3].fetch_or(uint8_t(1u << (i & 7)), std::memory_order_relaxed);
}

bool bit(const Allocation& al, std::size_t i) { return (al.init[i >> 3].load(std::memory_order_relaxed) >> (i & 7)) & 1u; }

// First byte of [off, off + n) not written, or n.
std::size_t first_unset(const Allocation& al, std::size_t off, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!bit(al, off + i)) return i;
  return n;
}

}  // namespace

void* device_alloc(std::size_t bytes) {
  const std::size_t page = 4096;
  const std::size_t map_size = (kGuardBefore + bytes + kGuardAfter + page - 1) / page * page;
  void* m = mmap(nullptr, map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  auto* al = new Allocation();
  al->map = static_cast<char*>(m);
  al->map_size = map_size;
  al->base = reinterpret_cast<uintptr_t>(m) + kGuardBefore;
  al->size = bytes;
  al->init.reset(new std::atomic<uint8_t>[(bytes + 7) / 8 + 1]());
  Heap& h = heap();
  std::unique_lock<std::shared_mutex> lock(h.mu);
  h.by_base[al->base] = al;
  h.in_use += bytes;
  return reinterpret_cast<void*>(al->base);
}

bool device_free(void* p) {
  Heap& h = heap();
  std::unique_lock<std::shared_mutex> lock(h.mu);
  auto it = h.by_base.find(reinterpret_cast<uintptr_t>(p));
  if (it == h.by_base.end() || !it->second->live) return false;
  Allocation* al = it->second;
  al->live = false;
  h.in_use -= al->size;
  h.quarantine.push_back(al);
  h.quarantine_bytes += al->map_size;
  while (h.quarantine_bytes > kQuarantine && !h.quarantine.empty()) {
    Allocation* old = h.quarantine.front();
    h.quarantine.pop_front();
    h.quarantine_bytes -= old->map_size;
    h.by_base.erase(old->base);
    h.generation.fetch_add(1, std::memory_order_acq_rel);
    munmap(old->map, old->map_size);
    delete[] old->touched.load();
    delete old;
  }
  return true;
}

std::size_t device_bytes_in_use() {
  Heap& h = heap();
  std::shared_lock<std::shared_mutex> lock(h.mu);
  return h.in_use;
}

bool device_range_valid(const void* p, std::size_t n) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  Heap& h = heap();
  std::shared_lock<std::shared_mutex> lock(h.mu);
  const Allocation* al = lookup_locked(h, a);
  return al != nullptr && al->live && a >= al->base && a + n <= al->base + al->size;
}

void mark_initialized(const void* p, std::size_t n) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (n == 0) return;
  Allocation* al = lookup(a, n);
  if (al != nullptr && a >= al->base && a + n <= al->base + al->size) set_bits(*al, a - al->base, n);
}

void copy_initialized(void* dst, const void* src, std::size_t n) {
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (n == 0) return;
  Allocation* ad = lookup(d, n);
  Allocation* as = lookup(s, n);
  if (ad == nullptr || d < ad->base || d + n > ad->base + ad->size) return;
  if (as == nullptr || s < as->base || s + n > as->base + as->size) {
    set_bits(*ad, d - ad->base, n);  // from host memory
    return;
  }
  const std::size_t od = d - ad->base, os = s - as->base;
  for (std::size_t i = 0; i < n; ++i) {
    const uint8_t m = uint8_t(1u << ((od + i) & 7));
    if (bit(*as, os + i)) ad->init[(od + i) >> 3].fetch_or(m, std::memory_order_relaxed);
    else ad->init[(od + i) >> 3].fetch_and(uint8_t(~m), std::memory_order_relaxed);
  }
}

// ---- shared memory ----------------------------------------------------------------------------
void setup_shared_region(Worker& w) {
  if (w.tls_size != 0) return;
  Dl_info self;
  dladdr(reinterpret_cast<void*>(&setup_shared_region), &self);
  struct Found {
    uintptr_t base;
    uintptr_t lo;
    std::size_t size;
  } found{reinterpret_cast<uintptr_t>(self.dli_fbase), 0, 0};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        auto* f = static_cast<Found*>(data);
        if (info->dlpi_addr != f->base) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          if (info->dlpi_phdr[i].p_type == PT_TLS) {
            f->lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
            f->size = info->dlpi_phdr[i].p_memsz;
          }
        }
        return 1;
      },
      &found);
  if (found.lo == 0 || found.size == 0) {
    std::fprintf(stderr, "rk-emu: cannot find this thread's copy of the kernels' shared memory\n");
    std::abort();
  }
  w.tls_lo = found.lo;
  w.tls_size = found.size;
  w.shared_shadow.assign(found.size, Worker::SharedShadow{0, 0, 0, 0, nullptr, nullptr});
}

std::string hex(uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%lx", static_cast<unsigned long>(a));
  return buf;
}

namespace {

std::string thread_name(const Worker& w, uint32_t tid) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u)", tid % w.block[0], (tid / w.block[0]) % w.block[1],
                tid / (w.block[0] * w.block[1]));
  return buf;
}

std::string at_line(const void* pc) {
  const std::string l = source_line(pc);
  return l.empty() ? "" : " at " + l;
}

// The writer recorded for a shared byte that was read before any thread wrote it.
constexpr uint16_t kNobody = 0xfffe;

void shared_access(Worker& w, uintptr_t off, std::size_t n, bool write, const void* pc) {
  const Config& c = config();
  if (!c.racecheck) return;
  const uint32_t tid = w.current->tid, e = w.epoch;
  for (std::size_t i = 0; i < n && off + i < w.tls_size; ++i) {
    Worker::SharedShadow& s = w.shared_shadow[off + i];
    const char* hazard = nullptr;
    uint32_t other = 0;
    const void* other_pc = nullptr;
    const char* other_kind = "write";
    if (s.w_epoch == e && s.w_tid != tid && s.w_tid != kNobody) {
      hazard = write ? "write after write" : "read after write";
      other = s.w_tid;
      other_pc = s.w_pc;
    } else if (write && s.r_epoch == e && s.r_tid != tid) {
      hazard = "write after read";
      other_kind = "read";
      other = s.r_tid == 0xffff ? tid : s.r_tid;
      other_pc = s.r_pc;
    }
    if (hazard != nullptr) {
      const std::string who = (write ? "write" : "read") + std::string(" of shared memory (offset ") +
                              std::to_string(off + i) + " of this thread's shared block)";
      report(Checker::Racecheck, pc,
             std::string(hazard) + " hazard: " + who + " races with a " + other_kind +
                 " by " + (other == tid ? std::string("another thread") : thread_name(w, other)) + at_line(other_pc) +
                 ", with no __syncthreads between them");
      // One report per access is enough.
      for (std::size_t j = 0; j < n && off + j < w.tls_size; ++j) {
        Worker::SharedShadow& t = w.shared_shadow[off + j];
        if (write) t.w_epoch = e, t.w_tid = uint16_t(tid), t.w_pc = pc;
        else t.r_epoch = e, t.r_tid = uint16_t(tid), t.r_pc = pc;
      }
      return;
    }
    if (!write && s.w_epoch < w.block_epoch) {
      report(Checker::Initcheck, pc,
             "read of " + std::to_string(n) + " bytes of shared memory (offset " + std::to_string(off) +
                 ") that no thread of this block has written: the value is left over from another block");
      for (std::size_t j = 0; j < n && off + j < w.tls_size; ++j) {  // once per access
        Worker::SharedShadow& t = w.shared_shadow[off + j];
        if (t.w_epoch < w.block_epoch) t.w_epoch = w.block_epoch, t.w_tid = kNobody, t.w_pc = nullptr;
        if (t.r_epoch != e) t.r_epoch = e, t.r_tid = uint16_t(tid), t.r_pc = pc;
        else if (t.r_tid != tid) t.r_tid = 0xffff;
      }
      return;
    }
    if (write) {
      s.w_epoch = e;
      s.w_tid = uint16_t(tid);
      s.w_pc = pc;
    } else if (s.r_epoch != e) {
      s.r_epoch = e;
      s.r_tid = uint16_t(tid);
      s.r_pc = pc;
    } else if (s.r_tid != tid) {
      s.r_tid = 0xffff;  // several readers
    }
  }
}

void global_access(Worker& w, uintptr_t a, std::size_t n, bool write, const void* pc) {
  const Config& c = config();
  Allocation* al = lookup(a, n);
  const char* what = write ? "write" : "read";
  if (al == nullptr || a < al->base || a + n > al->base + al->size) {
    if (!c.memcheck) return;
    std::string msg = std::string("invalid global ") + what + " of " + std::to_string(n) + " bytes at " + hex(a);
    if (al == nullptr) {
      msg += ", which is in no device allocation (a host pointer, or far out of bounds)";
    } else {
      const uintptr_t end = al->base + al->size;
      msg += " (" + std::to_string(al->size) + "-byte allocation at " + hex(al->base) + ": ";
      if (a < al->base) msg += std::to_string(al->base - a) + " bytes before its start)";
      else if (a < end) msg += "runs " + std::to_string(a + n - end) + " bytes past its end)";
      else if (a == end) msg += "just past its end)";
      else msg += std::to_string(a - end) + " bytes past its end)";
    }
    if (al != nullptr && !al->live) msg += " (freed)";
    report(Checker::Memcheck, pc, msg);
    abort_fiber(700);  // CUDA_ERROR_ILLEGAL_ADDRESS
  }
  if (!al->live.load(std::memory_order_relaxed)) {
    if (!c.memcheck) return;
    report(Checker::Memcheck, pc,
           std::string("use after free: global ") + what + " of " + std::to_string(n) + " bytes at offset " +
               std::to_string(a - al->base) + " of a freed " + std::to_string(al->size) + "-byte allocation");
    abort_fiber(700);
  }
  const std::size_t off = a - al->base;
  if (write) {
    set_bits(*al, off, n);
  } else if (c.initcheck) {
    const std::size_t k = first_unset(*al, off, n);
    if (k < n && !al->uninit_reported.exchange(true)) {
      report(Checker::Initcheck, pc,
             "read of uninitialised global memory: byte " + std::to_string(off + k) + " of a " +
                 std::to_string(al->size) + "-byte allocation at " + hex(al->base) +
                 " was never written (by a copy, a memset or a kernel)");
    }
  }
  if (write) w.traffic.write_bytes += n;
  else w.traffic.read_bytes += n;
  if (w.trace) {
    w.current->log.push_back(Access{a, static_cast<uint32_t>(n)});
    std::atomic<uint32_t>* t = al->touched.load(std::memory_order_acquire);
    if (t == nullptr) {
      auto* fresh = new std::atomic<uint32_t>[2 * (al->size / 32 + 2)]();
      if (al->touched.compare_exchange_strong(t, fresh)) t = fresh;
      else delete[] fresh;
    }
    for (std::size_t s = off >> 5; s <= (off + n - 1) >> 5; ++s)
      if (t[2 * s + write].exchange(w.launch_id, std::memory_order_relaxed) != w.launch_id) ++w.traffic.dram_sectors;
  }
}

inline void on_access(void* p, std::size_t n, bool write, const void* pc) {
  Worker* w = current_worker();
  if (w == nullptr || w->current == nullptr) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  const Fiber* f = w->current;
  if (a - reinterpret_cast<uintptr_t>(f->stack_lo) < f->stack_size) return;  // local memory
  if (a - w->tls_lo < w->tls_size) return shared_access(*w, a - w->tls_lo, n, write, pc);
  global_access(*w, a, n, write, pc);
}

}  // namespace

// ---- traffic ----------------------------------------------------------------------------------
// The k-th global access of every lane of a warp since the last sync point is taken as one warp
// instruction: it requests every 32-byte sector its lanes touch, and ideally needs
// ceil(distinct bytes / 32) of them.
void flush_warp_log(Worker& w, uint32_t warp, uint32_t lanes) {
  const uint32_t base = warp * kWarp;
  std::size_t longest = 0;
  for (uint32_t l = 0; l < kWarp && base + l < w.threads; ++l)
    if (lanes & (1u << l)) longest = std::max(longest, w.fibers[base + l].log.size());
  std::vector<uintptr_t> sectors;
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (std::size_t k = 0; k < longest; ++k) {
    sectors.clear();
    spans.clear();
    for (uint32_t l = 0; l < kWarp && base + l < w.threads; ++l) {
      if (!(lanes & (1u << l))) continue;
      const auto& log = w.fibers[base + l].log;
      if (k >= log.size()) continue;
      const Access& acc = log[k];
      for (uintptr_t s = acc.addr >> 5; s <= (acc.addr + acc.size - 1) >> 5; ++s) sectors.push_back(s);
      spans.emplace_back(acc.addr, acc.addr + acc.size);
    }
    std::sort(sectors.begin(), sectors.end());
    w.traffic.sectors += std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    std::sort(spans.begin(), spans.end());
    uint64_t distinct = 0;
    uintptr_t end = 0;
    for (auto [lo, hi] : spans) {
      if (hi <= end) continue;
      distinct += hi - std::max(lo, end);
      end = hi;
    }
    w.traffic.ideal_sectors += (distinct + 31) / 32;
    w.traffic.instruction_bytes += distinct;
  }
  for (uint32_t l = 0; l < kWarp && base + l < w.threads; ++l)
    if (lanes & (1u << l)) w.fibers[base + l].log.clear();
}

}  // namespace rk_emu

// ---- the instrumentation's entry points -----------------------------------------------------------
using rk_emu::on_access;

#define RK_EMU_ACCESS(N)                                                                                  \
  void __tsan_read##N(void* a) { on_access(a, N, false, __builtin_return_address(0)); }                  \
  void __tsan_write##N(void* a) { on_access(a, N, true, __builtin_return_address(0)); }                  \
  void __tsan_unaligned_read##N(void* a) { on_access(a, N, false, __builtin_return_address(0)); }        \
  void __tsan_unaligned_write##N(void* a) { on_access(a, N, true, __builtin_return_address(0)); }

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_read1(void* a) { on_access(a, 1, false, __builtin_return_address(0)); }
void __tsan_write1(void* a) { on_access(a, 1, true, __builtin_return_address(0)); }
RK_EMU_ACCESS(2)
RK_EMU_ACCESS(4)
RK_EMU_ACCESS(8)
RK_EMU_ACCESS(16)
void __tsan_read_range(void* a, unsigned long n) { on_access(a, n, false, __builtin_return_address(0)); }
void __tsan_write_range(void* a, unsigned long n) { on_access(a, n, true, __builtin_return_address(0)); }
}

// ---- atomics --------------------------------------------------------------------------------------
namespace {

template <typename T, typename F>
T cas_loop(T* p, F f) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &old, f(old), false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}

template <typename T>
unsigned long long atomic_int(int op, T* p, T v, T cmp) {
  T old{};
  switch (op) {
    case 0: old = __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); break;
    case 1: old = cas_loop(p, [v](T o) { return std::min(o, v); }); break;
    case 2: old = cas_loop(p, [v](T o) { return std::max(o, v); }); break;
    case 3: old = __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); break;
    case 4:
      old = cmp;
      __atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
      break;
    case 5: old = __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); break;
    case 6: old = __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); break;
    default: old = __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); break;
  }
  unsigned long long bits = 0;
  std::memcpy(&bits, &old, sizeof(T));
  return bits;
}

template <typename F, typename U>
unsigned long long atomic_float(int op, U* p, unsigned long long vbits) {
  F v;
  std::memcpy(&v, &vbits, sizeof(F));
  auto apply = [op, v](U o) {
    F x;
    std::memcpy(&x, &o, sizeof(F));
    F r = op == 0 ? x + v : op == 1 ? std::fmin(x, v) : op == 2 ? std::fmax(x, v) : v;
    U out;
    std::memcpy(&out, &r, sizeof(F));
    return out;
  };
  return cas_loop(p, apply);
}

}  // namespace

extern "C" unsigned long long rk_emu_atomic(int op, int ty, void* address, unsigned long long value,
                                            unsigned long long compare) {
  const std::size_t n = (ty == 2 || ty == 3 || ty == 5) ? 8 : 4;
  const void* pc = __builtin_return_address(0);
  if (reinterpret_cast<uintptr_t>(address) % n != 0) {
    rk_emu::report(rk_emu::Checker::Memcheck, pc, "misaligned atomic on " + rk_emu::hex(reinterpret_cast<uintptr_t>(address)));
    rk_emu::abort_fiber(716);  // CUDA_ERROR_MISALIGNED_ADDRESS
  }
  on_access(address, n, false, pc);
  on_access(address, n, true, pc);
  switch (ty) {
    case 0: return atomic_int<int32_t>(op, static_cast<int32_t*>(address), int32_t(value), int32_t(compare));
    case 1: return atomic_int<uint32_t>(op, static_cast<uint32_t*>(address), uint32_t(value), uint32_t(compare));
    case 2: return atomic_int<uint64_t>(op, static_cast<uint64_t*>(address), value, compare);
    case 3: return atomic_int<int64_t>(op, static_cast<int64_t*>(address), int64_t(value), int64_t(compare));
    case 4: return atomic_float<float>(op, static_cast<uint32_t*>(address), value);
    default: return atomic_float<double>(op, static_cast<uint64_t*>(address), value);
  }
}
