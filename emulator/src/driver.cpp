// The emulated CUDA driver: the libcuda.so entry points cudarc resolves, over host memory and
// the host-compiled kernels. One device, reported as an sm_90 part with H100-like limits.
//
// All work is done when it is enqueued: a launch runs every block before cuLaunchKernel returns,
// a copy is done before its call returns. That satisfies cudarc's two expectations (a copy to
// pageable host memory needs no stream synchronisation, and the host buffer of a copy to the
// device may be reused at once), and streams and events need no queues. Device pointers are
// host addresses of guarded allocations (memory.cpp). Every call checks its arguments as the
// real driver does and returns only result codes cudarc's CUresult enum defines; entry points
// the emulator does not implement return CUDA_ERROR_NOT_SUPPORTED (stubs.cpp, generated); the
// error names and texts are in errors.cpp.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_set>

#include "../include/rk_emu.h"
#include "driver.h"
#include "emu.h"

namespace {

constexpr std::size_t kTotalMemory = std::size_t{80} << 30;
constexpr int kSms = 132;

struct Context {
  int device = 0;
  int retained = 0;
};
Context primary;
thread_local Context* current = nullptr;

struct Stream {
  unsigned flags;
};
struct Event {
  unsigned flags;
  bool recorded = false;
  std::chrono::steady_clock::time_point at;
};
struct Module {
  std::string image;  // a copy: cudarc frees its buffer right after the load
};

// Live handles, so that a stale or foreign one is an error, not a crash.
struct Handles {
  std::mutex mu;
  std::unordered_set<const void*> live;
  void add(const void* p) {
    std::lock_guard<std::mutex> l(mu);
    live.insert(p);
  }
  bool remove(const void* p) {
    std::lock_guard<std::mutex> l(mu);
    return live.erase(p) == 1;
  }
  bool has(const void* p) {
    std::lock_guard<std::mutex> l(mu);
    return live.count(p) == 1;
  }
};
Handles& streams() {
  static auto* h = new Handles();
  return *h;
}
Handles& events() {
  static auto* h = new Handles();
  return *h;
}
Handles& modules() {
  static auto* h = new Handles();
  return *h;
}

bool initialized = false;

// The null stream, the legacy and per-thread default streams, or a live stream.
bool stream_ok(const void* s) {
  const auto v = reinterpret_cast<uintptr_t>(s);
  return v <= 2 || streams().has(s);
}

void* dptr(CUdeviceptr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

CUresult memset_device(CUdeviceptr p, const void* value, std::size_t width, std::size_t count) {
  const std::size_t n = width * count;
  if (n == 0) return CUDA_SUCCESS;
  if (p % width != 0) return CUDA_ERROR_INVALID_VALUE;
  if (!rk_emu::device_range_valid(dptr(p), n)) return CUDA_ERROR_INVALID_VALUE;
  auto* d = static_cast<char*>(dptr(p));
  if (width == 1) {
    std::memset(d, *static_cast<const unsigned char*>(value), n);
  } else {
    for (std::size_t i = 0; i < count; ++i) std::memcpy(d + i * width, value, width);
  }
  rk_emu::mark_initialized(d, n);
  return CUDA_SUCCESS;
}

// The size of a module image: a fatbin (its header says), an ELF (its section headers end it),
// or PTX text (NUL-terminated).
std::size_t image_size(const unsigned char* p) {
  uint32_t magic;
  std::memcpy(&magic, p, 4);
  if (magic == 0xBA55ED50u) {
    uint16_t header;
    uint64_t fat;
    std::memcpy(&header, p + 6, 2);
    std::memcpy(&fat, p + 8, 8);
    return header + fat;
  }
  if (std::memcmp(p, "\x7f" "ELF", 4) == 0 && p[4] == 2) {
    uint64_t shoff;
    uint16_t shentsize, shnum;
    std::memcpy(&shoff, p + 0x28, 8);
    std::memcpy(&shentsize, p + 0x3a, 2);
    std::memcpy(&shnum, p + 0x3c, 2);
    return shoff + std::size_t{shentsize} * shnum;
  }
  return std::strlen(reinterpret_cast<const char*>(p)) + 1;
}

bool image_names(const std::string& image, const char* name) {
  // A symbol name in an ELF string table stands between NULs; in PTX text it is a whole word.
  const std::string needle = std::string(1, '\0') + name + '\0';
  if (image.find(needle) != std::string::npos) return true;
  for (std::size_t at = image.find(name); at != std::string::npos; at = image.find(name, at + 1)) {
    auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
    const std::size_t end = at + std::strlen(name);
    if ((at == 0 || !word(image[at - 1])) && (end >= image.size() || !word(image[end]))) return true;
  }
  return false;
}

int attribute(int attrib) {
  switch (attrib) {
    case 1: return 1024;        // max threads per block
    case 2: return 1024;        // max block dim x
    case 3: return 1024;        // y
    case 4: return 64;          // z
    case 5: return 2147483647;  // max grid dim x
    case 6: return 65535;
    case 7: return 65535;
    case 8: return 49152;    // shared memory per block
    case 9: return 65536;    // constant memory
    case 10: return 32;      // warp size
    case 11: return 2147483647;
    case 12: return 65536;   // registers per block
    case 13: return 1980000;  // clock rate, kHz
    case 14: return 512;
    case 15: return 1;
    case 16: return kSms;    // multiprocessors
    case 19: return 1;
    case 31: return 1;       // concurrent kernels
    case 36: return 2619000;  // memory clock, kHz
    case 37: return 5120;    // bus width, bits
    case 38: return 50 << 20;  // L2
    case 39: return 2048;    // threads per multiprocessor
    case 40: return 2;
    case 41: return 1;       // unified addressing
    case 75: return 9;       // compute capability 9.0
    case 76: return 0;
    case 78: return 1;
    case 79: return 1;
    case 80: return 1;
    case 81: return 233472;  // shared memory per multiprocessor
    case 82: return 65536;
    case 83: return 1;
    case 95: return 1;
    case 97: return 232448;  // opt-in shared memory per block
    case 106: return 32;     // blocks per multiprocessor
    case 115: return rk_emu::config().memory_pools ? 1 : 0;
    case 120: return 1;
    default: return 0;
  }
}

}  // namespace

// ---- init and device ------------------------------------------------------------------------------
RK_API CUresult cuInit(unsigned flags) {
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  initialized = true;
  return CUDA_SUCCESS;
}

RK_API CUresult cuDriverGetVersion(int* v) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = 13000;
  return CUDA_SUCCESS;
}

