// Paged decode attention for XLA:CPU, an XLA FFI custom call (vLLM's PagedAttention, as a CPU kernel).
//
// Same semantics as `lwjax.kernels.reference.decode_attention`: the newest q_tokens queries of each sequence
// attend causally over its keys/values, which live in pages of per-layer pools found through a page table,
// optionally within a sliding window (Mistral; pages before every query's window are not read) and with
// soft-capped scores (Gemma-2).
// XLA has no fused gather-matmul on CPU, so the plain-JAX form copies every row's pages out of the pool before
// its two matmuls (three passes over the keys and values); this kernel reads each key and value page once, in
// place, for every query head of its KV head and every new token (one pass, online softmax).
//
// Work is split over (sequence, KV head) pairs on XLA's intra-op thread pool: the calling thread and one task
// fewer than the pool has threads (the pool has one per core; one more thread than cores only took turns with
// the others). The calling thread waits only for pairs another thread has claimed, never for a task that has not
// started, so the call cannot deadlock when every pool thread is busy.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
  int64_t window;  // a query at position i sees keys j > i - window; 0: no window
  float softcap;   // scores s -> softcap * tanh(s / softcap); 0: no cap
};

// The first float of a row's `slot`-th page in one head's pool (a table entry is clamped into the pool: a bad
// entry reads a wrong page, never outside the pool).
inline const float* PagePtr(const Problem& p, const float* head, const int32_t* row_table, int64_t slot) {
  const int64_t page = std::clamp<int64_t>(row_table[slot], 0, p.num_pages - 1);
  return head + page * p.page_size * p.dim;
}

// Pages are scattered through the pool and the hardware prefetcher does not follow a row into its next one:
// the kernel asks for pages ahead of their use.
inline void Prefetch(const float* page, int64_t floats) {
  const char* bytes = reinterpret_cast<const char*>(page);
  for (int64_t offset = 0; offset < floats * 4; offset += 64) __builtin_prefetch(bytes + offset);
}

// exp(x) for x <= 0 (a score minus the maximum), vectorisable (libm's expf is a scalar call: one per key
// per query head was a third of the kernel's time): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6
// Taylor polynomial (relative error < 2e-7 on that range), 2^n put in the exponent bits. Below -87, 0.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 in two parts
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  int32_t bits;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  std::memcpy(&bits, &poly, sizeof(bits));
  bits += exponent - (127 << 23);
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// tanh(x), vectorisable (libm's tanhf is a scalar call): Eigen's rational approximation (`ptanh_float`, a
// degree-13 odd over a degree-6 even polynomial on [-7.9, 7.9], where tanh rounds to +-1 in float beyond),
// within a few ulp; x itself below 4e-4.
inline float Tanh(float x) {
  const float clamped = std::clamp(x, -7.90531110763549805f, 7.90531110763549805f);
  const float x2 = clamped * clamped;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return std::fabs(x) < 4e-4f ? x : clamped * p / q;
}

// A page's scores (q, keys, n, scale -> score[n]) and its weighted values (values, weights, n -> acc += ...).
using PageScoresFn = void (*)(const float*, const float*, int64_t, float, float*);
using PageValuesFn = void (*)(const float*, const float*, int64_t, float*);

#if defined(__AVX512F__)
// AVX-512 code for head sizes of 16 x kChunks (32, 64, 128), which the models use; other sizes and CPUs without
// AVX-512 take the generic loops of `AttendOne`. The generic loops sum each key's dot product horizontally
// (GCC spills the vector and adds its 16 lanes one by one) and load and store the value accumulator once per
// key; here 16 keys' dot products are summed together by a tree of shuffles into one vector of 16 scores,
// and the accumulator stays in registers through a page.

