// The undefined-behaviour checks of the kernel code: the entry points of GCC's
// -fsanitize=alignment,bounds,... instrumentation (no sanitizer runtime is linked). A null or
// misaligned pointer, an access through a pointer too small for its type and a local array
// indexed out of range are memcheck findings that stop the launch, as do unreachable code and a
// variable-length array bound that is not positive; signed overflow, a division by zero, a
// shift out of range and a load of an invalid value are reported and the kernel goes on.
#include <cstdint>
#include <string>

#include "../include/rk_emu.h"
#include "emu.h"

// ---- undefined behaviour (GCC's -fsanitize=alignment,bounds,... ABI) ------------------------------------
namespace {

struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
struct TypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation loc;
  const TypeDescriptor* type;
  unsigned char log_alignment, type_check_kind;
};
struct LocAndType {
  SourceLocation loc;
  const TypeDescriptor* type;
};
struct OutOfBoundsData {
  SourceLocation loc;
  const TypeDescriptor* array_type;
  const TypeDescriptor* index_type;
};
struct ShiftData {
  SourceLocation loc;
  const TypeDescriptor* lhs;
  const TypeDescriptor* rhs;
};

std::string where(const SourceLocation& l) {
  std::string f = l.file ? l.file : "?";
  if (auto k = f.find("kernels/"); k != std::string::npos) f = f.substr(k);
  return " [" + f + ":" + std::to_string(l.line) + "]";
}

void undefined(const SourceLocation& l, const std::string& what, bool fatal, int error) {
  if (rk_emu::current_worker() == nullptr) return;
  rk_emu::report(fatal ? rk_emu::Checker::Memcheck : rk_emu::Checker::Undefined, nullptr, what + where(l));
  if (fatal) rk_emu::abort_fiber(error);
}

}  // namespace

extern "C" {
void __ubsan_handle_type_mismatch_v1(TypeMismatchData* d, uintptr_t ptr) {
  const uintptr_t align = uintptr_t{1} << d->log_alignment;
  if (!rk_emu::config().memcheck) return;
  if (ptr == 0) {
    undefined(d->loc, std::string("null pointer dereference (") + d->type->name + ")", true, 700);
  } else if (ptr & (align - 1)) {
    undefined(d->loc,
              "misaligned address " + rk_emu::hex(ptr) + " for " + d->type->name + ", which needs " +
                  std::to_string(align) + "-byte alignment",
              true, 716);
  } else {
    undefined(d->loc, std::string("access through a pointer too small for ") + d->type->name, true, 700);
  }
}
void __ubsan_handle_out_of_bounds(OutOfBoundsData* d, uintptr_t index) {
  if (!rk_emu::config().memcheck) return;
  undefined(d->loc,
            "index " + std::to_string(static_cast<long long>(index)) + " out of bounds of a local " +
                d->array_type->name,
            true, 700);
}
void __ubsan_handle_add_overflow(LocAndType* d, uintptr_t, uintptr_t) {
  undefined(d->loc, std::string("signed overflow in an addition of ") + d->type->name, false, 0);
}
void __ubsan_handle_sub_overflow(LocAndType* d, uintptr_t, uintptr_t) {
  undefined(d->loc, std::string("signed overflow in a subtraction of ") + d->type->name, false, 0);
}
void __ubsan_handle_mul_overflow(LocAndType* d, uintptr_t, uintptr_t) {
  undefined(d->loc, std::string("signed overflow in a multiplication of ") + d->type->name, false, 0);
}
void __ubsan_handle_negate_overflow(LocAndType* d, uintptr_t) {
  undefined(d->loc, std::string("signed overflow in a negation of ") + d->type->name, false, 0);
}
void __ubsan_handle_divrem_overflow(LocAndType* d, uintptr_t, uintptr_t) {
  undefined(d->loc, std::string("integer division by zero or overflow (") + d->type->name + ")", false, 0);
}
void __ubsan_handle_shift_out_of_bounds(ShiftData* d, uintptr_t, uintptr_t) {
  undefined(d->loc, std::string("shift out of range (") + d->lhs->name + " by " + d->rhs->name + ")", false, 0);
}
void __ubsan_handle_load_invalid_value(LocAndType* d, uintptr_t) {
  undefined(d->loc, std::string("load of an invalid ") + d->type->name, false, 0);
}
void __ubsan_handle_builtin_unreachable(LocAndType* d) {
  undefined(d->loc, "unreachable code reached", true, 715);
}
void __ubsan_handle_vla_bound_not_positive(LocAndType* d, uintptr_t) {
  undefined(d->loc, "variable-length array bound not positive", true, 715);
}
}
