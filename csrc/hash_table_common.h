// The coordinate hash table shared by the CPU and CUDA kernels: capacity rule,
// splitmix64 finaliser and linear probing, written once for host and device,
// so a table built on either device answers queries on either device.
//
// Layout: keys [cap] int64 (kEmptyKey = -1 marks a free slot), cap a power of
// two >= 16 and >= 2 x the number of keys; a key's probe sequence starts at
// mix64(key) & (cap - 1).  Every probe loop is bounded by cap, so a full table
// is reported (-1), never an endless loop.  Insertion needs atomics and lives
// with each backend (cpu/hash_table.h, cuda/common.cuh).
#pragma once

#include <cstdint>

#include "coords.h"

namespace sparseconv {

SPARSECONV_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

inline int64_t table_capacity(int64_t n) {
  int64_t cap = 16;
  while (cap < 2 * n) cap <<= 1;
  return cap;
}

// Lookup after the build has finished.  Returns the slot or -1.
SPARSECONV_HD int64_t table_find(const int64_t* keys, int64_t cap, int64_t key) {
  const uint64_t mask = static_cast<uint64_t>(cap) - 1;
  uint64_t slot = mix64(static_cast<uint64_t>(key)) & mask;
  for (int64_t probe = 0; probe < cap; ++probe) {
    const int64_t k = keys[slot];
    if (k == key) return static_cast<int64_t>(slot);
    if (k == kEmptyKey) return -1;
    slot = (slot + 1) & mask;
  }
  return -1;
}

}  // namespace sparseconv
