// Launches for the SIMT emulator: the grid's blocks one after another, and within a block the
// scheduler that runs its threads as fibers until they all return (simt.h has the model).
#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "fiber.h"
#include "runtime.h"

#if defined(SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#endif

// csrc's kernels declare their dynamic shared memory as `extern __shared__ unsigned char
// smem_raw[]` in namespace fastgpt; with __shared__ = thread_local, that names this array.
namespace fastgpt {
alignas(16) thread_local unsigned char smem_raw[simt::kMaxDynamicSmem];
}

namespace simt {
namespace {

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Thread {
    Context context;
    uint3 idx;
    int warp, lane;
    State state;
    const char* op;      // the barrier or collective it waits at
    int barrier_result;  // __syncthreads_or's answer, set as the barrier opens
    AsyncCopies copies;  // its cp.async copies in flight
};

struct Warp {
    int lanes;    // 32, fewer in the last warp of a block whose size is not a multiple of 32
    int arrived;  // lanes waiting in the collective `op`
    int exited;
    const char* op;
    Combine combine;
    Slot in[kWarpSize], out[kWarpSize];
};

// The block running on this OS thread.
struct Block {
    KernelBody body;
    const void* kernel;
    size_t dynamic_smem;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<int> order;  // the order of the current sweep
    int live, at_barrier, barrier_or;
    Thread* current;  // the running thread; nullptr while the scheduler runs
    Context scheduler;
    bool faulted;
    cudaError_t fault_error;
    std::string fault_message;
};

thread_local Block t_block;
thread_local Block* t_running = nullptr;  // &t_block during a launch
thread_local StackPool t_stacks;

// ----------------------------------------------------------------------------- run order

// FASTGPT_SIMT_SCHEDULE: the order in which each sweep of the scheduler resumes a block's threads.
struct Schedule {
    enum Kind { kForward, kReverse, kRandom } kind = kForward;
    uint64_t seed = 0, state = 0;

    // False (with `error` set) for a value that is none of forward, reverse, random:<seed>.
    bool parse(const char* text, std::string& error) {
        const std::string s = text ? text : "";
        if (s.empty() || s == "forward") return kind = kForward, true;
        if (s == "reverse") return kind = kReverse, true;
        char* end = nullptr;
        if (s.rfind("random:", 0) == 0) {
            seed = std::strtoull(s.c_str() + 7, &end, 0);
            if (end != s.c_str() + 7 && *end == '\0') return kind = kRandom, true;
        }
        error = "FASTGPT_SIMT_SCHEDULE must be forward, reverse or random:<seed>, got '" + s + "'";
        return false;
    }

    uint64_t next() {  // splitmix64
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }

    // The first sweep's order of a block of n threads; `block` (its linear index) seeds random.
    void start(std::vector<int>& order, int n, uint64_t block) {
        order.resize(n);
        for (int i = 0; i < n; ++i) order[i] = kind == kReverse ? n - 1 - i : i;
        state = seed ^ (block * 0xD1B54A32D192ED03ull);
    }

    void next_sweep(std::vector<int>& order) {
        if (kind != kRandom) return;
        for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[next() % (i + 1)]);
    }

