// Fiber context switch for x86-64 (System V): saves the callee-saved registers, the SSE control
// word and the x87 control word on the current stack, stores the stack pointer in *from and
// continues on the stack `to` (made by another rk_emu_switch or by make_stack in simt.cpp).
//
//   void rk_emu_switch(void** from, void* to);
//
// A new fiber's stack holds, from its stack pointer up: the two control words, r15, r14, r13
// (entry function), r12 (its argument), rbx, rbp and the address of rk_emu_fiber_start, which
// calls entry(argument). The entry never returns.
#if defined(__x86_64__)
        .text
        .globl  rk_emu_switch
        .hidden rk_emu_switch
        .type   rk_emu_switch, @function
rk_emu_switch:
        pushq   %rbp
        pushq   %rbx
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        subq    $8, %rsp
        stmxcsr (%rsp)
        fnstcw  4(%rsp)
        movq    %rsp, (%rdi)
        movq    %rsi, %rsp
        ldmxcsr (%rsp)
        fldcw   4(%rsp)
        addq    $8, %rsp
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %rbx
        popq    %rbp
        ret
        .size   rk_emu_switch, .-rk_emu_switch

        .globl  rk_emu_fiber_start
        .hidden rk_emu_fiber_start
        .type   rk_emu_fiber_start, @function
rk_emu_fiber_start:
        movq    %r12, %rdi
        callq   *%r13
        ud2
        .size   rk_emu_fiber_start, .-rk_emu_fiber_start
#endif
        .section .note.GNU-stack,"",@progbits
