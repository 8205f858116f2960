// Stable LSD radix sort of (key, value) pairs for the CPU kernels, parallel over the threads of
// at::parallel_for (each chunk is histogrammed and scattered by one thread, so the result is
// stable and independent of the thread count).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
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

// Grows `v` to at least n elements (never shrinks, never reinitialises kept capacity).
template <typename T>
T* scratch(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Sorts keys[0, n) ascending (stable), permuting values alongside, using key_tmp / value_tmp
// (n elements each) as scratch.  Only the low `bits` bits are examined; passes in which every
// key has the same digit are skipped.  The sorted data ends in keys / values.
// max_digit_bits: the widest digit (11: a histogram stays in L1; wider digits mean fewer passes,
// worth it when n is large against 2^digit).
template <typename K, typename V>
void radix_sort_pairs(K* keys, V* values, K* key_tmp, V* value_tmp, int64_t n, int bits,
                      std::vector<int64_t>& hist, int max_digit_bits = 11) {
  if (n < 2 || bits <= 0) return;
  const int passes = (bits + max_digit_bits - 1) / max_digit_bits;
  const int digit = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit;
  const int64_t mask = buckets - 1;
  // One chunk (no parallel region) below 2^15 keys: too little work to wait for other threads.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n >> 15));
  const int64_t chunk_len = (n + chunks - 1) / chunks;
  int64_t* h_all = scratch(hist, chunks * buckets);
  K* src_k = keys;
  V* src_v = values;
  K* dst_k = key_tmp;
  V* dst_v = value_tmp;
  for (int shift = 0; shift < bits; shift += digit) {
    std::fill(h_all, h_all + chunks * buckets, 0);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t t = cb; t < ce; ++t) {
        int64_t* h = h_all + t * buckets;
        const int64_t end = std::min(n, (t + 1) * chunk_len);
        for (int64_t i = t * chunk_len; i < end; ++i) ++h[(src_k[i] >> shift) & mask];
      }
    });
    const int64_t d0 = (src_k[0] >> shift) & mask;
    int64_t same = 0;
    for (int64_t t = 0; t < chunks; ++t) same += h_all[t * buckets + d0];
    if (same == n) continue;  // one digit value everywhere: nothing moves
    // Exclusive offsets, bucket-major then chunk: chunk t's keys of bucket b follow chunk t-1's.
    int64_t sum = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      for (int64_t t = 0; t < chunks; ++t) {
        const int64_t c = h_all[t * buckets + b];
        h_all[t * buckets + b] = sum;
        sum += c;
      }
    }
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t t = cb; t < ce; ++t) {
        int64_t* h = h_all + t * buckets;
        const int64_t end = std::min(n, (t + 1) * chunk_len);
        for (int64_t i = t * chunk_len; i < end; ++i) {
          const int64_t pos = h[(src_k[i] >> shift) & mask]++;
          dst_k[pos] = src_k[i];
          dst_v[pos] = src_v[i];
        }
      }
    });
    std::swap(src_k, dst_k);
    std::swap(src_v, dst_v);
  }
  if (src_k != keys) {
    std::copy(src_k, src_k + n, keys);
    std::copy(src_v, src_v + n, values);
  }
}

// Sorts keys[0, n) ascending (stable) by bits [lo_bit, lo_bit + bits) only, one thread, using tmp
// (n elements) as scratch; the sorted data ends in keys.  For a few tens of thousands of keys that
// carry their payload in the low bits: one array moves instead of two, and one pass over the keys
// histograms every digit.  Digits are up to log2(n) bits wide (at most 14), so that a 27-bit key
// of ~33k elements takes two passes instead of three: with n above the number of buckets, each
// pass costs about n writes, scattered or not, while the counts stay in L1/L2 (32-bit counts).
inline void radix_sort_u64(uint64_t* keys, uint64_t* tmp, int64_t n, int lo_bit, int bits,
                           std::vector<uint32_t>& hist) {
  if (n < 2 || bits <= 0) return;
  const int max_digit_bits = std::min(14, std::max(8, bit_width(static_cast<uint64_t>(n)) - 1));
  const int passes = (bits + max_digit_bits - 1) / max_digit_bits;
  const int digit = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit;
  const uint64_t mask = static_cast<uint64_t>(buckets - 1);
  uint32_t* h = scratch(hist, passes * buckets);
  std::fill(h, h + passes * buckets, 0u);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = keys[i] >> lo_bit;
    for (int q = 0; q < passes; ++q) ++h[q * buckets + ((k >> (q * digit)) & mask)];
  }
  uint64_t* src = keys;
  uint64_t* dst = tmp;
  for (int q = 0; q < passes; ++q) {
    uint32_t* hq = h + q * buckets;
    if (hq[(src[0] >> (lo_bit + q * digit)) & mask] == static_cast<uint32_t>(n)) continue;  // one digit value
    uint32_t sum = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      const uint32_t c = hq[b];
      hq[b] = sum;
      sum += c;
    }
    const int shift = lo_bit + q * digit;
    for (int64_t i = 0; i < n; ++i) dst[hq[(src[i] >> shift) & mask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::copy(src, src + n, keys);
}

}  // namespace cpu
}  // namespace sparseconv
