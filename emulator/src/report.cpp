// Configuration from the environment, and findings: one line each, on stderr and appended to
// RK_EMU_REPORT, naming the checker, the kernel, the block, the thread and the source line.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "emu.h"

namespace rk_emu {

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

Config load_config() {
  Config c;
  const std::string checks = env("RK_EMU_CHECKS");
  if (!checks.empty()) {
    auto has = [&](const char* n) { return checks.find(n) != std::string::npos || checks == "all"; };
    c.memcheck = has("memcheck");
    c.racecheck = has("racecheck");
    c.initcheck = has("initcheck");
    c.synccheck = has("synccheck");
  }
  const std::string schedule = env("RK_EMU_SCHEDULE");
  if (schedule.rfind("shuffle", 0) == 0) {
    c.shuffle = true;
    const auto colon = schedule.find(':');
    c.seed = colon == std::string::npos ? 1 : std::strtoull(schedule.c_str() + colon + 1, nullptr, 0);
  } else if (!schedule.empty() && schedule != "in-order") {
    std::fprintf(stderr, "rk-emu: RK_EMU_SCHEDULE=%s: expected in-order or shuffle:<seed>\n", schedule.c_str());
    std::exit(2);
  }
  if (const std::string w = env("RK_EMU_WORKERS"); !w.empty()) c.workers = std::max(1, std::atoi(w.c_str()));
  const std::string kb = env("RK_EMU_STACK_KB");
  c.stack_bytes = (kb.empty() ? 256 : std::max(16, std::atoi(kb.c_str()))) * std::size_t{1024};
  c.memory_pools = env("RK_EMU_MEMORY_POOLS") != "0";
  c.report_path = env("RK_EMU_REPORT");
  c.kernel_log_path = env("RK_EMU_KERNEL_LOG");
  c.traffic_path = env("RK_EMU_TRAFFIC");
  return c;
}

}  // namespace

const Config& config() {
  static const Config c = load_config();
  return c;
}

const char* checker_name(Checker c) {
  switch (c) {
    case Checker::Memcheck: return "memcheck";
    case Checker::Racecheck: return "racecheck";
    case Checker::Initcheck: return "initcheck";
    case Checker::Synccheck: return "synccheck";
    case Checker::Undefined: return "undefined-behaviour";
    default: return "launch";
  }
}

namespace {

// The inlining chain of a code address (innermost first), as addr2line prints it: one
// "file:line (function)" per frame, the emulator's own headers left out.
std::vector<std::string> frames(const void* pc) {
  static std::mutex m;
  static std::unordered_map<const void*, std::vector<std::string>> cache;
  std::lock_guard<std::mutex> lock(m);
  if (auto it = cache.find(pc); it != cache.end()) return it->second;
  std::vector<std::string> out;
  Dl_info info;
  if (dladdr(pc, &info) != 0 && info.dli_fname != nullptr) {
    // The call's return address points after the call: look one byte back.
    const auto offset = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
    char cmd[4096];
    std::snprintf(cmd, sizeof cmd, "addr2line -C -f -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                  static_cast<unsigned long>(offset));
    if (FILE* p = popen(cmd, "r")) {
      char fn[2048], loc[2048];
      while (std::fgets(fn, sizeof fn, p) && std::fgets(loc, sizeof loc, p)) {
        fn[std::strcspn(fn, "\n")] = 0;
        loc[std::strcspn(loc, "\n")] = 0;
        std::string l = loc, f = fn;
        if (l.find("??") != std::string::npos || l.find("emulator/include/") != std::string::npos) continue;
        for (const char* dir : {"kernels/", "emulator/"})
          if (auto k = l.find(dir); k != std::string::npos) {
            l = l.substr(k);
            break;
          }
        if (auto d = l.find(" (discriminator"); d != std::string::npos) l = l.substr(0, d);
        if (auto paren = f.find('('); paren != std::string::npos) f = f.substr(0, paren);
        out.push_back(l + " (" + f + ")");
      }
      pclose(p);
    }
  }
  cache[pc] = out;
  return out;
}

}  // namespace

std::string source_line(const void* pc) {
  if (pc == nullptr) return "";
  const std::vector<std::string> f = frames(pc);
  if (f.empty()) return "";
  return f.size() == 1 ? f[0] : f.front() + ", inlined in " + f.back();
}

bool same_source(const void* a, const void* b) {
  if (a == b) return true;
  const std::vector<std::string> fa = frames(a), fb = frames(b);
  return !fa.empty() && fa == fb;
}

void report(Checker c, const void* pc, const std::string& message) {
  std::string line = "rk-emu ";
  line += checker_name(c);
  line += ": ";
  if (Worker* w = current_worker()) {
    ++w->findings;
    const uint32_t printed = ++w->printed[static_cast<int>(c)];
    if (printed > 8) return;  // counted, not printed: the first ones say what is wrong
    if (printed == 8) line += "(further findings of this launch not printed) ";
    char buf[256];
    std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", w->kernel->name, w->block_idx[0],
                  w->block_idx[1], w->block_idx[2]);
    line += buf;
    if (w->current != nullptr) {
      std::snprintf(buf, sizeof buf, ", thread (%u,%u,%u)", w->current->x, w->current->y, w->current->z);
      line += buf;
    }
    line += ": ";
  }
  line += message;
  if (const std::string at = source_line(pc); !at.empty()) line += " [" + at + "]";
  line += "\n";
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  std::fputs(line.c_str(), stderr);
  if (!config().report_path.empty())
    if (FILE* f = std::fopen(config().report_path.c_str(), "a")) {
      std::fputs(line.c_str(), f);
      std::fclose(f);
    }
}

}  // namespace rk_emu