    // The blocks' order: the linear index (x fastest, then y, then z) of the i-th of n blocks to run.
    // Random is an affine permutation, i -> (a i + c) mod n with a prime to n, drawn from the seed:
    // no table, for grids of any size.
    struct BlockOrder {
        uint64_t n, a = 1, c = 0;
        bool reverse = false;
        uint64_t operator[](uint64_t i) const {
            return reverse ? n - 1 - i : uint64_t((unsigned __int128)a * i % n + c) % n;
        }
    };
    BlockOrder blocks(uint64_t n) {
        BlockOrder order{n};
        order.reverse = kind == kReverse;
        if (kind == kRandom && n > 1) {
            state = seed ^ 0x6A09E667F3BCC909ull;
            order.c = next() % n;
            order.a = next() % n | 1;
            while (std::gcd(order.a, n) != 1) order.a = (order.a + 2) % n;
        }
        return order;
    }
};

// ----------------------------------------------------------------------------- faults

std::string format(const char* fmt, va_list args) {
    va_list copy;
    va_copy(copy, args);
    const int n = std::vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    std::string s(size_t(n > 0 ? n : 0), '\0');
    std::vsnprintf(s.data(), s.size() + 1, fmt, args);
    return s;
}

std::string where(const Block& b, const Thread* t) {
    char buf[160];
    std::snprintf(buf, sizeof buf, " block (%u, %u, %u)", blockIdx.x, blockIdx.y, blockIdx.z);
    std::string s = kernel_name(b.kernel) + buf;
    if (t != nullptr) {
        std::snprintf(buf, sizeof buf, " thread (%u, %u, %u)", t->idx.x, t->idx.y, t->idx.z);
        s += buf;
    }
    return s + ": ";
}

// "threads 0-63: at __syncthreads; threads 64-95: at the warp collective __shfl_xor_sync; ..."
std::string describe_deadlock(const Block& b) {
    auto what = [](const Thread& t) -> std::string {
        switch (t.state) {
            case State::kBarrier: return std::string("at ") + t.op;
            case State::kWarp: return std::string("at the warp collective ") + t.op;
            case State::kDone: return "returned";
            default: return "ready";
        }
    };
    std::string s = "deadlock, no thread can run:";
    const int n = int(b.threads.size());
    for (int first = 0; first < n;) {
        int last = first;
        while (last + 1 < n && what(b.threads[last + 1]) == what(b.threads[first])) ++last;
        const std::string who = first == last ? "thread " + std::to_string(first)
                                              : "threads " + std::to_string(first) + "-" + std::to_string(last);
        s += (first > 0 ? "; " : " ") + who + ": " + what(b.threads[first]);
        first = last + 1;
    }
    return s;
}

// ----------------------------------------------------------------------------- threads

Block& running_block(const char* op) {
    if (t_running == nullptr || t_running->current == nullptr) {
        std::fprintf(stderr, "SIMT emulator: %s called outside a kernel\n", op);
        std::abort();
    }
    return *t_running;
}

// The running thread gives the OS thread back to the scheduler until resumed.
void yield(Block& b, Thread& t) { switch_context(t.context, b.scheduler); }

// The running thread gives the OS thread back to the scheduler for good (it returned or faulted).
[[noreturn]] void leave(Block& b, Thread& t) { exit_context(t.context, b.scheduler); }

void open_barrier(Block& b) {
    for (Thread& t : b.threads) {
        if (t.state != State::kBarrier) continue;
        t.state = State::kReady;
        t.barrier_result = b.barrier_or;
    }
    b.at_barrier = 0;
    b.barrier_or = 0;
}

[[noreturn]] void exit_thread(Block& b) {
    Thread& t = *b.current;
    Warp& w = b.warps[t.warp];
    if (w.arrived > 0)
        fault(cudaErrorLaunchFailure, "returned while %d lane(s) of its warp wait for it at %s", w.arrived, w.op);
    ptx::check_landed(t.copies);
    t.state = State::kDone;
    --b.live;
    ++w.exited;
    if (b.at_barrier > 0 && b.at_barrier == b.live) open_barrier(b);  // it no longer counts
    leave(b, t);
}

// Every fiber starts here.
void thread_main() {
    Block& b = *t_running;
    b.body.run(b.body.closure);
    exit_thread(b);
}

void start_threads(Block& b, Schedule& schedule, uint64_t block_index) {
    const int n = int(blockDim.x * blockDim.y * blockDim.z);
    b.threads.resize(n);
    b.warps.resize((n + kWarpSize - 1) / kWarpSize);
    for (int i = 0; i < n; ++i) {
        Thread& t = b.threads[i];
        t.idx = uint3{i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
        t.warp = i / kWarpSize;
        t.lane = i % kWarpSize;
        t.state = State::kReady;
        t.op = nullptr;
        t.barrier_result = 0;
        t.copies = AsyncCopies{};  // a thread's copies left in flight when it returned never land
        make_context(t.context, t_stacks.stack(i), StackPool::kStackBytes, thread_main);
    }
    for (size_t w = 0; w < b.warps.size(); ++w) {
        b.warps[w].lanes = std::min(kWarpSize, n - int(w) * kWarpSize);
        b.warps[w].arrived = b.warps[w].exited = 0;
    }
    b.live = n;
    b.at_barrier = b.barrier_or = 0;
    b.current = nullptr;
    b.faulted = false;
    schedule.start(b.order, n, block_index);
}

// Runs the block's threads until all have returned: sweeps over them in the schedule's order,
// resuming each ready one until it waits again. False on a fault or a deadlock.
bool run_block(Block& b, Schedule& schedule, uint64_t block_index) {
    start_threads(b, schedule, block_index);
    std::memset(fastgpt::smem_raw, 0xFF, b.dynamic_smem);  // NaN in any float type: unwritten reads show
    for (;;) {
        schedule.next_sweep(b.order);
        bool ran = false;
        for (int i : b.order) {
            Thread& t = b.threads[i];
            if (t.state != State::kReady) continue;
            b.current = &t;
            threadIdx = t.idx;
            switch_context(b.scheduler, t.context);
            b.current = nullptr;
            ran = true;
            if (b.faulted) return false;
        }
        if (b.live == 0) return true;
        if (!ran) {
            b.fault_error = cudaErrorLaunchFailure;
            b.fault_message = where(b, nullptr) + describe_deadlock(b);
            return false;
        }
    }
}

// In the memcheck build, smem_raw past the launch's dynamic shared memory is poisoned: a kernel
// that reads or writes beyond what it was launched with gets an AddressSanitizer report.
void fence_dynamic_smem(size_t bytes) {
#if defined(SIMT_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(fastgpt::smem_raw, bytes);
    ASAN_POISON_MEMORY_REGION(fastgpt::smem_raw + bytes, kMaxDynamicSmem - bytes);
#else
    (void)bytes;
#endif
}

// cudaErrorInvalidConfiguration for what CUDA refuses to launch; cudaSuccess otherwise.
cudaError_t validate(const cudaLaunchConfig_t& c, const void* kernel) {
    if (kernel == nullptr) return cudaErrorInvalidDeviceFunction;
    if (c.numAttrs > 0 && c.attrs == nullptr) return cudaErrorInvalidValue;
    const dim3 b = c.blockDim, g = c.gridDim;
    const uint64_t threads = uint64_t(b.x) * b.y * b.z;
    const bool block_ok =
        b.x >= 1 && b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024;
    const bool grid_ok = g.x >= 1 && g.x <= 0x7FFFFFFFu && g.y >= 1 && g.y <= 65535 && g.z >= 1 && g.z <= 65535;
    const bool smem_ok = c.dynamicSmemBytes <= size_t(max_dynamic_smem(kernel));
    return block_ok && grid_ok && smem_ok ? cudaSuccess : cudaErrorInvalidConfiguration;
}

}  // namespace

// ----------------------------------------------------------------------------- simt.h

void fault(int error, const char* fmt, ...) {
    Block& b = running_block("simt::fault");
    {  // the strings are freed before the thread leaves: its frames are never unwound
        va_list args;
        va_start(args, fmt);
        const std::string message = format(fmt, args);
        va_end(args);
        b.fault_message = where(b, b.current) + message;
    }
    b.faulted = true;
    b.fault_error = static_cast<cudaError_t>(error);
    leave(b, *b.current);  // a faulted launch never resumes its threads
}

int sync_block(int predicate, const char* op) {
    Block& b = running_block(op);
    Thread& t = *b.current;
    t.state = State::kBarrier;
    t.op = op;
    b.barrier_or |= predicate != 0;
    if (++b.at_barrier == b.live) open_barrier(b);
    yield(b, t);
    return t.barrier_result;
}

void warp_exchange(const char* op, unsigned mask, Combine combine, const Slot& in, Slot& out) {
    Block& b = running_block(op);
    Thread& t = *b.current;
    Warp& w = b.warps[t.warp];
    if (mask != kFullMask)
        fault(cudaErrorLaunchFailure, "%s with mask 0x%08x: only the full mask is emulated", op, mask);
    if (w.lanes != kWarpSize) fault(cudaErrorLaunchFailure, "%s in a warp of %d threads, not 32", op, w.lanes);
    if (w.exited > 0) fault(cudaErrorLaunchFailure, "%s while %d lane(s) of the warp have returned", op, w.exited);
    if (w.arrived == 0) {
        w.op = op;
        w.combine = combine;
    } else if (w.combine != combine || std::strcmp(w.op, op) != 0) {
        fault(cudaErrorLaunchFailure, "lanes of warp %d meet at different collectives: %s and %s", t.warp, w.op, op);
    }
    w.in[t.lane] = in;
    t.state = State::kWarp;
    t.op = op;
    if (++w.arrived == kWarpSize) {  // the last lane computes everyone's result
        w.combine(w.in, w.out);
        w.arrived = 0;
        for (int lane = 0; lane < kWarpSize; ++lane) b.threads[t.warp * kWarpSize + lane].state = State::kReady;
    }
    yield(b, t);
    out = w.out[t.lane];  // safe: no lane can start the warp's next collective before this one reads
}

AsyncCopies& async_copies() { return running_block("cp.async").current->copies; }

void check_shared(const void* p, size_t bytes, const char* op) {
    const Block& b = running_block(op);
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < fastgpt::smem_raw || c >= fastgpt::smem_raw + kMaxDynamicSmem) return;  // static shared memory
    if (c + bytes > fastgpt::smem_raw + b.dynamic_smem)
        fault(cudaErrorIllegalAddress, "%s at byte %td of dynamic shared memory, past the %zu bytes launched", op,
              c - fastgpt::smem_raw, b.dynamic_smem);
}

