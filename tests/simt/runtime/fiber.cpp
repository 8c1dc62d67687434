// Context switching for the emulator's fibers. On x86-64 a dozen instructions save the callee-saved
// registers and the SSE/x87 control words on the old stack and load them from the new one: no
// system call, unlike swapcontext (which sets the signal mask each time), and a kernel's warp
// collectives switch 64 times each. Elsewhere, ucontext.
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace simt {

#if defined(SIMT_USE_UCONTEXT)

void make_context(Context& context, void* base, size_t size, void (*entry)()) {
    getcontext(&context.uc);
    context.uc.uc_stack.ss_sp = base;
    context.uc.uc_stack.ss_size = size;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#else

extern "C" {
// void simt_switch(void** save_sp, void* load_sp): pushes rbp, rbx, r12-r15 and the MXCSR/x87
// control words, stores rsp in *save_sp, then pops the same from load_sp and returns there.
void simt_switch(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));
// A new fiber's first return address: calls the entry function held in rbx, which never returns.
void simt_fiber_start() __attribute__((visibility("hidden")));
}

asm(R"(
    .text
    .globl simt_switch
    .hidden simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch

    .globl simt_fiber_start
    .hidden simt_fiber_start
    .type simt_fiber_start, @function
simt_fiber_start:
    call *%rbx
    ud2
    .size simt_fiber_start, .-simt_fiber_start
)");

// The initial stack mirrors what simt_switch pops: control words, r15..r12, rbx = entry, rbp,
// then the return address simt_fiber_start. After that `ret` the stack pointer is 16-byte
// aligned, as the ABI wants before simt_fiber_start's call.
void make_context(Context& context, void* base, size_t size, void (*entry)()) {
    uint64_t* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t(15));
    uint64_t* sp = top - 8;
    uint32_t mxcsr;
    uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    sp[0] = uint64_t(mxcsr) | (uint64_t(fpcw) << 32);  // the caller's rounding and denormal modes
    sp[1] = sp[2] = sp[3] = sp[4] = 0;                  // r15, r14, r13, r12
    sp[5] = reinterpret_cast<uint64_t>(entry);          // rbx
    sp[6] = 0;                                          // rbp
    sp[7] = reinterpret_cast<uint64_t>(&simt_fiber_start);
    context.sp = sp;
}

void switch_context(Context& from, Context& to) { simt_switch(&from.sp, to.sp); }

#endif

StackPool::~StackPool() {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    for (void* m : mappings_) munmap(m, kStackBytes + page);
}

void* StackPool::stack(size_t i) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    while (mappings_.size() <= i) {
        void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED || mprotect(m, page, PROT_NONE) != 0) {
            std::fprintf(stderr, "SIMT emulator: cannot map a fiber stack\n");
            std::abort();
        }
        mappings_.push_back(m);
    }
    return static_cast<char*>(mappings_[i]) + page;
}

}  // namespace simt
