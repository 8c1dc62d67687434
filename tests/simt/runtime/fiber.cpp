// Context switching for the emulator's fibers. On x86-64 a dozen instructions save the callee-saved
// registers and the SSE/x87 control words on the old stack and load them from the new one: no
// system call, unlike swapcontext (which sets the signal mask each time), and a kernel's warp
// collectives switch 64 times each. Elsewhere, ucontext. In the memcheck build every switch is
// announced to AddressSanitizer, which otherwise takes a fiber's stack for a wild memory area.
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if defined(SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace simt {

#if defined(SIMT_USE_UCONTEXT)

namespace {

void raw_make_context(Context& context, void* base, size_t size, void (*entry)()) {
    getcontext(&context.uc);
    context.uc.uc_stack.ss_sp = base;
    context.uc.uc_stack.ss_size = size;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, entry, 0);
}

void raw_switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace

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

namespace {

// The initial stack mirrors what simt_switch pops: control words, r15..r12, rbx = entry, rbp,
// then the return address simt_fiber_start. After that `ret` the stack pointer is 16-byte
// aligned, as the ABI wants before simt_fiber_start's call.
void raw_make_context(Context& context, void* base, size_t size, void (*entry)()) {
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

void raw_switch_context(Context& from, Context& to) { simt_switch(&from.sp, to.sp); }

}  // namespace

#endif

#if defined(SIMT_ASAN)
namespace {

// ASan's protocol: __sanitizer_start_switch_fiber names the stack about to run, just before the
// switch; __sanitizer_finish_switch_fiber, the first thing done on the other side, completes it and
// tells the stack that was left: that is how an OS thread's own stack (the scheduler's) is learnt.
thread_local Context* t_from = nullptr;  // the contexts of the switch in progress
thread_local Context* t_to = nullptr;

void finish_switch(void* fake_stack) {
    const void* base = nullptr;
    size_t size = 0;
    __sanitizer_finish_switch_fiber(fake_stack, &base, &size);
    t_from->stack_base = base;
    t_from->stack_size = size;
}

// Every fiber's first code in the memcheck build.
void start_fiber() {
    Context& self = *t_to;
    finish_switch(nullptr);
    self.entry();
}

}  // namespace
#endif

void make_context(Context& context, void* base, size_t size, void (*entry)()) {
#if defined(SIMT_ASAN)
    context.stack_base = base;
    context.stack_size = size;
    context.fake_stack = nullptr;
    context.entry = entry;
    // A reused stack may hold the poisoned redzones of frames that never returned (a faulted
    // block's threads): a new fiber starts on clean memory.
    ASAN_UNPOISON_MEMORY_REGION(base, size);
    raw_make_context(context, base, size, start_fiber);
#else
    raw_make_context(context, base, size, entry);
#endif
}

void switch_context(Context& from, Context& to) {
#if defined(SIMT_ASAN)
    __sanitizer_start_switch_fiber(&from.fake_stack, to.stack_base, to.stack_size);
    t_from = &from;
    t_to = &to;
    raw_switch_context(from, to);
    finish_switch(from.fake_stack);
#else
    raw_switch_context(from, to);
#endif
}

void exit_context(Context& from, Context& to) {
#if defined(SIMT_ASAN)
    __sanitizer_start_switch_fiber(nullptr, to.stack_base, to.stack_size);  // nullptr: frees the fake stack
    t_from = &from;
    t_to = &to;
#endif
    raw_switch_context(from, to);
    std::abort();  // an ended fiber is never resumed
}

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
