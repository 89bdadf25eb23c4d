// Paged decode attention for XLA:CPU, an XLA FFI custom call (vLLM's PagedAttention, as a CPU kernel).
//
// Same semantics as `lwjax.kernels.reference.decode_attention`: the newest q_tokens queries of each sequence
// attend causally over its keys/values, which live in pages of per-layer pools found through a page table.
// XLA has no fused gather-matmul on CPU, so the plain-JAX form copies every row's pages out of the pool before
// its two matmuls (three passes over the keys and values); this kernel reads each key and value once, in place.
//
// Work is split over (sequence, KV head) pairs on XLA's intra-op thread pool. The calling thread takes pairs
// too and waits only for pairs another thread has claimed, never for a task that has not started, so the call
// cannot deadlock when every pool thread is busy.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;        // [batch, q_tokens, heads, dim]
  const float* k;        // [kv_heads, num_pages, page_size, dim]
  const float* v;
  const int32_t* table;  // [batch, max_pages]
  const int32_t* lengths;  // [batch]
  float* out;            // [batch, q_tokens, heads, dim]
  int64_t batch, q_tokens, heads, dim, kv_heads, num_pages, page_size, max_pages;
  float scale;
};

// The pool page holding key j of a row (clamped into the pool: a bad table entry reads a wrong page, never
// outside the pool). At a page's first key it prefetches the row's next page: pages are scattered, and the
// hardware prefetcher does not cross into them.
inline int64_t PageAt(const Problem& p, const int32_t* row_table, int64_t j, int64_t keys, const float* head) {
  const int64_t slot = j / p.page_size;
  if (j % p.page_size == 0 && (slot + 1) * p.page_size < keys) {
    const int64_t next = std::clamp<int64_t>(row_table[slot + 1], 0, p.num_pages - 1);
    const char* base = reinterpret_cast<const char*>(head + next * p.page_size * p.dim);
    for (int64_t byte = 0; byte < p.page_size * p.dim * 4; byte += 64) __builtin_prefetch(base + byte);
  }
  return std::clamp<int64_t>(row_table[slot], 0, p.num_pages - 1);
}

// One (sequence, KV head): every query head of the group, every new token.
void AttendOne(const Problem& p, int64_t b, int64_t kvh, std::vector<float>& scores) {
  const int64_t groups = p.heads / p.kv_heads;
  const int64_t length = p.lengths[b];
  const int32_t* row_table = p.table + b * p.max_pages;
  const int64_t page_stride = p.page_size * p.dim;
  const float* k_head = p.k + kvh * p.num_pages * page_stride;
  const float* v_head = p.v + kvh * p.num_pages * page_stride;
  for (int64_t t = 0; t < p.q_tokens; ++t) {
    const int64_t position = length - p.q_tokens + t;  // the query's absolute position
    const int64_t keys = std::min<int64_t>(position + 1, p.max_pages * p.page_size);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t h = kvh * groups + g;
      const float* q = p.q + ((b * p.q_tokens + t) * p.heads + h) * p.dim;
      float* out = p.out + ((b * p.q_tokens + t) * p.heads + h) * p.dim;
      if (keys <= 0) {  // no visible key (padding): zeros, as the reference
        std::fill(out, out + p.dim, 0.0f);
        continue;
      }
      scores.resize(keys);
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < keys; ++j) {
        const int64_t page = PageAt(p, row_table, j, keys, k_head);
        const float* key = k_head + page * page_stride + (j % p.page_size) * p.dim;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < p.dim; ++d) dot += q[d] * key[d];
        scores[j] = dot * p.scale;
        max_score = std::max(max_score, scores[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j < keys; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        total += scores[j];
      }
      std::fill(out, out + p.dim, 0.0f);
      for (int64_t j = 0; j < keys; ++j) {
        const int64_t page = PageAt(p, row_table, j, keys, v_head);
        const float* value = v_head + page * page_stride + (j % p.page_size) * p.dim;
        const float weight = scores[j] / total;
#pragma omp simd
        for (int64_t d = 0; d < p.dim; ++d) out[d] += weight * value[d];
      }
    }
  }
}

struct Shared {
  Problem problem;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Shared& s) {
  std::vector<float> scores;
  for (int64_t i = s.next.fetch_add(1); i < s.items; i = s.next.fetch_add(1)) {
    AttendOne(s.problem, i / s.problem.kv_heads, i % s.problem.kv_heads, scores);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths,
                          float scale, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto td = table.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin())) {
    return ffi::Error::InvalidArgument("paged_attention: q [b, t, h, d], pools [kvh, pages, page_size, d], "
                                       "page_table [b, max_pages]");
  }
  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{q.typed_data(), k.typed_data(), v.typed_data(), table.typed_data(),
                            lengths.typed_data(), out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[0], kd[1],
                            kd[2], td[1], scale};
  if (qd[3] != kd[3] || qd[2] % kd[0] != 0 || td[0] != qd[0]) {
    return ffi::Error::InvalidArgument("paged_attention: head dims, GQA groups or batch do not match");
  }
  shared->items = qd[0] * kd[0];
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->items - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared] { Drain(*shared); });  // a task that starts late finds no work and returns
  }
  Drain(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LwjaxPagedAttentionF32, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("sm_scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
