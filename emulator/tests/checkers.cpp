// The emulated device's own tests, through the driver API as cudarc uses it: every checker
// catches the bug planted for it (planted.cu) and stays silent on the clean twin; the SIMT
// model's collectives, atomics and traffic counts give what the hardware gives. Run by
// `scripts/emulator.sh selftest`, which links this program against a copy of the emulated driver
// that also holds the planted kernels. Exits non-zero on the first failed expectation.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

extern "C" {
int cuInit(unsigned);
int cuDeviceGet(int*, int);
int cuDevicePrimaryCtxRetain(void**, int);
int cuCtxSetCurrent(void*);
int cuMemAlloc_v2(unsigned long long*, size_t);
int cuMemFree_v2(unsigned long long);
int cuMemcpyHtoD_v2(unsigned long long, const void*, size_t);
int cuMemcpyDtoH_v2(void*, unsigned long long, size_t);
int cuMemsetD8_v2(unsigned long long, unsigned char, size_t);
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
int cuDeviceGetAttribute(int*, int, int);
int cuMemGetInfo_v2(size_t*, size_t*);
int cuStreamCreate(void**, unsigned);
int cuStreamDestroy_v2(void*);
int cuGetErrorName(int, const char**);
}

namespace {

constexpr int kIllegalAddress = 700, kMisaligned = 716, kLaunchFailed = 719, kNotFound = 500, kInvalidValue = 1,
              kOutOfResources = 701, kInvalidHandle = 400;

std::string report_path;
int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

std::string read_report() {
  std::ifstream f(report_path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// The findings one launch added to the report.
struct Launch {
  int result;
  std::string findings;
};

void* module = nullptr;

void* function(const char* name) {
  void* f = nullptr;
  const int r = cuModuleGetFunction(&f, module, name);
  if (r != 0) {
    std::printf("FAIL cuModuleGetFunction(%s) = %d\n", name, r);
    std::exit(1);
  }
  return f;
}

Launch launch(const char* name, unsigned grid, unsigned block, std::vector<void*> params) {
  const std::string before = read_report();
  Launch l;
  l.result = cuLaunchKernel(function(name), grid, 1, 1, block, 1, 1, 0, nullptr, params.data(), nullptr);
  l.findings = read_report().substr(before.size());
  return l;
}

bool has(const std::string& text, const char* needle) { return text.find(needle) != std::string::npos; }

unsigned long long device(size_t bytes) {
  unsigned long long p = 0;
  if (cuMemAlloc_v2(&p, bytes) != 0) {
    std::printf("FAIL cuMemAlloc\n");
    std::exit(1);
  }
  return p;
}

unsigned long long upload(const std::vector<float>& v) {
  const unsigned long long p = device(v.size() * 4);
  cuMemcpyHtoD_v2(p, v.data(), v.size() * 4);
  return p;
}

std::vector<float> download(unsigned long long p, size_t n) {
  std::vector<float> v(n);
  cuMemcpyDtoH_v2(v.data(), p, n * 4);
  return v;
}

void expect_caught(const Launch& l, int code, const char* checker, std::initializer_list<const char*> words,
                   const std::string& what) {
  bool ok = l.result == code && has(l.findings, checker);
  for (const char* w : words) ok = ok && has(l.findings, w);
  expect(ok, what);
  if (!ok) std::printf("     result %d, findings:\n%s\n", l.result, l.findings.c_str());
}

void expect_clean(const Launch& l, const std::string& what) {
  expect(l.result == 0 && l.findings.empty(), what);
  if (l.result != 0 || !l.findings.empty()) std::printf("     result %d, findings:\n%s\n", l.result, l.findings.c_str());
}

}  // namespace

int main() {
  const char* path = std::getenv("RK_EMU_REPORT");
  if (path == nullptr) {
    std::fprintf(stderr, "set RK_EMU_REPORT (scripts/emulator.sh selftest does)\n");
    return 2;
  }
  report_path = path;
  // The same expectations hold with blocks over several OS threads and a shuffled schedule
  // (scripts/emulator.sh selftest runs both), but for the order-dependent details.
  const bool shuffled = std::getenv("RK_EMU_SCHEDULE") != nullptr;
  std::printf("schedule %s, %s worker thread(s)\n", shuffled ? std::getenv("RK_EMU_SCHEDULE") : "in-order",
              std::getenv("RK_EMU_WORKERS") ? std::getenv("RK_EMU_WORKERS") : "1");
  std::remove(path);
  std::ofstream(path).close();

  int dev = -1;
  void* ctx = nullptr;
  expect(cuInit(0) == 0 && cuDeviceGet(&dev, 0) == 0 && cuDevicePrimaryCtxRetain(&ctx, dev) == 0 &&
             cuCtxSetCurrent(ctx) == 0,
         "init, device 0, primary context");
  int major = 0, pools = -1;
  cuDeviceGetAttribute(&major, 75, dev);
  cuDeviceGetAttribute(&pools, 115, dev);
  expect(major == 9 && pools == 1, "reports sm_90 with memory pools");

  // The module image: PTX-like text naming the kernels (the emulator checks names against it).
  const char* image =
      ".entry planted_off_by_one planted_scale planted_misaligned planted_local_overflow planted_missing_barrier "
      "planted_block_sum planted_stale_shared planted_shuffle_mask planted_shuffle_exited planted_warp_sum "
      "planted_divergent_barrier planted_deadlock planted_uninitialised planted_int_overflow planted_atomic_min "
      "planted_copy";
  expect(cuModuleLoadData(&module, image) == 0, "module load");
  void* missing = nullptr;
  expect(cuModuleGetFunction(&missing, module, "token_merge") == kNotFound,
         "a kernel the module image does not name is not found");

  const int n = 1000;
  std::vector<float> host(n);
  for (int i = 0; i < n; ++i) host[i] = static_cast<float>(i);
  unsigned long long in = upload(host), out = device(n * 4);
  int count = n;

  // memcheck
  expect_caught(launch("planted_off_by_one", 4, 256, {&in, &out, &count}), kIllegalAddress, "memcheck",
                {"planted_off_by_one", "block (3,0,0)", "thread (232,0,0)", "just past its end", "planted.cu:12"},
                "memcheck: an off-by-one bound reads past the end (kernel, block, thread and line named)");
  expect_clean(launch("planted_scale", 4, 256, {&in, &out, &count}), "memcheck: the correct bound is clean");
  const std::vector<float> scaled = download(out, n);
  expect(scaled[999] == 1998.0f && scaled[0] == 0.0f, "the clean kernel computed its result");
  expect_caught(launch("planted_misaligned", 1, 32, {&in, &out}), kMisaligned, "memcheck", {"misaligned", "float4"},
                "memcheck: a misaligned vector load");
  int k = 3;
  expect_caught(launch("planted_local_overflow", 1, 32, {&out, &k}), kIllegalAddress, "memcheck",
                {"index 4 out of bounds"}, "memcheck: a local array indexed past its end");
  unsigned long long freed = upload(host);
  cuMemFree_v2(freed);
  expect_caught(launch("planted_scale", 4, 256, {&freed, &out, &count}), kIllegalAddress, "memcheck",
                {"use after free"}, "memcheck: a freed buffer read by a kernel");
  unsigned long long host_ptr = reinterpret_cast<unsigned long long>(host.data());
  expect_caught(launch("planted_scale", 4, 256, {&host_ptr, &out, &count}), kIllegalAddress, "memcheck",
                {"in no device allocation"}, "memcheck: a host pointer passed as a device pointer");

  // racecheck
  std::vector<float> ones(512, 1.0f);
  unsigned long long in2 = upload(ones), sums = device(2 * 4);
  if (shuffled) {
    // Which thread meets which first depends on the order.
    expect_caught(launch("planted_missing_barrier", 2, 256, {&in2, &sums}), kLaunchFailed, "racecheck",
                  {"hazard", "with no __syncthreads between them", "planted_missing_barrier"},
                  "racecheck: a missing __syncthreads between shared writes and reads");
  } else {
    expect_caught(launch("planted_missing_barrier", 2, 256, {&in2, &sums}), kLaunchFailed, "racecheck",
                  {"write after read", "thread (1,0,0)",
                   "races with a read by thread (0,0,0) at emulator/tests/planted.cu:41", "planted.cu:37"},
                  "racecheck: a missing __syncthreads between shared writes and reads");
  }
  expect_clean(launch("planted_block_sum", 2, 256, {&in2, &sums}), "racecheck: with the barrier it is clean");
  expect(download(sums, 2) == std::vector<float>{256.0f, 256.0f}, "the clean block sum is 256 per block");
  unsigned long long stale = device(4 * 64 * 4);
  expect_caught(launch("planted_stale_shared", 4, 64, {&stale}), kLaunchFailed, "initcheck",
                {"no thread of this block has written"}, "racecheck: shared memory read before this block wrote it");

  // synccheck
  expect_caught(launch("planted_shuffle_mask", 1, 32, {&in, &out}), kLaunchFailed, "synccheck",
                {"reads lane 31", "not in its mask 0x7fffffff"}, "synccheck: a shuffle reads a lane missing from its mask");
  expect_caught(launch("planted_shuffle_exited", 1, 32, {&in, &out}), kLaunchFailed, "synccheck",
                {"lane 5", "has exited"}, "synccheck: a lane named in the mask has exited");
  std::vector<float> ramp(512);
  for (int i = 0; i < 512; ++i) ramp[i] = static_cast<float>(i % 7);
  unsigned long long in3 = upload(ramp);
  expect_clean(launch("planted_warp_sum", 2, 256, {&in3, &sums}), "synccheck: the block reduction of common.cuh is clean");
  const std::vector<float> ws = download(sums, 2);
  float want0 = 0, want1 = 0;
  for (int i = 0; i < 256; ++i) want0 += ramp[i], want1 += ramp[256 + i];
  expect(ws[0] == want0 && ws[1] == want1, "the warp shuffles exchange the right values");
  expect_caught(launch("planted_divergent_barrier", 1, 64, {&out}), kLaunchFailed, "synccheck", {"never reached by 32"},
                "synccheck: a barrier half of the block never reaches");
  expect_caught(launch("planted_deadlock", 1, 64, {&out}), kLaunchFailed, "synccheck",
                {"deadlock", "threads 0-31,40 wait at __syncthreads", "threads 32-39,41-63 wait at __shfl_xor_sync"}, "synccheck: a shuffle waiting on a lane that went to a barrier");

  // initcheck
  unsigned long long never = device(32 * 4);
  expect_caught(launch("planted_uninitialised", 1, 32, {&never, &out}), kLaunchFailed, "initcheck",
                {"never written", "planted_uninitialised"}, "initcheck: a read of a buffer nothing wrote");
  cuMemsetD8_v2(never, 0, 32 * 4);
  expect_clean(launch("planted_uninitialised", 1, 32, {&never, &out}), "initcheck: after a memset it is clean");

  // undefined behaviour
  int row = 70000, ld = 40000;
  expect_caught(launch("planted_int_overflow", 1, 32, {&out, &row, &ld}), kLaunchFailed, "undefined-behaviour",
                {"signed overflow in a multiplication"}, "undefined behaviour: a 32-bit index that overflows");

  // atomics
  const unsigned long long clear = ~0ull;
  unsigned long long word = device(8);
  cuMemcpyHtoD_v2(word, &clear, 8);
  expect_clean(launch("planted_atomic_min", 64, 256, {&word}), "atomicMin from 16384 threads is clean");
  unsigned long long got = 0;
  cuMemcpyDtoH_v2(&got, word, 8);
  expect(got == 1000, "atomicMin keeps the lowest value");

  // driver argument checks, as the real driver makes them
  void* f = function("planted_scale");
  expect(cuLaunchKernel(f, 1, 1, 1, 512, 1, 1, 0, nullptr, std::vector<void*>{&in, &out, &count}.data(), nullptr) ==
             kOutOfResources,
         "a launch past __launch_bounds__ is refused");
  expect(cuLaunchKernel(f, 0, 1, 1, 32, 1, 1, 0, nullptr, std::vector<void*>{&in, &out, &count}.data(), nullptr) ==
             kInvalidValue,
         "an empty grid is refused");
  expect(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, reinterpret_cast<void*>(0x1234), std::vector<void*>{&in, &out, &count}.data(),
                        nullptr) == kInvalidHandle,
         "an unknown stream is refused");
  std::vector<float> big(2 * n);
  expect(cuMemcpyHtoD_v2(in, big.data(), big.size() * 4) == kInvalidValue, "a copy past the end of an allocation is refused");
  const char* name = nullptr;
  expect(cuGetErrorName(kIllegalAddress, &name) == 0 && std::strcmp(name, "CUDA_ERROR_ILLEGAL_ADDRESS") == 0,
         "error names");

  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "all checker tests passed", failures);
  return failures ? 1 : 0;
}
