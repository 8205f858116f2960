// Stable LSD radix sort of (key, value) pairs for the CPU kernels, parallel over the threads of
// at::parallel_for (each thread histograms and scatters its own contiguous chunk, so the result
// is stable and independent of the thread count).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

namespace sparseconv {
namespace cpu {

inline int bit_width(uint64_t v) {
  int b = 0;
  while (v) {
    ++b;
    v >>= 1;
  }
  return b;
}

// Sorts `keys` ascending (stable) and permutes `values` alongside.  Only the low `bits` bits of
// the keys are examined.  Passes in which every key has the same digit are skipped.
template <typename K, typename V>
void radix_sort_pairs(std::vector<K>& keys, std::vector<V>& values, int bits) {
  const int64_t n = static_cast<int64_t>(keys.size());
  if (n < 2 || bits <= 0) return;
  const int passes = (bits + 10) / 11;  // digits of at most 11 bits: a histogram stays in L1
  const int digit = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit;
  const int64_t mask = buckets - 1;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 16384));
  const int64_t chunk_len = (n + chunks - 1) / chunks;
  std::vector<K> k2(n);
  std::vector<V> v2(n);
  std::vector<int64_t> hist(chunks * buckets);
  for (int shift = 0; shift < bits; shift += digit) {
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t t = cb; t < ce; ++t) {
        int64_t* h = hist.data() + t * buckets;
        const int64_t end = std::min(n, (t + 1) * chunk_len);
        for (int64_t i = t * chunk_len; i < end; ++i) ++h[(keys[i] >> shift) & mask];
      }
    });
    // One digit value everywhere: nothing moves in this pass.
    const int64_t d0 = (keys[0] >> shift) & mask;
    int64_t same = 0;
    for (int64_t t = 0; t < chunks; ++t) same += hist[t * buckets + d0];
    if (same == n) continue;
    // Exclusive offsets, bucket-major then chunk: chunk t's keys of bucket b follow chunk t-1's.
    int64_t sum = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      for (int64_t t = 0; t < chunks; ++t) {
        const int64_t c = hist[t * buckets + b];
        hist[t * buckets + b] = sum;
        sum += c;
      }
    }
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t t = cb; t < ce; ++t) {
        int64_t* h = hist.data() + t * buckets;
        const int64_t end = std::min(n, (t + 1) * chunk_len);
        for (int64_t i = t * chunk_len; i < end; ++i) {
          const int64_t pos = h[(keys[i] >> shift) & mask]++;
          k2[pos] = keys[i];
          v2[pos] = values[i];
        }
      }
    });
    keys.swap(k2);
    values.swap(v2);
  }
}

}  // namespace cpu
}  // namespace sparseconv