RK_API CUresult cuDeviceGetCount(int* n) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!n) return CUDA_ERROR_INVALID_VALUE;
  *n = 1;
  return CUDA_SUCCESS;
}

RK_API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}

RK_API CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice d) {
  if (!v || attrib < 1 || attrib > 162) return CUDA_ERROR_INVALID_VALUE;
  if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
  *v = attribute(attrib);
  return CUDA_SUCCESS;
}

RK_API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
  std::snprintf(name, static_cast<std::size_t>(len), "rlhf-kernels emulated device (sm_90, H100-like limits)");
  return CUDA_SUCCESS;
}

RK_API CUresult cuDeviceTotalMem_v2(std::size_t* bytes, CUdevice d) {
  if (!bytes) return CUDA_ERROR_INVALID_VALUE;
  if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = kTotalMemory;
  return CUDA_SUCCESS;
}

RK_API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) {
  if (!uuid) return CUDA_ERROR_INVALID_VALUE;
  if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
  std::memcpy(uuid, "rk-emu-device-00", 16);
  return CUDA_SUCCESS;
}

RK_API CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid_v2(uuid, d); }

// ---- contexts ----------------------------------------------------------------------------------
RK_API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!ctx) return CUDA_ERROR_INVALID_VALUE;
  if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
  static std::mutex m;
  std::lock_guard<std::mutex> l(m);
  ++primary.retained;
  *ctx = &primary;
  return CUDA_SUCCESS;
}

