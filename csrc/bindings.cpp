// fastgpt._C: pybind11 bindings of the CUDA kernels. No libtorch: Python passes raw data pointers
// (ints), shapes, strides in elements, dtype codes (launchers.h) and the CUDA stream handle.
// Each function validates what it is given (ValueError naming the kernel), runs on `device`,
// and turns a CUDA error into a RuntimeError carrying the kernel name and CUDA's message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <string>

#include "launchers.h"

namespace py = pybind11;

namespace fastgpt {
namespace {

using Strides3 = std::array<int64_t, 3>;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxInt = 2147483647;
constexpr int64_t kMaxSeqlen = int64_t(1) << 30;

template <typename... Args>
void require(bool ok, const char* kernel, Args&&... message) {
    if (ok) return;
    std::ostringstream out;
    out << "fastgpt._C." << kernel << ": ";
    (out << ... << message);
    throw py::value_error(out.str());
}

void check_cuda(cudaError_t err, const char* kernel) {
    if (err == cudaSuccess) return;
    // Clear it too: torch checks cudaGetLastError after its own launches and would raise it there.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("fastgpt._C.") + kernel + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
   public:
    DeviceGuard(int device, const char* kernel) {
        check_cuda(cudaGetDevice(&previous_), kernel);
        if (device != previous_) check_cuda(cudaSetDevice(device), kernel);
        device_ = device;
    }
    ~DeviceGuard() {
        if (device_ != previous_) cudaSetDevice(previous_);
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

   private:
    int previous_ = 0, device_ = 0;
};

DType dtype_of(int code, const char* kernel, bool allow_fp32) {
    require(code == 1 || code == 2 || (allow_fp32 && code == 0), kernel, "unsupported dtype code ", code,
            allow_fp32 ? " (expected 0 fp32, 1 fp16, 2 bf16)" : " (expected 1 fp16 or 2 bf16)");
    return static_cast<DType>(code);
}

const void* ptr(uintptr_t address) { return reinterpret_cast<const void*>(address); }
void* mut_ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }
cudaStream_t stream_of(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// A pointer the kernels read or write 16 bytes at a time, with strides in multiples of 8 elements.
template <size_t N>
void require_vector_ready(uintptr_t address, const std::array<int64_t, N>& strides, const char* kernel,
                          const char* name) {
    require(address != 0, kernel, name, " is a null pointer");
    require(address % 16 == 0, kernel, name, " must be 16-byte aligned");
    for (int64_t s : strides) require(s >= 0 && s % 8 == 0, kernel, name, "'s strides must be multiples of 8 elements");
}

// The attention kernels' shared limits: head dim 64/128, batch and query heads as grid
// dimensions, and GQA groups that divide evenly.
void require_head_layout(const char* kernel, int64_t head_dim, int64_t batch, int64_t heads_q, int64_t heads_kv) {
    require(head_dim == 64 || head_dim == 128, kernel, "head dim must be 64 or 128, got ", head_dim);
    require(batch >= 1 && batch <= kMaxGridYZ, kernel, "batch must be in [1, 65535], got ", batch);
    require(heads_q >= 1 && heads_q <= kMaxGridYZ, kernel, "heads_q must be in [1, 65535], got ", heads_q);
    require(heads_kv >= 1 && heads_q % heads_kv == 0, kernel, "heads_q (", heads_q, ") must be a multiple of heads_kv (",
            heads_kv, ")");
}

// A mask (0 for none) is read at these strides (its last dim's stride is 1): never negative.
template <size_t N>
void require_mask_strides(const char* kernel, uintptr_t mask, const std::array<int64_t, N>& strides) {
    for (int64_t s : strides) require(mask == 0 || s >= 0, kernel, "mask strides must be >= 0");
}

void attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t mask,
               Strides3 stride_mask, int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
               int64_t seqlen_k, int64_t head_dim, Strides3 stride_q, Strides3 stride_k, Strides3 stride_v,
               Strides3 stride_o, bool causal, double scale, int dtype, int device, uintptr_t stream, bool pdl) {
    const char* kernel = "attention";
    const DType type = dtype_of(dtype, kernel, false);
    require_head_layout(kernel, head_dim, batch, heads_q, heads_kv);
    // 2^30, not 2^31: the kernel rounds lengths up to 64-row tiles in int (an expanded k/v of
    // 2^31 - 1 positions made ceil_div overflow and silently skip every key).
    require(seqlen_q >= 1 && seqlen_q <= kMaxSeqlen && seqlen_k >= 1 && seqlen_k <= kMaxSeqlen, kernel,
            "sequence lengths must be in [1, 2^30], got ", seqlen_q, " and ", seqlen_k);
    require_vector_ready(q, stride_q, kernel, "q");
    require_vector_ready(k, stride_k, kernel, "k");
    require_vector_ready(v, stride_v, kernel, "v");
    require_vector_ready(o, stride_o, kernel, "o");
    require(lse % 4 == 0, kernel, "lse must be null or an aligned fp32 pointer");
    require_mask_strides(kernel, mask, stride_mask);
    AttentionParams p{ptr(q), ptr(k), ptr(v), mut_ptr(o), static_cast<float*>(mut_ptr(lse)),
                      static_cast<const uint8_t*>(ptr(mask)), stride_mask[0], stride_mask[1], stride_mask[2],
                      stride_q[0], stride_q[1], stride_q[2], stride_k[0], stride_k[1], stride_k[2],
                      stride_v[0], stride_v[1], stride_v[2], stride_o[0], stride_o[1], stride_o[2],
                      int(batch), int(heads_q), int(heads_kv), int(seqlen_q), int(seqlen_k), int(head_dim),
                      float(scale), causal, type, pdl};
    DeviceGuard guard(device, kernel);
    check_cuda(attention_forward(p, stream_of(stream)), kernel);
}

void decode_attention(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t seqlens, uintptr_t o,
                      uintptr_t o_partial, uintptr_t lse_partial, uintptr_t counters, int64_t num_counters,
                      uintptr_t lse, uintptr_t mask, Strides3 stride_mask, int64_t batch, int64_t heads_q,
                      int64_t heads_kv, int64_t seqlen_q, int64_t max_seqlen, int64_t head_dim, int64_t num_splits,
                      Strides3 stride_q, Strides3 stride_k, Strides3 stride_v, bool causal, double scale, int dtype,
                      int device, uintptr_t stream, bool pdl) {
    const char* kernel = "decode_attention";
    const DType type = dtype_of(dtype, kernel, false);
    require_head_layout(kernel, head_dim, batch, heads_q, heads_kv);
    require(seqlen_q >= 1 && seqlen_q <= kMaxSeqlen, kernel, "seqlen_q must be in [1, 2^30], got ", seqlen_q);
    require(max_seqlen >= 1 && max_seqlen <= kMaxSeqlen, kernel, "max_seqlen must be in [1, 2^30], got ",
            max_seqlen);
    require(num_splits >= 1 && num_splits <= 64, kernel, "num_splits must be in [1, 64], got ", num_splits);
    // Flat (row, head, query) rows index the outputs and the combine kernel's grid in int.
    const int64_t rows = batch * heads_q * seqlen_q;  // < 2^62: batch and heads_q < 2^16, seqlen_q <= 2^30
    require(rows <= kMaxInt && rows * num_splits <= kMaxInt, kernel,
            "batch * heads_q * seqlen_q * num_splits is too large");
    require(decode_tiles(int(heads_q), int(heads_kv), int(seqlen_q)) <= kMaxGridYZ, kernel,
            "too many (query head, query) tiles for the grid: heads_kv * ceil(heads_q / heads_kv * seqlen_q / 8) "
            "must be <= 65535, got heads_q ", heads_q, ", heads_kv ", heads_kv, ", seqlen_q ", seqlen_q);
    require_vector_ready(q, stride_q, kernel, "q");
    require_vector_ready(k_cache, stride_k, kernel, "k_cache");
    require_vector_ready(v_cache, stride_v, kernel, "v_cache");
    require(seqlens != 0 && seqlens % 4 == 0, kernel, "cache_seqlens must be a non-null, aligned int32 pointer");
    require(o != 0 && o % 2 == 0, kernel, "o must be a valid output");
    require(num_splits == 1 || (o_partial != 0 && lse_partial != 0 && o_partial % 4 == 0 && lse_partial % 4 == 0),
            kernel, "num_splits > 1 needs the fp32 workspaces o_partial and lse_partial");
    require(counters == 0 || (counters % 4 == 0 && num_counters >= rows), kernel,
            "counters must be null or an aligned int32 array of at least batch * heads_q * seqlen_q = ", rows,
            " zeros, got ", num_counters);
    require(lse % 4 == 0, kernel, "lse must be null or an aligned fp32 pointer");
    require_mask_strides(kernel, mask, stride_mask);
    DecodeParams p{ptr(q), ptr(k_cache), ptr(v_cache), static_cast<const int32_t*>(ptr(seqlens)), mut_ptr(o),
                   static_cast<float*>(mut_ptr(o_partial)), static_cast<float*>(mut_ptr(lse_partial)),
                   static_cast<int32_t*>(mut_ptr(counters)), static_cast<float*>(mut_ptr(lse)),
                   static_cast<const uint8_t*>(ptr(mask)), stride_mask[0], stride_mask[1], stride_mask[2],
                   stride_q[0], stride_q[1], stride_q[2], stride_k[0], stride_k[1], stride_k[2], stride_v[0],
                   stride_v[1], stride_v[2], int(batch), int(heads_q), int(heads_kv), int(seqlen_q), int(max_seqlen),
                   int(head_dim), int(num_splits), float(scale), causal, type, pdl};
    DeviceGuard guard(device, kernel);
    check_cuda(decode_attention_forward(p, stream_of(stream)), kernel);
}

int num_splits(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t max_seqlen,
               int64_t sm_count, int64_t blocks_per_sm) {
    const char* kernel = "decode_num_splits";
    require(batch >= 1 && heads_kv >= 1 && heads_q >= heads_kv && heads_q % heads_kv == 0 && seqlen_q >= 1 &&
                max_seqlen >= 1 && sm_count >= 1 && batch <= kMaxInt && heads_q <= kMaxInt &&
                seqlen_q <= kMaxInt && max_seqlen <= kMaxInt && sm_count <= 1 << 20,
            kernel, "invalid shapes");
    require(blocks_per_sm >= 1 && blocks_per_sm <= 1024, kernel, "blocks_per_sm must be in [1, 1024], got ",
            blocks_per_sm);
    return decode_num_splits(int(batch), int(heads_q), int(heads_kv), int(seqlen_q), int(max_seqlen), int(sm_count),
                             int(blocks_per_sm));
}

int blocks_per_sm(int dtype, int64_t head_dim, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, bool masked,
                  int device) {
    const char* kernel = "decode_blocks_per_sm";
    const DType type = dtype_of(dtype, kernel, false);
    require_head_layout(kernel, head_dim, 1, heads_q, heads_kv);
    require(seqlen_q >= 1 && seqlen_q <= kMaxSeqlen, kernel, "seqlen_q must be in [1, 2^30], got ", seqlen_q);
    DeviceGuard guard(device, kernel);
    int blocks = 0;
    check_cuda(decode_blocks_per_sm(type, int(head_dim), int(heads_q), int(heads_kv), int(seqlen_q), masked, &blocks),
               kernel);
    return blocks;
}

void layer_norm(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t h,
                int64_t rows, int64_t cols, int64_t stride_x, int64_t stride_r, int64_t stride_y, int64_t stride_h,
                double eps, int dtype, int weight_dtype, int bias_dtype, int device, uintptr_t stream, bool pdl) {
    const char* kernel = "layer_norm";
    const DType type = dtype_of(dtype, kernel, true);
    const DType wtype = dtype_of(weight_dtype, kernel, true), btype = dtype_of(bias_dtype, kernel, true);
    require(rows >= 1 && rows <= kMaxInt, kernel, "rows must be in [1, 2^31), got ", rows);
    require(cols >= 1 && cols <= kMaxInt, kernel, "cols must be in [1, 2^31), got ", cols);
    require(x != 0 && y != 0, kernel, "x and y must be non-null");
    require((residual == 0) == (h == 0), kernel, "residual and h must be given together");
    require(stride_x >= 0 && stride_r >= 0 && stride_y >= 0 && stride_h >= 0, kernel, "strides must be >= 0");
    require(eps >= 0, kernel, "eps must be >= 0, got ", eps);
    LayerNormParams p{ptr(x), ptr(residual), ptr(weight), ptr(bias), mut_ptr(y), mut_ptr(h),
                      stride_x, stride_r, stride_y, stride_h, rows, cols, float(eps), type, wtype, btype, pdl};
    DeviceGuard guard(device, kernel);
    check_cuda(layer_norm_forward(p, stream_of(stream)), kernel);
}

void sample(uintptr_t logits, uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p,
            uintptr_t seed, uintptr_t out, uintptr_t workspace, int64_t cand_k, bool bounded, int64_t batch,
            int64_t vocab, int64_t stride_logits, int dtype, int device, uintptr_t stream, bool pdl) {
    const char* kernel = "sample";
    const DType type = dtype_of(dtype, kernel, true);
    require(batch >= 1 && batch <= kMaxInt, kernel, "batch must be in [1, 2^31), got ", batch);
    // The top-p weights are 2^-40 fixed point summed in 64 bits: V < 2^24 keeps the sum exact.
    require(vocab >= 1 && vocab < (int64_t(1) << 24), kernel, "vocab must be in [1, 2^24), got ", vocab);
    require(stride_logits >= 0, kernel, "stride_logits must be >= 0");
    require(logits != 0 && temperature != 0 && top_k != 0 && top_p != 0 && min_p != 0 && seed != 0 && out != 0, kernel,
            "null pointer");
    require(cand_k == 0 || (cand_k >= 16 && cand_k <= 256 && (cand_k & (cand_k - 1)) == 0), kernel,
            "cand_k must be 0 or a power of two in [16, 256], got ", cand_k);
    require(cand_k == 0 || (workspace != 0 && workspace % 16 == 0), kernel,
            "the candidate path needs its workspace, 16-byte aligned (null or misaligned pointer)");
    require(cand_k == 0 || batch * sample_candidate_chunks(int(vocab)) <= kMaxInt, kernel,
            "batch x vocabulary chunks must be < 2^31 on the candidate path, got batch ", batch);
    SampleParams p{ptr(logits),
                   static_cast<const float*>(ptr(temperature)),
                   static_cast<const int64_t*>(ptr(top_k)),
                   static_cast<const double*>(ptr(top_p)),
                   static_cast<const float*>(ptr(min_p)),
                   static_cast<const int64_t*>(ptr(seed)),
                   static_cast<int64_t*>(mut_ptr(out)),
                   mut_ptr(workspace),
                   int(cand_k),
                   bounded,
                   stride_logits,
                   int(batch),
                   int(vocab),
                   type,
                   pdl};
    DeviceGuard guard(device, kernel);
    check_cuda(sample_forward(p, stream_of(stream)), kernel);
}

}  // namespace
}  // namespace fastgpt