// One vector whose lane j is the sum of the 16 lanes of v[j].
inline __m512 SumEachOf16(const __m512* v) {
  __m512 half[8], quarter[4], lane_sums[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-1 hold v[2i]'s partial sums, lanes 2-3 v[2i + 1]'s
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane L holds key 4i + L's four partial sums
    const __m512 a = half[2 * i], b = half[2 * i + 1];
    quarter[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; ++i) {  // element pairs: lane L, floats (2e, 2e+1) -> keys 4(2i) + L and 4(2i+1) + L
    const __m512 a = quarter[2 * i], b = quarter[2 * i + 1];
    lane_sums[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  const __m512d lo = _mm512_castps_pd(lane_sums[0]), hi = _mm512_castps_pd(lane_sums[1]);
  const __m512 sums = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  // Lane 4L + e of `sums` is key 4e + L; put key j in lane j.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// score[j] = scale * q . key j for the n <= page_size keys of one page (keys past n are never read).
template <int kChunks>
void PageScores(const float* q, const float* keys, int64_t n, float scale, float* score) {
  __m512 query[kChunks];
  for (int c = 0; c < kChunks; ++c) query[c] = _mm512_loadu_ps(q + 16 * c);
  for (int64_t first = 0; first < n; first += 16) {
    const int64_t count = std::min<int64_t>(16, n - first);
    __m512 dots[16];
    for (int j = 0; j < 16; ++j) {
      __m512 dot = _mm512_setzero_ps();
      if (j < count) {
        const float* key = keys + (first + j) * 16 * kChunks;
        for (int c = 0; c < kChunks; ++c) dot = _mm512_fmadd_ps(query[c], _mm512_loadu_ps(key + 16 * c), dot);
      }
      dots[j] = dot;
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
    _mm512_mask_storeu_ps(score + first, valid, _mm512_mul_ps(SumEachOf16(dots), _mm512_set1_ps(scale)));
  }
}

// acc += sum_j weight[j] * value j over the n values of one page, the accumulator in registers.
template <int kChunks>
void PageValues(const float* values, const float* weight, int64_t n, float* acc) {
  __m512 sum[kChunks];
  for (int c = 0; c < kChunks; ++c) sum[c] = _mm512_loadu_ps(acc + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    const __m512 w = _mm512_set1_ps(weight[j]);
    const float* value = values + j * 16 * kChunks;
    for (int c = 0; c < kChunks; ++c) sum[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(value + 16 * c), sum[c]);
  }
  for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + 16 * c, sum[c]);
}

// The AVX-512 page functions for this head size, or nullptrs (the generic loops).
inline std::pair<PageScoresFn, PageValuesFn> FastPath(int64_t dim) {
  switch (dim) {
    case 32: return {PageScores<2>, PageValues<2>};
    case 64: return {PageScores<4>, PageValues<4>};
    case 128: return {PageScores<8>, PageValues<8>};
    default: return {nullptr, nullptr};
  }
}
#else
inline std::pair<PageScoresFn, PageValuesFn> FastPath(int64_t) { return {nullptr, nullptr}; }
#endif

constexpr int64_t kPrefetchPages = 2;  // how far ahead of the page being read

// Per-thread scratch of `AttendOne`, kept across the (sequence, KV head) items a thread takes.
struct Scratch {
  std::vector<float> scores, max, sum, acc;
  std::vector<int64_t> keys, first;  // each query sees keys [first, keys)
};

// One (sequence, KV head): every query head of the group and every new token at once, in a single pass over
// the row's pages with an online softmax (flash attention's running maximum and sum). Each key and value page
// is read once for all of them, and its values while its keys are still in cache: the scores of one page, the
// rescale of what was summed so far when the maximum grows, then that page's weighted values.
void AttendOne(const Problem& p, int64_t b, int64_t kvh, Scratch& s) {
  const int64_t groups = p.heads / p.kv_heads;
  const int64_t queries = p.q_tokens * groups;  // query index: token * groups + group
  const int64_t length = p.lengths[b];
  const int32_t* row_table = p.table + b * p.max_pages;
  const int64_t page_floats = p.page_size * p.dim;
  const float* k_head = p.k + kvh * p.num_pages * page_floats;
  const float* v_head = p.v + kvh * p.num_pages * page_floats;
  s.keys.resize(queries);
  s.first.resize(queries);
  s.max.assign(queries, -std::numeric_limits<float>::infinity());
  s.sum.assign(queries, 0.0f);
  s.acc.assign(queries * p.dim, 0.0f);
  s.scores.resize((p.page_size + 15) / 16 * 16);  // the AVX-512 path stores scores 16 at a time (masked)
  int64_t most_keys = 0, fewest_skipped = std::numeric_limits<int64_t>::max();
  for (int64_t t = 0; t < p.q_tokens; ++t) {
    // The query's absolute position: it sees keys first..position (first = 0 without a window).
    const int64_t position = length - p.q_tokens + t;
    const int64_t keys = std::clamp<int64_t>(position + 1, 0, p.max_pages * p.page_size);
    const int64_t first = p.window > 0 ? std::clamp<int64_t>(position + 1 - p.window, 0, keys) : 0;
    for (int64_t g = 0; g < groups; ++g) s.keys[t * groups + g] = keys, s.first[t * groups + g] = first;
    most_keys = std::max(most_keys, keys);
    fewest_skipped = std::min(fewest_skipped, first);
  }
  const int64_t pages = (most_keys + p.page_size - 1) / p.page_size;
  const int64_t first_page = p.q_tokens > 0 ? fewest_skipped / p.page_size : 0;
  // Keys are asked for kPrefetchPages pages ahead of their use, values one page less (they are read later).
  for (int64_t slot = first_page; slot < std::min(pages, first_page + kPrefetchPages); ++slot) {
    Prefetch(PagePtr(p, k_head, row_table, slot), page_floats);
    if (slot + 1 < first_page + kPrefetchPages) Prefetch(PagePtr(p, v_head, row_table, slot), page_floats);
  }
  float* score = s.scores.data();
  const auto [fast_scores, fast_values] = FastPath(p.dim);
  for (int64_t slot = first_page; slot < pages; ++slot) {
    if (slot + kPrefetchPages < pages) Prefetch(PagePtr(p, k_head, row_table, slot + kPrefetchPages), page_floats);
    if (slot + kPrefetchPages - 1 < pages) {
      Prefetch(PagePtr(p, v_head, row_table, slot + kPrefetchPages - 1), page_floats);
    }
    const float* page_keys = PagePtr(p, k_head, row_table, slot);
    const float* page_values = PagePtr(p, v_head, row_table, slot);
    const int64_t first = slot * p.page_size;
    for (int64_t query = 0; query < queries; ++query) {
      // The query's keys on this page: slots [begin, begin + n).
      const int64_t begin = std::max<int64_t>(s.first[query] - first, 0);
      const int64_t n = std::min(p.page_size, s.keys[query] - first) - begin;
      if (n <= 0) continue;
      const float* k_page = page_keys + begin * p.dim;
      const float* v_page = page_values + begin * p.dim;
      const int64_t h = kvh * groups + query % groups;
      const float* q = p.q + ((b * p.q_tokens + query / groups) * p.heads + h) * p.dim;
      if (fast_scores != nullptr) {
        fast_scores(q, k_page, n, p.scale, score);
      } else {
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {  // four keys at once: four independent sums, q read once for them
          const float *k0 = k_page + i * p.dim, *k1 = k0 + p.dim, *k2 = k1 + p.dim, *k3 = k2 + p.dim;
          float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
          for (int64_t d = 0; d < p.dim; ++d) {
            d0 += q[d] * k0[d];
            d1 += q[d] * k1[d];
            d2 += q[d] * k2[d];
            d3 += q[d] * k3[d];
          }
          score[i] = d0 * p.scale, score[i + 1] = d1 * p.scale, score[i + 2] = d2 * p.scale;
          score[i + 3] = d3 * p.scale;
        }
        for (; i < n; ++i) {
          const float* key = k_page + i * p.dim;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < p.dim; ++d) dot += q[d] * key[d];
          score[i] = dot * p.scale;
        }
      }
      if (p.softcap > 0.0f) {
        const float cap = p.softcap, inverse_cap = 1.0f / p.softcap;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) score[j] = cap * Tanh(score[j] * inverse_cap);
      }
      float page_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) page_max = std::max(page_max, score[j]);
      float* acc = s.acc.data() + query * p.dim;
      const float new_max = std::max(s.max[query], page_max);
      if (new_max > s.max[query] && s.sum[query] > 0.0f) {  // what was summed under the old maximum shrinks
        const float correction = ExpNonPositive(s.max[query] - new_max);
        s.sum[query] *= correction;
#pragma omp simd
        for (int64_t d = 0; d < p.dim; ++d) acc[d] *= correction;
      }
      s.max[query] = new_max;
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        score[j] = ExpNonPositive(score[j] - new_max);
        total += score[j];
      }
      s.sum[query] += total;
      if (fast_values != nullptr) {
        fast_values(v_page, score, n, acc);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const float* value = v_page + j * p.dim;
          const float weight = score[j];
#pragma omp simd
          for (int64_t d = 0; d < p.dim; ++d) acc[d] += weight * value[d];
        }
      }
    }
  }
  for (int64_t query = 0; query < queries; ++query) {
    const int64_t h = kvh * groups + query % groups;
    float* out = p.out + ((b * p.q_tokens + query / groups) * p.heads + h) * p.dim;
    const float* acc = s.acc.data() + query * p.dim;
    if (s.keys[query] <= s.first[query]) {  // no visible key (padding): zeros, as the reference
      std::fill(out, out + p.dim, 0.0f);
      continue;
    }
    const float inverse = 1.0f / s.sum[query];
#pragma omp simd
    for (int64_t d = 0; d < p.dim; ++d) out[d] = acc[d] * inverse;
  }
}

struct Shared {
  Problem problem;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Shared& s) {
  Scratch scratch;
  for (int64_t i = s.next.fetch_add(1); i < s.items; i = s.next.fetch_add(1)) {
    AttendOne(s.problem, i / s.problem.kv_heads, i % s.problem.kv_heads, scratch);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths,
                          float scale, int64_t window, float softcap, ffi::ResultBuffer<ffi::F32> out) {
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
                            kd[2], td[1], scale, window, softcap};
  if (window < 0 || softcap < 0.0f) {
    return ffi::Error::InvalidArgument("paged_attention: window and softcap must be positive (0: none)");
  }
  if (qd[3] != kd[3] || qd[2] % kd[0] != 0 || td[0] != qd[0] || lengths.element_count() != qd[0]) {
    return ffi::Error::InvalidArgument("paged_attention: head dims, GQA groups, or the batch of q, page_table "
                                       "and lengths do not match");
  }
  shared->items = qd[0] * kd[0];
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, shared->items - 1);
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
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