RK_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
  if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
  return CUDA_SUCCESS;  // the primary context lives as long as the process
}

RK_API CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned* flags, int* active) {
  if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
  if (!flags || !active) return CUDA_ERROR_INVALID_VALUE;
  *flags = 0;
  *active = primary.retained > 0;
  return CUDA_SUCCESS;
}

RK_API CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice d, unsigned) {
  return d == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

RK_API CUresult cuCtxGetCurrent(void** ctx) {
  if (!ctx) return CUDA_ERROR_INVALID_VALUE;
  *ctx = current;
  return CUDA_SUCCESS;
}

RK_API CUresult cuCtxSetCurrent(void* ctx) {
  if (ctx != nullptr && ctx != &primary) return CUDA_ERROR_INVALID_CONTEXT;
  current = static_cast<Context*>(ctx);
  return CUDA_SUCCESS;
}

RK_API CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }

RK_API CUresult cuCtxPopCurrent_v2(void** ctx) {
  if (ctx) *ctx = current;
  current = nullptr;
  return CUDA_SUCCESS;
}

RK_API CUresult cuCtxGetDevice(CUdevice* d) {
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  if (current == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
  *d = 0;
  return CUDA_SUCCESS;
}

RK_API CUresult cuCtxSynchronize() { return current == nullptr ? CUDA_ERROR_INVALID_CONTEXT : CUDA_SUCCESS; }

// ---- streams and events ---------------------------------------------------------------------------
RK_API CUresult cuStreamCreate(void** s, unsigned flags) {
  if (!s || flags > 1) return CUDA_ERROR_INVALID_VALUE;
  auto* st = new Stream{flags};
  streams().add(st);
  *s = st;
  return CUDA_SUCCESS;
}

RK_API CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }

RK_API CUresult cuStreamDestroy_v2(void* s) {
  if (!streams().remove(s)) return CUDA_ERROR_INVALID_HANDLE;
  delete static_cast<Stream*>(s);
  return CUDA_SUCCESS;
}

