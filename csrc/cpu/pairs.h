// Per-offset (source row, destination row) lists compacted from a kernel map.
//
// For a forward map (transposed = false) the source is the input row
// nbmap[o, k] and the destination the output row o; for transposed = true the
// roles swap.  Entries are validated against the number of rows they index
// (`n_indexed`), so a corrupt map raises instead of reading out of bounds.
#pragma once

#include <atomic>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

namespace sparseconv {

struct Pairs {
  std::vector<int64_t> start;  // [K + 1]
  std::vector<int32_t> src, dst;

  int64_t count(int64_t k) const { return start[k + 1] - start[k]; }
  int64_t max_count() const {
    int64_t mx = 0;
    for (size_t k = 0; k + 1 < start.size(); ++k) mx = std::max(mx, start[k + 1] - start[k]);
    return mx;
  }
  // True when offset k maps every row to itself over same-sized operands
  // (the centre of a submanifold kernel): then no gather/scatter is needed.
  bool is_identity(int64_t k, int64_t n_src, int64_t n_dst) const {
    const int64_t nk = count(k);
    if (nk != n_src || nk != n_dst) return false;
    const int32_t* s = src.data() + start[k];
    const int32_t* d = dst.data() + start[k];
    for (int64_t j = 0; j < nk; ++j) {
      if (s[j] != j || d[j] != j) return false;
    }
    return true;
  }
};

inline Pairs make_pairs(const int32_t* map, int64_t m, int64_t kvol, bool transposed, int64_t n_indexed,
                        const char* op) {
  Pairs p;
  p.start.assign(kvol + 1, 0);
  std::atomic<bool> bad{false};
  at::parallel_for(0, kvol, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      int64_t cnt = 0;
      for (int64_t o = 0; o < m; ++o) {
        const int32_t v = map[o * kvol + k];
        if (v >= 0) {
          ++cnt;
          if (v >= n_indexed) bad = true;
        } else if (v != -1) {
          bad = true;
        }
      }
      p.start[k + 1] = cnt;
    }
  });
  TORCH_CHECK_VALUE(!bad.load(), "sparseconv.", op, ": kernel map entries must be -1 or row indices below ", n_indexed,
                    "; the map does not belong to these features");
  for (int64_t k = 0; k < kvol; ++k) p.start[k + 1] += p.start[k];
  p.src.resize(p.start[kvol]);
  p.dst.resize(p.start[kvol]);
  at::parallel_for(0, kvol, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      int64_t j = p.start[k];
      for (int64_t o = 0; o < m; ++o) {
        const int32_t v = map[o * kvol + k];
        if (v < 0) continue;
        p.src[j] = transposed ? static_cast<int32_t>(o) : v;
        p.dst[j] = transposed ? v : static_cast<int32_t>(o);
        ++j;
      }
    }
  });
  return p;
}

}  // namespace sparseconv
