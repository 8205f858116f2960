// Lane-packing tables for 8-lane vector kernels (AVX2 compaction by _mm256_permutevar8x32_epi32).
//
// Contract: PackTable8<Order>::lanes[m] lists, for the 8-bit mask m of selected lanes, the selected
// lanes in the order of the elements they hold (element e sits in lane Order::lane(e)), then
// zeros.  Loaded as 8 bytes and widened to 32-bit indices, it is the permute that packs a step's
// selected elements to the front in element order.  Plain C++ (constexpr), usable from any
// translation unit whatever its target flags.
#pragma once

#include <cstdint>

namespace sparseconv {
namespace cpu {

// Element e in lane e.
struct LanesInOrder {
  static constexpr int lane(int e) { return e; }
};

template <typename Order>
struct PackTable8 {
  uint8_t lanes[256][8];
  constexpr PackTable8() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int out = 0;
      for (int e = 0; e < 8; ++e) {
        const int lane = Order::lane(e);
        if ((m >> lane) & 1) lanes[m][out++] = static_cast<uint8_t>(lane);
      }
    }
  }
};

}  // namespace cpu
}  // namespace sparseconv