RK_API CUresult cuStreamSynchronize(void* s) { return stream_ok(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
RK_API CUresult cuStreamQuery(void* s) { return stream_ok(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

RK_API CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
  if (!stream_ok(s) || !events().has(e)) return CUDA_ERROR_INVALID_HANDLE;
  return CUDA_SUCCESS;  // everything enqueued has already run
}

RK_API CUresult cuEventCreate(void** e, unsigned flags) {
  if (!e || flags > 0xf) return CUDA_ERROR_INVALID_VALUE;
  auto* ev = new Event{flags, false, {}};
  events().add(ev);
  *e = ev;
  return CUDA_SUCCESS;
}

RK_API CUresult cuEventRecord(void* e, void* s) {
  if (!events().has(e) || !stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
  auto* ev = static_cast<Event*>(e);
  ev->recorded = true;
  ev->at = std::chrono::steady_clock::now();
  return CUDA_SUCCESS;
}

RK_API CUresult cuEventSynchronize(void* e) { return events().has(e) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
RK_API CUresult cuEventQuery(void* e) { return events().has(e) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

RK_API CUresult cuEventDestroy_v2(void* e) {
  if (!events().remove(e)) return CUDA_ERROR_INVALID_HANDLE;
  delete static_cast<Event*>(e);
  return CUDA_SUCCESS;
}

// Wall-clock time between the two records: the emulator's time, not a GPU's.
RK_API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
  if (!ms) return CUDA_ERROR_INVALID_VALUE;
  if (!events().has(start) || !events().has(end)) return CUDA_ERROR_INVALID_HANDLE;
  auto* a = static_cast<Event*>(start);
  auto* b = static_cast<Event*>(end);
  if ((a->flags | b->flags) & 0x2) return CUDA_ERROR_INVALID_HANDLE;  // CU_EVENT_DISABLE_TIMING
  if (!a->recorded || !b->recorded) return CUDA_ERROR_NOT_READY;
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return CUDA_SUCCESS;
}

RK_API CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }

// ---- memory -----------------------------------------------------------------------------------------
RK_API CUresult cuMemAlloc_v2(CUdeviceptr* p, std::size_t bytes) {
  if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  if (bytes > kTotalMemory - rk_emu::device_bytes_in_use()) return CUDA_ERROR_OUT_OF_MEMORY;
  void* m = rk_emu::device_alloc(bytes);
  if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
  *p = reinterpret_cast<uintptr_t>(m);
  return CUDA_SUCCESS;
}

RK_API CUresult cuMemFree_v2(CUdeviceptr p) {
  if (p == 0) return CUDA_SUCCESS;
  return rk_emu::device_free(dptr(p)) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

RK_API CUresult cuMemAllocAsync(CUdeviceptr* p, std::size_t bytes, void* s) {
  if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
  return cuMemAlloc_v2(p, bytes);
}

RK_API CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
  if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
  return cuMemFree_v2(p);
}

RK_API CUresult cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
  if (!free || !total) return CUDA_ERROR_INVALID_VALUE;
  *total = kTotalMemory;
  *free = kTotalMemory - rk_emu::device_bytes_in_use();
  return CUDA_SUCCESS;
}

RK_API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, std::size_t n) { return memset_device(p, &v, 1, n); }
RK_API CUresult cuMemsetD16_v2(CUdeviceptr p, unsigned short v, std::size_t n) { return memset_device(p, &v, 2, n); }
RK_API CUresult cuMemsetD32_v2(CUdeviceptr p, unsigned v, std::size_t n) { return memset_device(p, &v, 4, n); }
RK_API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, std::size_t n, void* s) {
  return stream_ok(s) ? memset_device(p, &v, 1, n) : CUDA_ERROR_INVALID_HANDLE;
}
RK_API CUresult cuMemsetD16Async(CUdeviceptr p, unsigned short v, std::size_t n, void* s) {
  return stream_ok(s) ? memset_device(p, &v, 2, n) : CUDA_ERROR_INVALID_HANDLE;
}
RK_API CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, std::size_t n, void* s) {
  return stream_ok(s) ? memset_device(p, &v, 4, n) : CUDA_ERROR_INVALID_HANDLE;
}

RK_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, std::size_t n) {
  if (n == 0) return CUDA_SUCCESS;
  if (!src || !rk_emu::device_range_valid(dptr(dst), n)) return CUDA_ERROR_INVALID_VALUE;
  std::memcpy(dptr(dst), src, n);
  rk_emu::mark_initialized(dptr(dst), n);
  return CUDA_SUCCESS;
}

RK_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, std::size_t n) {
  if (n == 0) return CUDA_SUCCESS;
  if (!dst || !rk_emu::device_range_valid(dptr(src), n)) return CUDA_ERROR_INVALID_VALUE;
  std::memcpy(dst, dptr(src), n);
  return CUDA_SUCCESS;
}

RK_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n) {
  if (n == 0) return CUDA_SUCCESS;
  if (!rk_emu::device_range_valid(dptr(dst), n) || !rk_emu::device_range_valid(dptr(src), n))
    return CUDA_ERROR_INVALID_VALUE;
  std::memmove(dptr(dst), dptr(src), n);
  rk_emu::copy_initialized(dptr(dst), dptr(src), n);
  return CUDA_SUCCESS;
}

RK_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, std::size_t n, void* s) {
  return stream_ok(s) ? cuMemcpyHtoD_v2(dst, src, n) : CUDA_ERROR_INVALID_HANDLE;
}
RK_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, std::size_t n, void* s) {
  return stream_ok(s) ? cuMemcpyDtoH_v2(dst, src, n) : CUDA_ERROR_INVALID_HANDLE;
}
RK_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n, void* s) {
  return stream_ok(s) ? cuMemcpyDtoD_v2(dst, src, n) : CUDA_ERROR_INVALID_HANDLE;
}

