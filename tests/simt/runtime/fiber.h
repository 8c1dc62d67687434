// Fibers for the SIMT emulator (simt.h): a stack and a saved context per emulated CUDA thread,
// switched cooperatively on one OS thread.
#pragma once

#include <cstddef>
#include <vector>

#if !defined(__x86_64__) || defined(SIMT_UCONTEXT)
#define SIMT_USE_UCONTEXT 1
#include <ucontext.h>
#endif

// The memcheck build (build.py's sanitize=True): AddressSanitizer is told of every switch.
#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif

namespace simt {

// A suspended fiber (or the scheduler while a fiber runs).
struct Context {
#if defined(SIMT_USE_UCONTEXT)
    ucontext_t uc;
#else
    void* sp;  // the stack pointer it was suspended at; its registers are saved on its stack
#endif
#if defined(SIMT_ASAN)
    // The stack it runs on, which ASan must know to check accesses to it and to clean up at a
    // noreturn call: a fiber's from make_context, an OS thread's learnt at its first switch.
    const void* stack_base = nullptr;
    size_t stack_size = 0;
    void* fake_stack = nullptr;  // ASan's own, while suspended (detect_stack_use_after_return)
    void (*entry)() = nullptr;
#endif
};

// Makes `context` start entry() on the stack [base, base + size) when first switched to.
// entry must never return (it ends with exit_context).
void make_context(Context& context, void* base, size_t size, void (*entry)());

// Saves the running context into `from` and resumes `to`.
void switch_context(Context& from, Context& to);

// Resumes `to` and never comes back: the running fiber has ended and `from` is never resumed.
[[noreturn]] void exit_context(Context& from, Context& to);

// Fiber stacks of kStackBytes, each above a guard page (an overflow faults instead of writing
// into the next stack), mapped on first use and reused by every later block on this OS thread.
class StackPool {
   public:
    static constexpr size_t kStackBytes = 256 * 1024;
    StackPool() = default;
    StackPool(const StackPool&) = delete;
    StackPool& operator=(const StackPool&) = delete;
    ~StackPool();
    void* stack(size_t i);  // the lowest address of stack i

   private:
    std::vector<void*> mappings_;
};

}  // namespace simt
