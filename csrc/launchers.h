// Host-side interface between bindings.cpp (host compiler) and the .cu files (nvcc): one
// parameter struct and one launch function per op. Launch functions enqueue work on `stream`
// and return the CUDA error of the launch (cudaSuccess when all is well); they never sync.
// Shapes are validated by bindings.cpp before a launch; strides are in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastgpt {

// dtype codes shared with fastgpt/ops/_cuda.py
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct AttentionParams {
    const void* q;  // (B, Hq, Sq, D)
    const void* k;  // (B, Hkv, Sk, D)
    const void* v;  // (B, Hkv, Sk, D)
    void* o;        // (B, Hq, Sq, D)
    float* lse;     // (B, Hq, Sq) contiguous: each row's log-sum-exp (natural log), or nullptr
    // nullptr, or bool (B, Hq, Sq, Sk) with unit key stride (strides 0 broadcast): 0 hides key j from query i
    const uint8_t* mask;
    int64_t stride_mask_b, stride_mask_h, stride_mask_s;
    int64_t stride_q_b, stride_q_h, stride_q_s;
    int64_t stride_k_b, stride_k_h, stride_k_s;
    int64_t stride_v_b, stride_v_h, stride_v_s;
    int64_t stride_o_b, stride_o_h, stride_o_s;
    int batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
    float scale;
    bool causal;
    DType dtype;  // fp16 or bf16
    bool pdl;     // launch as a programmatic dependent (csrc/common.cuh's launch_kernel)
};
cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream);

struct DecodeParams {
    const void* q;            // (B, Hq, Sq, D): query i of row b stands at cache position len_b - Sq + i
    const void* k_cache;      // (B, Hkv, Smax, D)
    const void* v_cache;      // (B, Hkv, Smax, D)
    const int32_t* seqlens;   // (B,) valid positions per row, clamped to [0, Smax] on the device
    void* o;                  // (B, Hq, Sq, D) contiguous
    float* o_partial;         // (B, Hq, Sq, num_splits, D) fp32 workspace; unused when num_splits == 1
    float* lse_partial;       // (B, Hq, Sq, num_splits) fp32 workspace; unused when num_splits == 1
    // nullptr, or B * Hq * Sq zeros (a tile of (head, query) rows counts at its first row): the last
    // split of a tile to finish merges the tile's splits (no combine kernel) and zeroes its counter again.
    int32_t* counters;
    float* lse;  // nullptr, or (B, Hq, Sq) fp32 contiguous: each query's natural-log log-sum-exp, -inf if empty
    // nullptr, or bool (B, Hq, Sq, Smax) with unit position stride (strides 0 broadcast): 0 hides a position
    const uint8_t* mask;
    int64_t stride_mask_b, stride_mask_h, stride_mask_s;
    int64_t stride_q_b, stride_q_h, stride_q_s;
    int64_t stride_k_b, stride_k_h, stride_k_s;
    int64_t stride_v_b, stride_v_h, stride_v_s;
    int batch, heads_q, heads_kv, seqlen_q, max_seqlen, head_dim, num_splits;
    float scale;
    bool causal;  // query i sees positions j <= len_b - Sq + i (else every j < len_b); the same when Sq == 1
    DType dtype;  // fp16 or bf16
    bool pdl;     // launch as programmatic dependents (csrc/common.cuh's launch_kernel)
};
cudaError_t decode_attention_forward(const DecodeParams& p, cudaStream_t stream);
// Split-kernel blocks of decode_attention_forward per (split, row): the tiles of (query head, query)
// pairs over the kv heads.
int64_t decode_tiles(int heads_q, int heads_kv, int seqlen_q);
// Blocks of decode_attention_forward's split kernel for these settings that one SM of the current
// device holds at once.
cudaError_t decode_blocks_per_sm(DType dtype, int head_dim, int heads_q, int heads_kv, int seqlen_q, bool masked,
                                 int* blocks);
// The num_splits decode_attention_forward expects for these shapes on a GPU of sm_count SMs that
// hold blocks_per_sm split blocks each (decode_blocks_per_sm).
int decode_num_splits(int batch, int heads_q, int heads_kv, int seqlen_q, int max_seqlen, int sm_count,
                      int blocks_per_sm);

struct LayerNormParams {
    const void* x;         // (M, N), row stride stride_x
    const void* residual;  // (M, N) or nullptr
    const void* weight;    // (N,) contiguous, dtype weight_dtype, or nullptr
    const void* bias;      // (N,) contiguous, dtype bias_dtype, or nullptr
    void* y;               // (M, N) LN(h)
    void* h;               // (M, N) x + residual; nullptr when residual is nullptr
    int64_t stride_x, stride_r, stride_y, stride_h;
    int64_t rows, cols;
    float eps;
    DType dtype, weight_dtype, bias_dtype;
    bool pdl;  // launch as a programmatic dependent (csrc/common.cuh's launch_kernel)
};
cudaError_t layer_norm_forward(const LayerNormParams& p, cudaStream_t stream);

struct SampleParams {
    const void* logits;        // (B, V), row stride stride_logits
    const float* temperature;  // (B,)
    const int64_t* top_k;      // (B,)
    const double* top_p;       // (B,)
    const float* min_p;        // (B,)
    const int64_t* seed;       // (1,)
    int64_t* out;              // (B,)
    // The candidate path when cand_k > 0 (a power of two in [16, 256], above every row's top_k
    // bound), with sample_workspace_bytes(B, V, cand_k) bytes of workspace, 16-byte aligned;
    // bounded: each row's k-th best key bounded from below first (two launches more).
    void* workspace;
    int cand_k;
    bool bounded;
    int64_t stride_logits;
    int batch, vocab;
    DType dtype;
    bool pdl;  // launch as programmatic dependents (csrc/common.cuh's launch_kernel)
};
cudaError_t sample_forward(const SampleParams& p, cudaStream_t stream);
// Vocabulary chunks per row on the candidate path, and the bytes of its workspace (0 for cand_k 0).
int sample_candidate_chunks(int vocab);
size_t sample_workspace_bytes(int batch, int vocab, int cand_k);

}  // namespace fastgpt