#ifndef FASTGPT_CUDA_ARCHS
#define FASTGPT_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(_C, m) {
    using namespace fastgpt;
    m.doc() = "fastgpt CUDA kernels (pointer-level API; call through fastgpt.ops, not directly)";
    m.attr("cuda_version") = CUDART_VERSION;
    m.attr("archs") = FASTGPT_CUDA_ARCHS;
    m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"),
          py::arg("mask"), py::arg("stride_mask"), py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"),
          py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("head_dim"), py::arg("stride_q"), py::arg("stride_k"),
          py::arg("stride_v"), py::arg("stride_o"), py::arg("causal"), py::arg("scale"), py::arg("dtype"),
          py::arg("device"), py::arg("stream"), py::arg("pdl"),
          "Prefill attention (FlashAttention-2 style); strides are (batch, head, seq) in elements; lse: 0, or "
          "(batch, heads_q, seqlen_q) fp32 contiguous for each row's log-sum-exp (natural log); mask: 0, or bool "
          "(batch, heads_q, seqlen_q, seqlen_k) at stride_mask (batch, head, query; keys at stride 1), 0 hiding a "
          "key from a query; pdl: launch as a programmatic dependent (sm_90 code).");
    m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("seqlens"), py::arg("o"), py::arg("o_partial"), py::arg("lse_partial"), py::arg("counters"),
          py::arg("num_counters"), py::arg("lse"), py::arg("mask"), py::arg("stride_mask"), py::arg("batch"),
          py::arg("heads_q"), py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("max_seqlen"), py::arg("head_dim"),
          py::arg("num_splits"), py::arg("stride_q"), py::arg("stride_k"), py::arg("stride_v"), py::arg("causal"),
          py::arg("scale"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("pdl"),
          "Split-KV decode attention of seqlen_q queries a row, the row's last positions (causal: query i sees "
          "positions <= len - seqlen_q + i); q/cache strides are (batch, head, seq); o: (batch, heads_q, seqlen_q, "
          "head_dim) contiguous; counters (0 or num_counters int32 zeros): the last split to finish merges (one "
          "launch); lse: 0, or (batch, heads_q, seqlen_q) fp32 contiguous for each query's log-sum-exp (natural "
          "log); mask: 0, or bool (batch, heads_q, seqlen_q, max_seqlen) at stride_mask (batch, head, query; "
          "positions at stride 1), 0 hiding a position; pdl: launch as programmatic dependents (sm_90 code).");
    m.def("decode_num_splits", &num_splits, py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"),
          py::arg("seqlen_q"), py::arg("max_seqlen"), py::arg("sm_count"), py::arg("blocks_per_sm"),
          "How many KV splits decode_attention uses for these shapes on a GPU of sm_count SMs holding "
          "blocks_per_sm split blocks each.");
    m.def("decode_blocks_per_sm", &blocks_per_sm, py::arg("dtype"), py::arg("head_dim"), py::arg("heads_q"),
          py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("masked"), py::arg("device"),
          "Split blocks of decode_attention (with a mask, or without) that one SM of the device holds at once "
          "(CUDA's occupancy).");
    m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"),
          py::arg("y"), py::arg("h"), py::arg("rows"), py::arg("cols"), py::arg("stride_x"), py::arg("stride_r"),
          py::arg("stride_y"), py::arg("stride_h"), py::arg("eps"), py::arg("dtype"), py::arg("weight_dtype"),
          py::arg("bias_dtype"), py::arg("device"), py::arg("stream"), py::arg("pdl"),
          "Residual add + LayerNorm; residual/h/weight/bias may be 0 (absent); strides are row strides; "
          "pdl: launch as a programmatic dependent (sm_90 code).");
    m.def("sample", &sample, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
          py::arg("min_p"), py::arg("seed"), py::arg("out"), py::arg("workspace"), py::arg("cand_k"),
          py::arg("bounded"), py::arg("batch"), py::arg("vocab"), py::arg("stride_logits"), py::arg("dtype"),
          py::arg("device"), py::arg("stream"), py::arg("pdl"),
          "Fused temperature/top-k/top-p/min-p sampling, greedy where temperature <= 0; cand_k > 0: the "
          "candidate path, with sample_workspace_bytes(batch, vocab, cand_k) bytes of workspace (bounded: "
          "each row's k-th best key bounded first); pdl: launch as programmatic dependents (sm_90 code).");
    m.def("sample_workspace_bytes", &sample_workspace_bytes, py::arg("batch"), py::arg("vocab"), py::arg("cand_k"),
          "Bytes of workspace the sampler's candidate path takes (0 for cand_k 0).");
}
