// The built-ins of kernel code (rk_emu.h): the thread's and block's coordinates, block
// barriers, warp shuffles and votes, and traps. They run on the calling thread's fiber; the
// waiting ones hand control back to the scheduler (simt.cpp), which completes the barrier or
// the collective once every thread or lane it needs has arrived.
#include <string>

#include "../include/rk_emu.h"
#include "emu.h"

using rk_emu::Fiber;
using rk_emu::worker;

extern "C" {

uint3 rk_emu_thread_idx(void) {
  const Fiber* f = worker().current;
  return uint3{f->x, f->y, f->z};
}

uint3 rk_emu_block_idx(void) {
  const auto& w = worker();
  return uint3{w.block_idx[0], w.block_idx[1], w.block_idx[2]};
}

dim3 rk_emu_block_dim(void) {
  const auto& w = worker();
  return dim3{w.block[0], w.block[1], w.block[2]};
}

dim3 rk_emu_grid_dim(void) {
  const auto& w = worker();
  return dim3{w.grid[0], w.grid[1], w.grid[2]};
}

int rk_emu_syncthreads(int kind, int predicate) {
  auto& w = worker();
  Fiber* f = w.current;
  f->state = Fiber::State::Barrier;
  f->bar_kind = kind;
  f->bar_pred = predicate;
  f->site = __builtin_return_address(0);
  rk_emu::yield(w);
  return static_cast<int>(f->result);
}

unsigned long long rk_emu_shfl(int kind, unsigned mask, unsigned long long value, int arg, int width) {
  auto& w = worker();
  Fiber* f = w.current;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    rk_emu::report(rk_emu::Checker::Synccheck, __builtin_return_address(0),
                   "warp shuffle with width " + std::to_string(width) + " (must be a power of two up to 32)");
    rk_emu::abort_fiber(719);
  }
  f->state = Fiber::State::Warp;
  f->coll_kind = kind;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->site = __builtin_return_address(0);
  rk_emu::yield(w);
  return f->result;
}

unsigned rk_emu_vote(int kind, unsigned mask, int predicate) {
  auto& w = worker();
  Fiber* f = w.current;
  f->state = Fiber::State::Warp;
  f->coll_kind = 10 + kind;
  f->mask = mask;
  f->value = static_cast<unsigned long long>(predicate != 0);
  f->width = 32;
  f->site = __builtin_return_address(0);
  rk_emu::yield(w);
  return static_cast<unsigned>(f->result);
}

void rk_emu_trap(const char* what) {
  rk_emu::report(rk_emu::Checker::Launch, __builtin_return_address(0), std::string(what) + " executed");
  rk_emu::abort_fiber(715);  // CUDA_ERROR_ILLEGAL_INSTRUCTION
}

}  // extern "C"
