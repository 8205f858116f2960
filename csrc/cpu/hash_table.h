// Open-addressing hash table over int64 keys for the CPU kernels.
// Linear probing from a splitmix64 hash; every probe loop is bounded by the
// capacity, so a full table is reported (return -1), never an endless loop.
#pragma once

#include <cstdint>

#include "../coords.h"

namespace sparseconv {
namespace cpu {

inline uint64_t mix64(uint64_t x) {
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

// Thread-safe insert.  Returns the slot holding `key` and sets *existed when
// the key was already present; returns -1 when the table is full.
inline int64_t table_insert(int64_t* keys, int64_t cap, int64_t key, bool* existed) {
  const uint64_t mask = static_cast<uint64_t>(cap) - 1;
  uint64_t slot = mix64(static_cast<uint64_t>(key)) & mask;
  for (int64_t probe = 0; probe < cap; ++probe) {
    int64_t expected = kEmptyKey;
    if (__atomic_compare_exchange_n(&keys[slot], &expected, key, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      *existed = false;
      return static_cast<int64_t>(slot);
    }
    if (expected == key) {
      *existed = true;
      return static_cast<int64_t>(slot);
    }
    slot = (slot + 1) & mask;
  }
  return -1;
}

// Lookup after the build has finished.  Returns the slot or -1.
inline int64_t table_find(const int64_t* keys, int64_t cap, int64_t key) {
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

}  // namespace cpu
}  // namespace sparseconv