// ---- modules and launches ------------------------------------------------------------------------
RK_API CUresult cuModuleLoadData(void** module, const void* image) {
  if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
  if (current == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
  auto* m = new Module();
  const auto* p = static_cast<const unsigned char*>(image);
  m->image.assign(reinterpret_cast<const char*>(p), image_size(p));
  modules().add(m);
  *module = m;
  return CUDA_SUCCESS;
}

RK_API CUresult cuModuleLoadDataEx(void** module, const void* image, unsigned, void*, void**) {
  return cuModuleLoadData(module, image);
}

RK_API CUresult cuModuleUnload(void* module) {
  if (!modules().remove(module)) return CUDA_ERROR_INVALID_HANDLE;
  delete static_cast<Module*>(module);
  return CUDA_SUCCESS;
}

RK_API CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
  if (!f || !name) return CUDA_ERROR_INVALID_VALUE;
  if (!modules().has(module)) return CUDA_ERROR_INVALID_HANDLE;
  if (!image_names(static_cast<Module*>(module)->image, name)) return CUDA_ERROR_NOT_FOUND;
  const rk_emu::KernelInfo* k = rk_emu::find_kernel(name);
  if (k == nullptr) {
    std::fprintf(stderr,
                 "rk-emu: the module image has a kernel %s that the emulator was not built with; rebuild it "
                 "(scripts/emulator.sh build)\n",
                 name);
    return CUDA_ERROR_NOT_FOUND;
  }
  *f = const_cast<rk_emu::KernelInfo*>(k);
  return CUDA_SUCCESS;
}

RK_API CUresult cuFuncGetAttribute(int* v, int attrib, void* f) {
  if (!v || !f) return CUDA_ERROR_INVALID_VALUE;
  const auto* k = static_cast<const rk_emu::KernelInfo*>(f);
  switch (attrib) {
    case 0: *v = k->max_threads; break;  // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK
    case 4: *v = 32; break;              // NUM_REGS: not known here
    case 5: *v = 90; break;              // PTX_VERSION
    case 6: *v = 90; break;              // BINARY_VERSION
    default: *v = 0;
  }
  return CUDA_SUCCESS;
}

RK_API CUresult cuFuncSetAttribute(void* f, int, int) { return f ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
RK_API CUresult cuFuncSetCacheConfig(void* f, int) { return f ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

RK_API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void* f, int block_size, std::size_t) {
  if (!blocks || !f || block_size <= 0) return CUDA_ERROR_INVALID_VALUE;
  *blocks = std::min(32, 2048 / block_size);
  return CUDA_SUCCESS;
}

RK_API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared, void* stream, void** params, void** extra) {
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  if (current == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
  if (!stream_ok(stream)) return CUDA_ERROR_INVALID_HANDLE;
  const auto* k = static_cast<const rk_emu::KernelInfo*>(f);
  if (rk_emu::find_kernel(k->name) != k) return CUDA_ERROR_INVALID_HANDLE;
  if (extra != nullptr) return CUDA_ERROR_NOT_SUPPORTED;  // kernelParams only
  if (k->param_count > 0 && params == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) return CUDA_ERROR_INVALID_VALUE;
  if (gx > 2147483647u || gy > 65535 || gz > 65535 || bx > 1024 || by > 1024 || bz > 64)
    return CUDA_ERROR_INVALID_VALUE;
  const unsigned long long threads = 1ull * bx * by * bz;
  if (threads > 1024) return CUDA_ERROR_INVALID_VALUE;
  if (threads > static_cast<unsigned long long>(k->max_threads)) {
    rk_emu::report(rk_emu::Checker::Launch, nullptr,
                   std::string("kernel ") + k->name + " launched with " + std::to_string(threads) +
                       " threads per block; its __launch_bounds__ allow " + std::to_string(k->max_threads));
    return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
  }
  if (shared > 232448) return CUDA_ERROR_INVALID_VALUE;
  const rk_emu::LaunchResult r = rk_emu::launch(k, dim3{gx, gy, gz}, dim3{bx, by, bz}, shared, params);
  return r.error;
}