// ----------------------------------------------------------------------------- cuda_runtime_api.h

cudaError_t launch(const cudaLaunchConfig_t& config, const void* kernel, KernelBody body) {
    if (t_running != nullptr) return report(cudaErrorNotSupported, "a kernel launched a kernel: not emulated");
    if (const cudaError_t err = validate(config, kernel); err != cudaSuccess) return record_error(err);
    Schedule schedule;
    std::string error;
    if (!schedule.parse(std::getenv("FASTGPT_SIMT_SCHEDULE"), error)) return report(cudaErrorInvalidValue, error);

    Block& b = t_block;
    b.body = body;
    b.kernel = kernel;
    b.dynamic_smem = config.dynamicSmemBytes;
    fence_dynamic_smem(b.dynamic_smem);
    gridDim = config.gridDim;
    blockDim = config.blockDim;
    t_running = &b;
    const uint64_t plane = uint64_t(gridDim.x) * gridDim.y, n = plane * gridDim.z;
    const Schedule::BlockOrder order = schedule.blocks(n);
    for (uint64_t i = 0; i < n; ++i) {
        const uint64_t index = order[i];
        blockIdx = uint3{unsigned(index % gridDim.x), unsigned(index % plane / gridDim.x), unsigned(index / plane)};
        if (!run_block(b, schedule, index)) {
            t_running = nullptr;
            return report(b.fault_error, b.fault_message);
        }
    }
    t_running = nullptr;
    return cudaSuccess;
}

}  // namespace simt
