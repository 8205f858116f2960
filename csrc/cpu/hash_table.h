// Open-addressing hash table over int64 keys for the CPU kernels: the shared
// layout and lookup (../hash_table_common.h) plus a thread-safe insert.
#pragma once

#include <cstdint>

#include "../hash_table_common.h"

namespace sparseconv {
namespace cpu {

using sparseconv::mix64;
using sparseconv::table_capacity;
using sparseconv::table_find;

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

}  // namespace cpu
}  // namespace sparseconv
