#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSECONV_VOXELIZE_AVX2 1
#else
#define SPARSECONV_VOXELIZE_AVX2 0
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include "../checks.h"
#include "../coords.h"
#include "../voxelize.h"
#include "gemm_rows.h"
#include "pack_table.h"
#include "radix_sort.h"

namespace sparseconv {

namespace {

using Reduce = VoxelReduce;


// Scratch of sort_voxels.
template <typename K>
struct SortBufs {
  std::vector<uint64_t> packed;
  std::vector<K> skey, skey_tmp;
  std::vector<int32_t> sv, sv_tmp, rank;
  std::vector<uint32_t> hist32;
  std::vector<int64_t> hist;
};

// Voxels 0 .. nv - 1 with keys vkey[v] (lo <= vkey[v] <= lo + max_rel) put in key order:
// sb.skey[r] and sb.sv[r] are the key and the voxel of row r, sb.rank[v] the row of voxel v.
template <typename K>
void sort_voxels(const K* vkey, int64_t nv, K lo, uint64_t max_rel, SortBufs<K>& sb) {
  int32_t* sv = cpu::scratch(sb.sv, nv);
  K* sk = cpu::scratch(sb.skey, nv);
  if (std::is_same<K, uint32_t>::value) {
    // (key, voxel id) packed in one 64-bit word, sorted by the key bits.
    uint64_t* packed = cpu::scratch(sb.packed, 2 * nv);
    for (int64_t v = 0; v < nv; ++v) {
      packed[v] = (static_cast<uint64_t>(static_cast<K>(vkey[v] - lo)) << 32) | static_cast<uint64_t>(v);
    }
    cpu::radix_sort_u64(packed, packed + nv, nv, 32, cpu::bit_width(max_rel), sb.hist32);
    for (int64_t r = 0; r < nv; ++r) {
      sk[r] = static_cast<K>(packed[r] >> 32) + lo;
      sv[r] = static_cast<int32_t>(packed[r] & 0xFFFFFFFFu);
    }
  } else {
    for (int64_t v = 0; v < nv; ++v) {
      sk[v] = vkey[v] - lo;
      sv[v] = static_cast<int32_t>(v);
    }
    cpu::radix_sort_pairs(sk, sv, cpu::scratch(sb.skey_tmp, nv), cpu::scratch(sb.sv_tmp, nv), nv,
                          cpu::bit_width(max_rel), sb.hist, 14);
    if (lo != 0) {
      for (int64_t r = 0; r < nv; ++r) sk[r] += lo;
    }
  }
  int32_t* rk = cpu::scratch(sb.rank, nv);
  for (int64_t r = 0; r < nv; ++r) rk[sv[r]] = static_cast<int32_t>(r);
}

// Scratch of one partition of the voxel keys in the partitioned passes (see voxelize_cpu): its
// points, its own table, its voxels in local first-appearance order, their first points, global ids
// and (padded rows, running reductions) per-voxel data, and the sort of its voxels.
template <typename K>
struct PartBufs {
  std::vector<K> key, table, vkey;
  std::vector<int32_t> idx, vcount, vslot, first, gmap, vpts;
  std::vector<double> accd;
  std::vector<float> accf;
  SortBufs<K> sort;
};

// Scratch buffers of one calling thread (see voxelize_cpu).
struct Workspace {
  std::vector<uint32_t> key32, table32, vkey32;
  std::vector<uint64_t> key64, table64, vkey64;
  std::vector<int32_t> idx, idx_rank, pslot, vpts, vcount, vslot;
  std::vector<int64_t> chunk_valid, chunk_nonfinite;
  std::vector<float> accf;
  std::vector<double> accd;
  std::vector<int32_t> inv_part, inv_local, dense, ridx, vid;
  std::vector<uint32_t> rkey32;
  std::vector<uint64_t> rkey64;
  std::vector<int64_t> seg;
  SortBufs<uint32_t> sort32;
  SortBufs<uint64_t> sort64;
  std::vector<PartBufs<uint32_t>> parts32;
  std::vector<PartBufs<uint64_t>> parts64;
};

// At most this many key ranges in voxelize_cpu's range-split pass.
constexpr int64_t kMaxRanges = 32;

// work(t) for t = 0 .. tasks - 1 on the intra-op threads, each thread taking the next task as it
// finishes one: a thread that starts late or is descheduled leaves its share to the others.
template <typename F>
void run_tasks(int64_t tasks, const F& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) work(t);
  });
}

// One step of merging partitions of voxels into global first-appearance order: the partition whose
// next voxel (head[q] of part_nv[q], partitions in local first-appearance order) has the earliest
// first point.  Some partition must have a voxel left.
template <typename K>
int64_t earliest_part(const std::vector<PartBufs<K>>& pb, const std::vector<int64_t>& part_nv,
                      const std::vector<int64_t>& head) {
  int64_t best = -1;
  int32_t best_first = INT32_MAX;
  for (size_t q = 0; q < part_nv.size(); ++q) {
    if (head[q] < part_nv[q] && pb[q].first[head[q]] < best_first) {
      best = static_cast<int64_t>(q);
      best_first = pb[q].first[head[q]];
    }
  }
  return best;
}

// a for a 32-bit element type T (uint32_t keys, float points), b for a 64-bit one: the workspace
// keeps one buffer per width.
template <typename T, typename A, typename B>
auto& by_width(A& a, B& b) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- or 64-bit element types only");
  if constexpr (sizeof(T) == 4) {
    return a;
  } else {
    return b;
  }
}

// The partition of a voxel key among `parts` (a mix of the key unrelated to the table's Fibonacci
// hash, so every partition still spreads over its whole table).
template <typename K>
inline int64_t part_of(K key, int64_t parts) {
  uint64_t x = static_cast<uint64_t>(key);
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  return static_cast<int64_t>(((x >> 32) * static_cast<uint64_t>(parts)) >> 32);
}

// Open-addressing hash table (linear probing, power-of-two capacity) from a voxel key to its
// voxel id, in the calling thread's workspace.  Between calls every slot holds the empty key:
// a call clears exactly the slots it filled, so no call pays for clearing the whole table.
// Entries are (key, id) pairs; 32-bit keys when the grid allows (half the cache footprint).
template <typename K>
struct KeyTable {
  static constexpr K kEmpty = ~K(0);  // also the "dropped point" key: never inserted
  K* slots = nullptr;                 // 2 * capacity: key, id, key, id, ...
  uint64_t mask = 0;
  int shift = 0;

  static KeyTable make(std::vector<K>& storage, int64_t max_entries) {
    int bits = 10;
    while ((int64_t(1) << bits) < 2 * max_entries) ++bits;  // load factor <= 1/2
    const size_t want = size_t(2) << bits;
    if (storage.size() < want) storage.resize(want, kEmpty);  // new slots start empty
    return KeyTable{storage.data(), (uint64_t(1) << bits) - 1, int(sizeof(K) * 8) - bits};
  }
  uint64_t home(K key) const {
    if (sizeof(K) == 4) return uint32_t(key * 0x9E3779B1u) >> shift;  // Fibonacci hashing
    return uint64_t(key * 0x9E3779B97F4A7C15ull) >> shift;
  }
};

// Key of a point: the voxel index floor((p - lower) / voxel_size) per axis, computed with one
// correctly rounded division in the points' type (exactly as spconv's PointToVoxel), then
// 0 <= q < grid checked on the quotient (floor(t) is in [0, g) exactly when t is in [0, g), and
// for t >= 0 truncation is the floor).  NaN fails every comparison; a huge quotient is rejected
// before it is converted.
template <typename scalar_t, typename K>
struct KeyMaker {
  const scalar_t* p;
  int64_t c;
  const int64_t* bp;
  Grid grid;
  scalar_t lo[3], vs[3];
#if defined(__SSE2__)
  __m128 lo4, vs4, zero4, lim4;
  __m128i g4;
#endif

  KeyMaker(const scalar_t* p_, int64_t c_, const int64_t* bp_, const Grid& g, at::ArrayRef<double> lower,
           at::ArrayRef<double> voxel_size)
      : p(p_), c(c_), bp(bp_), grid(g) {
    for (int a = 0; a < 3; ++a) {
      lo[a] = static_cast<scalar_t>(lower[a]);
      vs[a] = static_cast<scalar_t>(voxel_size[a]);
    }
#if defined(__SSE2__)
    if (std::is_same<scalar_t, float>::value) {
      lo4 = _mm_setr_ps(float(lo[0]), float(lo[1]), float(lo[2]), 0.f);
      vs4 = _mm_setr_ps(float(vs[0]), float(vs[1]), float(vs[2]), 1.f);
      zero4 = _mm_setzero_ps();
      lim4 = _mm_set1_ps(2147483648.f);
      g4 = _mm_setr_epi32(int(g.X), int(g.Y), int(g.Z), INT32_MAX);
    }
#endif
  }

  // Whether x, y, z of point i are finite (for classifying a dropped point).
  bool finite(int64_t i) const {
    const scalar_t* r = p + i * c;
    return std::isfinite(r[0]) && std::isfinite(r[1]) && std::isfinite(r[2]);
  }

  K scalar_key(int64_t i) const {
    const scalar_t* r = p + i * c;
    const int64_t g[3] = {grid.X, grid.Y, grid.Z};
    int64_t q[3];
    for (int a = 0; a < 3; ++a) {
      const scalar_t t = (r[a] - lo[a]) / vs[a];
      if (!(t >= scalar_t(0) && t < scalar_t(2147483648.0))) return KeyTable<K>::kEmpty;
      q[a] = static_cast<int64_t>(t);
      if (q[a] >= g[a]) return KeyTable<K>::kEmpty;
    }
    return static_cast<K>(grid.encode(bp ? bp[i] : 0, q[0], q[1], q[2]));
  }

  // The key of point i, or KeyTable<K>::kEmpty when the point is dropped.
  K key(int64_t i) const {
#if defined(__SSE2__)
    if (std::is_same<scalar_t, float>::value && c >= 4) {  // x, y, z and one more column: one 16-byte load
      const __m128 t = _mm_div_ps(_mm_sub_ps(_mm_loadu_ps(reinterpret_cast<const float*>(p + i * c)), lo4), vs4);
      const __m128 ok = _mm_and_ps(_mm_cmpge_ps(t, zero4), _mm_cmplt_ps(t, lim4));
      const __m128i q = _mm_cvttps_epi32(t);
      const __m128i in = _mm_and_si128(_mm_castps_si128(ok), _mm_cmpgt_epi32(g4, q));
      if ((_mm_movemask_ps(_mm_castsi128_ps(in)) & 7) != 7) return KeyTable<K>::kEmpty;
      const int64_t qx = _mm_cvtsi128_si32(q);
      const int64_t qy = _mm_cvtsi128_si32(_mm_shuffle_epi32(q, 0x55));
      const int64_t qz = _mm_cvtsi128_si32(_mm_shuffle_epi32(q, 0xAA));
      return static_cast<K>(grid.encode(bp ? bp[i] : 0, qx, qy, qz));
    }
#endif
    return scalar_key(i);
  }
};

#if SPARSECONV_VOXELIZE_AVX2
// The lanes of Float4Keys::run_avx2's step: point 2l in lane l (l < 4), point 2l + 1 in lane 4 + l.
struct TransposedPoints {
  static constexpr int lane(int point) { return point % 2 == 0 ? point / 2 : 4 + point / 2; }
};
// For each 8-bit mask of valid lanes, the valid lanes in point order, then zeros: the permute that
// compacts a step's keys and indices in input order.
constexpr cpu::PackTable8<TransposedPoints> kCompact8{};

// The key kernels below compute KeyMaker::key for float points with 4 columns and 32-bit keys,
// several points per vector step (the build targets baseline x86-64; each runs only where the
// CPU has its instruction set, picked as the convolution micro-kernels are: cpu::gemm_rows_isa(),
// capped by SPARSECONV_CPU_ISA).  The same arithmetic as the scalar path: one correctly rounded
// division per axis, the same range tests, and the key
// ((b * X + x) * Y + y) * Z + z = b * XYZ + x * YZ + y * Z + z in 32-bit lanes (exact: keys < 2^32).
// run(begin, end, ...) handles points [begin, end) (end - begin a multiple of the step), appends
// the keys and indices of the valid points at key + j, idx + j, sets pv = -1 for the others (the
// AVX2 kernel for every point of a step that drops one: the pass writes the valid points' voxels
// later) and adds the non-finite ones to *nonfinite; returns the new j.
struct Float4Keys {
  const float* p;
  const int64_t* bp;
  float lo[3], vs[3];
  int32_t g[3];
  uint32_t yz, z, xyz;

  // Eight points per 256-bit step: x, y and z of 8 points are pulled out of four loads by a
  // 4 x 4 transpose in each 128-bit half (the lanes then hold points 0, 2, 4, 6, 1, 3, 5, 7), and
  // the valid keys are compacted in registers by a permute from a table that also restores the
  // input order (kCompact8).  Each step writes 8 elements at key + j and idx + j; j <= i, so the
  // writes stay inside [begin, end) of the caller's compacted chunk.  The kernel alone, on the
  // 126.9k points of KITTI scan 000002 (1 thread, warm, an AMD EPYC without AVX-512): 270 us
  // with two points per step, 190 us with eight and masked stores of pv, 154 us as here.
  __attribute__((target("avx2"))) int64_t run_avx2(int64_t begin, int64_t end, uint32_t* key, int32_t* idx,
                                                   int64_t j, int64_t* pv, int64_t* nonfinite) const {
    const __m256 lox = _mm256_set1_ps(lo[0]), loy = _mm256_set1_ps(lo[1]), loz = _mm256_set1_ps(lo[2]);
    const __m256 vsx = _mm256_set1_ps(vs[0]), vsy = _mm256_set1_ps(vs[1]), vsz = _mm256_set1_ps(vs[2]);
    const __m256 zero = _mm256_setzero_ps();
    const __m256i minus1 = _mm256_set1_epi32(-1);
    const __m256i gx = _mm256_set1_epi32(g[0]), gy = _mm256_set1_epi32(g[1]), gz = _mm256_set1_epi32(g[2]);
    const __m256i myz = _mm256_set1_epi32(int32_t(yz)), mz = _mm256_set1_epi32(int32_t(z));
    const __m256i mxyz = _mm256_set1_epi32(int32_t(xyz));
    const __m256i lane_point = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // the point in each lane
    const __m256i batch_lo = _mm256_setr_epi32(0, 4, 0, 0, 2, 6, 0, 0);    // bp[i .. i+3]: points 0, 2 | 1, 3
    const __m256i batch_hi = _mm256_setr_epi32(0, 0, 0, 4, 0, 0, 2, 6);    // bp[i+4 .. i+7]: 4, 6 | 5, 7
    int64_t nf = 0;
    for (int64_t i = begin; i < end; i += 8) {
      const float* r = p + 4 * i;
      const __m256 a = _mm256_loadu_ps(r), b = _mm256_loadu_ps(r + 8);
      const __m256 c = _mm256_loadu_ps(r + 16), d = _mm256_loadu_ps(r + 24);
      const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
      const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
      const __m256 x = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 y = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 zz = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 tx = _mm256_div_ps(_mm256_sub_ps(x, lox), vsx);
      const __m256 ty = _mm256_div_ps(_mm256_sub_ps(y, loy), vsy);
      const __m256 tz = _mm256_div_ps(_mm256_sub_ps(zz, loz), vsz);
      const __m256i qx = _mm256_cvttps_epi32(tx), qy = _mm256_cvttps_epi32(ty), qz = _mm256_cvttps_epi32(tz);
      // t >= 0 (false for NaN), and 0 <= q < g on the truncated value (a huge or NaN t converts
      // to INT32_MIN, which fails q > -1).
      const __m256 t_ok = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(tx, zero, _CMP_GE_OQ), _mm256_cmp_ps(ty, zero, _CMP_GE_OQ)),
                                        _mm256_cmp_ps(tz, zero, _CMP_GE_OQ));
      const __m256i q_ok = _mm256_and_si256(
          _mm256_and_si256(_mm256_and_si256(_mm256_cmpgt_epi32(gx, qx), _mm256_cmpgt_epi32(gy, qy)),
                           _mm256_cmpgt_epi32(gz, qz)),
          _mm256_and_si256(_mm256_and_si256(_mm256_cmpgt_epi32(qx, minus1), _mm256_cmpgt_epi32(qy, minus1)),
                           _mm256_cmpgt_epi32(qz, minus1)));
      const int m = _mm256_movemask_ps(_mm256_and_ps(t_ok, _mm256_castsi256_ps(q_ok)));  // bit l: lane l valid
      __m256i k = _mm256_add_epi32(_mm256_add_epi32(_mm256_mullo_epi32(qx, myz), _mm256_mullo_epi32(qy, mz)), qz);
      if (bp) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + i));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + i + 4));
        const __m256i bb = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(b0, batch_lo),
                                              _mm256_permutevar8x32_epi32(b1, batch_hi), 0xCC);
        k = _mm256_add_epi32(k, _mm256_mullo_epi32(bb, mxyz));
      }
      const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompact8.lanes[m])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(key + j), _mm256_permutevar8x32_epi32(k, perm));
      const __m256i ids = _mm256_add_epi32(lane_point, _mm256_set1_epi32(static_cast<int32_t>(i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j), _mm256_permutevar8x32_epi32(ids, perm));
      j += __builtin_popcount(static_cast<unsigned>(m));
      if (C10_UNLIKELY(m != 0xFF)) {
        // pv = -1 for the step's points, dropped or not (the pass writes every valid point's
        // voxel later; two plain stores beat masked ones); finite x, y, z: x - x == 0 (NaN and
        // inf give NaN).
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pv + i), minus1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pv + i + 4), minus1);
        const __m256 fin = _mm256_and_ps(
            _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(x, x), zero, _CMP_EQ_OQ), _mm256_cmp_ps(_mm256_sub_ps(y, y), zero, _CMP_EQ_OQ)),
            _mm256_cmp_ps(_mm256_sub_ps(zz, zz), zero, _CMP_EQ_OQ));
        nf += __builtin_popcount(static_cast<unsigned>(~m & ~_mm256_movemask_ps(fin) & 0xFF));
      }
    }
    *nonfinite += nf;
    return j;
  }

  // Sixteen points per step: x, y and z of 16 points are pulled out of four 512-bit loads by
  // permutes, and the valid keys are compacted in registers (a compressing store to memory is
  // slow on some CPUs).  Each step writes 16 elements at key + j and idx + j; j <= i, so the
  // writes stay inside [begin, end) of the caller's compacted chunk.
  __attribute__((target("avx512f"))) int64_t run_avx512(int64_t begin, int64_t end, uint32_t* key, int32_t* idx,
                                                        int64_t j, int64_t* pv, int64_t* nonfinite) const {
    const __m512i sel_x = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i sel_y = _mm512_add_epi32(sel_x, one), sel_z = _mm512_add_epi32(sel_y, one);
    const __m512 lox = _mm512_set1_ps(lo[0]), loy = _mm512_set1_ps(lo[1]), loz = _mm512_set1_ps(lo[2]);
    const __m512 vsx = _mm512_set1_ps(vs[0]), vsy = _mm512_set1_ps(vs[1]), vsz = _mm512_set1_ps(vs[2]);
    const __m512 zero = _mm512_setzero_ps();
    const __m512i zero_i = _mm512_setzero_si512();
    const __m512i gx = _mm512_set1_epi32(g[0]), gy = _mm512_set1_epi32(g[1]), gz = _mm512_set1_epi32(g[2]);
    const __m512i myz = _mm512_set1_epi32(int32_t(yz)), mz = _mm512_set1_epi32(int32_t(z));
    const __m512i mxyz = _mm512_set1_epi32(int32_t(xyz));
    const __m512i minus1 = _mm512_set1_epi64(-1);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t nf = 0;
    for (int64_t i = begin; i < end; i += 16) {
      const float* r = p + 4 * i;
      const __m512 a = _mm512_loadu_ps(r), b = _mm512_loadu_ps(r + 16);
      const __m512 c = _mm512_loadu_ps(r + 32), d = _mm512_loadu_ps(r + 48);
      // Lanes 0-7 of permutex2var(a, sel, b) hold the axis of points 0-7; the same for c, d.
      const __m512 x = _mm512_shuffle_f32x4(_mm512_permutex2var_ps(a, sel_x, b), _mm512_permutex2var_ps(c, sel_x, d),
                                            _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 y = _mm512_shuffle_f32x4(_mm512_permutex2var_ps(a, sel_y, b), _mm512_permutex2var_ps(c, sel_y, d),
                                            _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 zz = _mm512_shuffle_f32x4(_mm512_permutex2var_ps(a, sel_z, b), _mm512_permutex2var_ps(c, sel_z, d),
                                             _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 tx = _mm512_div_ps(_mm512_sub_ps(x, lox), vsx);
      const __m512 ty = _mm512_div_ps(_mm512_sub_ps(y, loy), vsy);
      const __m512 tz = _mm512_div_ps(_mm512_sub_ps(zz, loz), vsz);
      const __m512i qx = _mm512_cvttps_epi32(tx), qy = _mm512_cvttps_epi32(ty), qz = _mm512_cvttps_epi32(tz);
      // t >= 0 (false for NaN), and 0 <= q < g on the truncated value (a huge or NaN t converts
      // to INT32_MIN, which fails q >= 0).
      __mmask16 m = _mm512_cmp_ps_mask(tx, zero, _CMP_GE_OQ) & _mm512_cmp_ps_mask(ty, zero, _CMP_GE_OQ) &
                    _mm512_cmp_ps_mask(tz, zero, _CMP_GE_OQ);
      m &= _mm512_cmpgt_epi32_mask(gx, qx) & _mm512_cmpgt_epi32_mask(gy, qy) & _mm512_cmpgt_epi32_mask(gz, qz);
      m &= _mm512_cmpge_epi32_mask(qx, zero_i) & _mm512_cmpge_epi32_mask(qy, zero_i) &
           _mm512_cmpge_epi32_mask(qz, zero_i);
      __m512i k = _mm512_add_epi32(_mm512_add_epi32(_mm512_mullo_epi32(qx, myz), _mm512_mullo_epi32(qy, mz)), qz);
      if (bp) {
        const __m256i b0 = _mm512_cvtepi64_epi32(_mm512_loadu_si512(bp + i));
        const __m256i b1 = _mm512_cvtepi64_epi32(_mm512_loadu_si512(bp + i + 8));
        const __m512i bb = _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
        k = _mm512_add_epi32(k, _mm512_mullo_epi32(bb, mxyz));
      }
      _mm512_storeu_si512(key + j, _mm512_maskz_compress_epi32(m, k));
      _mm512_storeu_si512(idx + j,
                          _mm512_maskz_compress_epi32(m, _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(i)))));
      j += __builtin_popcount(m);
      if (C10_UNLIKELY(m != 0xFFFF)) {
        const __mmask16 out = static_cast<__mmask16>(~m);
        _mm512_mask_storeu_epi64(pv + i, static_cast<__mmask8>(out), minus1);
        _mm512_mask_storeu_epi64(pv + i + 8, static_cast<__mmask8>(out >> 8), minus1);
        // finite x, y, z: x - x == 0 (NaN and inf give NaN)
        const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), zero, _CMP_EQ_OQ) &
                              _mm512_cmp_ps_mask(_mm512_sub_ps(y, y), zero, _CMP_EQ_OQ) &
                              _mm512_cmp_ps_mask(_mm512_sub_ps(zz, zz), zero, _CMP_EQ_OQ);
        nf += __builtin_popcount(static_cast<unsigned>(out & static_cast<__mmask16>(~fin)));
      }
    }
    *nonfinite += nf;
    return j;
  }
};

// One padded row of float points with 4 columns (the kList rows): the m listed points, then zeros
// up to max_points slots, written as 64-byte stores of four slots each (a row of 32 slots is 8
// stores instead of 32: with warm caches the row writes were bound by the number of stores).
__attribute__((target("avx512f"))) inline void padded_row_avx512(float* out, const float* p, const int32_t* list,
                                                                 int64_t m, int64_t max_points) {
  auto point = [&](int64_t s) { return _mm_loadu_ps(p + 4 * static_cast<int64_t>(list[s])); };
  int64_t s = 0;
  for (; s + 4 <= m; s += 4) {
    __m512 v = _mm512_castps128_ps512(point(s));
    v = _mm512_insertf32x4(v, point(s + 1), 1);
    v = _mm512_insertf32x4(v, point(s + 2), 2);
    v = _mm512_insertf32x4(v, point(s + 3), 3);
    _mm512_storeu_ps(out + 4 * s, v);
  }
  const __m512 zero = _mm512_setzero_ps();
  if (s < max_points) {  // the group with the last 0-3 points, zero lanes after them
    __m512 v = zero;
    const int64_t k = m - s;
    if (k > 0) v = _mm512_insertf32x4(v, point(s), 0);
    if (k > 1) v = _mm512_insertf32x4(v, point(s + 1), 1);
    if (k > 2) v = _mm512_insertf32x4(v, point(s + 2), 2);
    const int64_t lanes = std::min<int64_t>(4, max_points - s);
    _mm512_mask_storeu_ps(out + 4 * s, static_cast<__mmask16>((1u << (4 * lanes)) - 1u), v);
    s += lanes;
  }
  for (; s + 4 <= max_points; s += 4) _mm512_storeu_ps(out + 4 * s, zero);
  if (s < max_points) {
    _mm512_mask_storeu_ps(out + 4 * s, static_cast<__mmask16>((1u << (4 * (max_points - s))) - 1u), zero);
  }
}

// padded_row_avx512 with 32-byte stores of two slots each (CPUs without AVX-512).  A/B on an AMD
// EPYC without AVX-512 against 16-byte stores of one slot (2 threads, totals through
// voxelize_padded, medians of 5 interleaved processes): SECOND settings 0.97-1.16 -> 0.88-1.03 ms
// cold, 0.81-1.07 -> 0.79-1.04 ms warm; PointPillars settings within the noise.
__attribute__((target("avx2"))) inline void padded_row_avx2(float* out, const float* p, const int32_t* list,
                                                            int64_t m, int64_t max_points) {
  auto point = [&](int64_t s) { return _mm_loadu_ps(p + 4 * static_cast<int64_t>(list[s])); };
  int64_t s = 0;
  for (; s + 2 <= m; s += 2) _mm256_storeu_ps(out + 4 * s, _mm256_set_m128(point(s + 1), point(s)));
  if (s < m) {  // the last point, and a zero slot after it where the row has one
    if (s + 1 < max_points) {
      _mm256_storeu_ps(out + 4 * s, _mm256_set_m128(_mm_setzero_ps(), point(s)));
      s += 2;
    } else {
      _mm_storeu_ps(out + 4 * s, point(s));
      s += 1;
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (; s + 2 <= max_points; s += 2) _mm256_storeu_ps(out + 4 * s, zero);
  if (s < max_points) _mm_storeu_ps(out + 4 * s, _mm_setzero_ps());
}

#endif

// The voxels of the valid points in input order: a voxel id on first sight (the first max_voxels
// voxels only), each point's voxel (or -1) and its slot (rank among the voxel's kept points).
// Keys are looked up in the hash table, or, for grids of few cells, in a direct-mapped array
// (`dense`: one voxel id per cell, -1 for none, all -1 between calls).
template <typename K>
struct Assign {
  int64_t* pv;       // [n] voxel id or -1
  K* vkey;           // [cap] key of voxel v
  int32_t* vcount;   // [cap] kept points of voxel v
  int32_t* vslot;    // [cap] table slot of voxel v (hash table only)
  KeyTable<K> table;
  int32_t* dense = nullptr;
  int64_t max_voxels, max_points;  // INT64_MAX when unlimited
  int64_t nv = 0, over_voxels = 0, over_points = 0;

  // A new voxel id for key k (no points yet), or -1 beyond max_voxels.
  int64_t open_voxel(K k) {
    if (nv >= max_voxels) return -1;
    const int64_t v = nv++;
    vkey[v] = k;
    vcount[v] = 0;
    return v;
  }

  // A new voxel for key k in the direct-mapped array, or -1 beyond max_voxels.
  int64_t insert_dense(K k) {
    const int64_t v = open_voxel(k);
    if (v >= 0) dense[k] = static_cast<int32_t>(v);
    return v;
  }

  // The voxel of key k: found, inserted (a new id), or -1 (new beyond max_voxels: not inserted,
  // so the later points of that voxel are dropped too).
  int64_t probe(K k, uint64_t h) {
    for (;;) {
      const K s = table.slots[2 * h];
      if (s == k) return static_cast<int64_t>(table.slots[2 * h + 1]);
      if (s == KeyTable<K>::kEmpty) {
        const int64_t v = open_voxel(k);
        if (v < 0) return -1;
        table.slots[2 * h] = k;
        table.slots[2 * h + 1] = static_cast<K>(v);
        vslot[v] = static_cast<int32_t>(h);
        return v;
      }
      h = (h + 1) & table.mask;
    }
  }

  // Points idx[0, m) (valid, in input order) with keys key[0, m); on_point(i, v, s, kept) is
  // called for each point that has a voxel (s: its rank among the voxel's points so far).
  // The voxel of key[j] (found, opened, or -1 beyond max_voxels), fetching the table slot (or the
  // cell) of key[j + kAhead] early: the table is about as large as L2 and cold on entry (A/B: 16
  // points ahead cut the pass by ~25%, 40 by another ~5%).  tab and cells: the caller's local
  // copies of table and dense (see add_points).
  template <bool Dense>
  C10_ALWAYS_INLINE int64_t voxel_of(const K* key, int64_t j, int64_t m, const KeyTable<K>& tab, const int32_t* cells) {
    constexpr int64_t kAhead = 40;
    if (j + kAhead < m) {
      if (Dense) {
        __builtin_prefetch(cells + key[j + kAhead]);
      } else {
        __builtin_prefetch(tab.slots + 2 * tab.home(key[j + kAhead]));
      }
    }
    const K k = key[j];
    if (Dense) {
      const int64_t v = cells[k];
      return C10_LIKELY(v >= 0) ? v : insert_dense(k);
    }
    const uint64_t h = tab.home(k);
    return C10_LIKELY(tab.slots[2 * h] == k) ? static_cast<int64_t>(tab.slots[2 * h + 1]) : probe(k, h);
  }

  // Point i of voxel v (-1: beyond max_voxels, dropped): its rank s among the voxel's points so
  // far, kept while s < limit, counted in count (every point with CountAll, else the kept ones),
  // point_voxel[i] set, then on_point(i, v, s, keep).  Static, on the caller's local copies (see
  // add_points).
  template <bool CountAll, typename OnPoint>
  C10_ALWAYS_INLINE static void count_point(int64_t i, int64_t v, int32_t* count, int64_t* point_voxel, int64_t limit,
                                            int64_t& ov, int64_t& op, const OnPoint& on_point) {
    if (C10_UNLIKELY(v < 0)) {
      ++ov;
      point_voxel[i] = -1;
      return;
    }
    const int32_t s = count[v];
    const bool keep = s < limit;
    count[v] = s + (CountAll ? 1 : keep);
    op += !keep;
    point_voxel[i] = keep ? v : -1;
    on_point(i, v, s, keep);
  }

  // CountAll: vcount counts every point of a voxel, kept or not (the caller then applies
  // max_points to the counts); otherwise the kept points only.
  template <bool CountAll = false, typename OnPoint>
  void add(const K* key, const int32_t* idx, int64_t m, const OnPoint& on_point) {
    if (dense) {
      add_points<true, CountAll>(key, idx, m, on_point);
    } else {
      add_points<false, CountAll>(key, idx, m, on_point);
    }
  }

  template <bool Dense, bool CountAll, typename OnPoint>
  void add_points(const K* key, const int32_t* idx, int64_t m, const OnPoint& on_point_ref) {
    int64_t ov = 0, op = 0;
    // The members and the callback in locals: the int64 stores to pv and the int32 stores to
    // vcount may alias members (nv, max_points, the table's mask and shift), which the compiler
    // would otherwise reload after every store.
    const KeyTable<K> tab = table;
    const int32_t* const cells = dense;
    int64_t* const point_voxel = pv;
    int32_t* const count = vcount;
    const int64_t limit = max_points;
    const OnPoint on_point = on_point_ref;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t v = voxel_of<Dense>(key, j, m, tab, cells);
      count_point<CountAll>(idx[j], v, count, point_voxel, limit, ov, op, on_point);
    }
    over_voxels += ov;
    over_points += op;
  }

  void clear_table() {
    if (dense) {
      for (int64_t v = 0; v < nv; ++v) dense[vkey[v]] = -1;
      return;
    }
    for (int64_t v = 0; v < nv; ++v) table.slots[2 * static_cast<int64_t>(static_cast<uint32_t>(vslot[v]))] =
        KeyTable<K>::kEmpty;
  }
};

// k / d and k % d for 0 <= k < 2^52 by a multiplication in double: the product is within one of
// the quotient, and one correction step makes the result exact (decoding a key divides three
// times; a 64-bit integer division costs tens of cycles).
struct FastDiv {
  int64_t d;
  double inv;
  explicit FastDiv(int64_t d_) : d(d_), inv(1.0 / static_cast<double>(d_)) {}
  int64_t div(int64_t k, int64_t* rem) const {
    int64_t q = static_cast<int64_t>(static_cast<double>(k) * inv);
    int64_t r = k - q * d;
    if (r < 0) {
      --q;
      r += d;
    } else if (r >= d) {
      ++q;
      r -= d;
    }
    *rem = r;
    return q;
  }
};

// k / d and k % d for 32-bit k by 64-bit multiplications (Lemire, Kaser and Kurz, "Faster remainder
// by direct computation", 2019: with c = ceil(2^64 / d), both are exact for every k < 2^32).
struct Div32 {
  uint64_t c;
  uint32_t d;
  explicit Div32(uint32_t d_) : c(d_ > 1 ? UINT64_MAX / d_ + 1 : 0), d(d_) {}
  uint32_t div(uint32_t k, uint32_t* rem) const {
    if (d == 1) {
      *rem = 0;
      return k;
    }
    const uint64_t low = c * k;
    *rem = static_cast<uint32_t>((static_cast<unsigned __int128>(low) * d) >> 64);
    return static_cast<uint32_t>((static_cast<unsigned __int128>(c) * k) >> 64);
  }
};

// Coordinates (b, x, y, z) of the key ((b * X + x) * Y + y) * Z + z, with the divisions of Div
// (Div32 for 32-bit keys, FastDiv below 2^52).
template <typename Div, typename T>
inline void decode_key(const Div& dz, const Div& dy, const Div& dx, T k, int32_t* out) {
  T rem;
  k = dz.div(k, &rem);
  out[3] = static_cast<int32_t>(rem);
  k = dy.div(k, &rem);
  out[2] = static_cast<int32_t>(rem);
  out[0] = static_cast<int32_t>(dx.div(k, &rem));
  out[1] = static_cast<int32_t>(rem);
}

template <int CC, typename scalar_t>
inline void copy_row(scalar_t* out, const scalar_t* row, int64_t c) {
  if (CC > 0) {
    std::memcpy(out, row, CC * sizeof(scalar_t));
  } else {
    std::memcpy(out, row, c * sizeof(scalar_t));
  }
}

// Folds one more kept point into a voxel's running reduction (max, mean/sum, first).
template <int CC, typename scalar_t>
inline void fold_row(scalar_t* a, const scalar_t* row, int64_t c, Reduce reduce) {
  const int64_t cols = CC > 0 ? CC : c;
  switch (reduce) {
    case kMax:
      for (int64_t k = 0; k < cols; ++k) a[k] = std::max(a[k], row[k]);
      break;
    case kMean:
    case kSum:
      for (int64_t k = 0; k < cols; ++k) a[k] = a[k] + row[k];
      break;
    default:  // kFirst
      break;
  }
}

// What the row loop of voxelize_cpu reads and writes: output row r is the voxel row_voxel[r] (r
// itself when null) with key row_key[r]; its outputs are at coords + 4 r, counts + r and
// feats + r * (features per row).
template <typename K, typename scalar_t>
struct RowSrc {
  const int32_t* row_voxel;
  const K* row_key;
  const int32_t* vcount;  // points of each voxel (those beyond max_points are not kept)
  const int32_t* lists;   // padded rows from lists: [voxel, max_points] point indices
  const scalar_t* acc;    // reductions: [voxel, C] running reductions
  int32_t* coords;
  int32_t* counts;
  scalar_t* feats;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cpu(
    const at::Tensor& points_in, const c10::optional<at::Tensor>& batch_in, at::ArrayRef<double> voxel_size,
    at::ArrayRef<double> lower, c10::IntArrayRef grid_xyz, int64_t batch_size, int64_t max_points, int64_t max_voxels,
    c10::string_view reduce_name, bool order_by_first) {
  const char* op = "voxelize";
  check_feats(points_in, op, "points");
  check_cpu_dtype(points_in, op);
  // Plain names, not structured bindings: lambdas below capture them (C++17 builds, torch < 2.13).
  const std::pair<Grid, VoxelReduce> args =
      check_voxelize_args(points_in, voxel_size, lower, grid_xyz, batch_size, max_points, reduce_name);
  const Grid grid = args.first;
  const Reduce reduce = args.second;
  const at::Tensor points = points_in.contiguous();
  const int64_t n = points.size(0), c = points.size(1);

  at::Tensor batch;
  if (batch_in.has_value() && batch_in->defined()) {
    batch = *batch_in;
    TORCH_CHECK_VALUE(batch.dim() == 1 && batch.size(0) == n, "sparseconv.voxelize: batch must be [N] = [", n,
                      "], got shape ", batch.sizes());
    TORCH_CHECK_VALUE(!at::isFloatingType(batch.scalar_type()) && batch.scalar_type() != at::kBool,
                      "sparseconv.voxelize: batch must be an integer tensor, got ", batch.scalar_type());
    check_same_device(points, batch, op, "points", "batch");
    batch = batch.to(at::kLong).contiguous();
    if (n) {
      const int64_t lo = batch.min().item<int64_t>(), hi = batch.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < batch_size, "sparseconv.voxelize: batch indices must be in [0, ", batch_size,
                        "), got [", lo, ", ", hi, "]");
    }
  }
  const int64_t* bp = batch.defined() ? batch.data_ptr<int64_t>() : nullptr;
  const uint64_t max_key = static_cast<uint64_t>(grid.B * grid.X * grid.Y * grid.Z - 1);

  // Temporaries live in a per-thread workspace that keeps its capacity between calls: a scan is
  // voxelized many times per second, and fresh multi-megabyte buffers each time cost more in page
  // faults than the work itself.
  thread_local Workspace ws;

  at::Tensor point_voxel = at::empty({n}, points.options().dtype(at::kLong));
  int64_t* pv = point_voxel.data_ptr<int64_t>();
  const int64_t f = reduce == kCount ? 1 : (reduce == kPad ? max_points * c : c);
  at::Tensor coords, feats, counts;
  int64_t nonfinite = 0, valid = 0, over_voxels = 0, over_points = 0;

  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "sparseconv_voxelize", [&] {
    const scalar_t* p = points.data_ptr<scalar_t>();
    auto run = [&](auto key_tag, std::vector<decltype(key_tag)>& key_buf, std::vector<decltype(key_tag)>& table_buf,
                   std::vector<decltype(key_tag)>& vkey_buf, SortBufs<decltype(key_tag)>& sort_bufs) {
      using K = decltype(key_tag);
      const KeyMaker<scalar_t, K> km(p, c, bp, grid, lower, voxel_size);
      const int64_t cap = max_voxels >= 0 ? std::min(n, max_voxels) : n;  // voxels at most

      // 1. Voxel ids in order of first appearance: one pass over the points in input order.
      Assign<K> as;
      as.pv = pv;
      as.vkey = cpu::scratch(vkey_buf, cap);
      as.vcount = cpu::scratch(ws.vcount, cap);
      as.vslot = cpu::scratch(ws.vslot, cap);
      as.max_voxels = max_voxels >= 0 ? max_voxels : INT64_MAX;
      as.max_points = max_points >= 0 ? max_points : INT64_MAX;
      // Keys of the valid points, compacted per chunk of points (in parallel: the arithmetic of
      // a point does not depend on the split), then assigned chunk by chunk in input order.
      constexpr int64_t kChunk = 16384;
      // Passes go parallel only with enough work (two chunks of points / 8k voxels): a scan of
      // ~120k points takes ~1-2 ms in all, and waiting for a descheduled thread at the end of a
      // parallel region can cost more than the second thread saves on a busy machine.  The split
      // never changes the results.
      constexpr int64_t kParallelChunks = 2;            // 32768 points
      constexpr int64_t kParallelVoxels = int64_t(1) << 13;
      // In first-appearance order (the padded layout) the hash pass is partitioned over threads
      // only from 2^18 valid points (a batch of scans): it is bound by random accesses to the
      // tables, which on the 2-core development VM scaled by ~1.4x on two threads, less than the
      // partitioning and the merge by first point cost for one ~60k-point scan (A/B: 0.46-0.60 ms
      // partitioned on 2 threads vs 0.38-0.53 ms sequential).  Key order splits the keys into
      // ranges from 2^15 valid points instead (assign_ranges below: no merge, and the key sort and
      // the rows split too).
      constexpr int64_t kParallelPoints = int64_t(1) << 18;
      const int64_t num_chunks = (n + kChunk - 1) / kChunk;
      K* key = cpu::scratch(key_buf, n);
      int32_t* idx = cpu::scratch(ws.idx, n);
      int64_t* chunk_valid = cpu::scratch(ws.chunk_valid, num_chunks);
      int64_t* chunk_nonfinite = cpu::scratch(ws.chunk_nonfinite, num_chunks);
#if SPARSECONV_VOXELIZE_AVX2
      // The vector kernels for float x, y, z, i rows: point keys (32-bit keys) 16 or 8 points per
      // step, and padded rows in 64-byte stores (padded_row_avx512).
      const bool float4 = std::is_same<scalar_t, float>::value && c == 4;
      const bool isa512 = std::strcmp(cpu::gemm_rows_isa(), "avx512") == 0;
      const bool isa256 = std::strcmp(cpu::gemm_rows_isa(), "avx2") == 0;
      const int key_step = !(float4 && std::is_same<K, uint32_t>::value) ? 0 : isa512 ? 16 : isa256 ? 8 : 0;
      const bool rows512 = float4 && isa512, rows256 = float4 && isa256;
#endif
      at::parallel_for(0, num_chunks, kParallelChunks, [&](int64_t cb, int64_t ce) {
        for (int64_t chunk = cb; chunk < ce; ++chunk) {
          int64_t nf = 0, j = chunk * kChunk, i = chunk * kChunk;
          const int64_t end = std::min(n, (chunk + 1) * kChunk);
#if SPARSECONV_VOXELIZE_AVX2
          if (key_step) {
            const Float4Keys fk{reinterpret_cast<const float*>(p), bp,
                                {float(km.lo[0]), float(km.lo[1]), float(km.lo[2])},
                                {float(km.vs[0]), float(km.vs[1]), float(km.vs[2])},
                                {int32_t(grid.X), int32_t(grid.Y), int32_t(grid.Z)},
                                static_cast<uint32_t>(grid.Y * grid.Z), static_cast<uint32_t>(grid.Z),
                                static_cast<uint32_t>(grid.X * grid.Y * grid.Z)};
            const int64_t vec_end = i + (end - i) / key_step * key_step;
            uint32_t* key32 = reinterpret_cast<uint32_t*>(key);
            j = key_step == 16 ? fk.run_avx512(i, vec_end, key32, idx, j, pv, &nf)
                               : fk.run_avx2(i, vec_end, key32, idx, j, pv, &nf);
            i = vec_end;
          }
#endif
          for (; i < end; ++i) {
            const K k = km.key(i);
            key[j] = k;
            idx[j] = static_cast<int32_t>(i);
            if (C10_LIKELY(k != KeyTable<K>::kEmpty)) {
              ++j;
            } else {
              nf += !km.finite(i);
              pv[i] = -1;
            }
          }
          chunk_valid[chunk] = j - chunk * kChunk;
          chunk_nonfinite[chunk] = nf;
        }
      });
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) valid += chunk_valid[chunk];
      // What the pass keeps of each point:
      //  - kList (padded rows in first-appearance order, small max_points): the points of each
      //    voxel, listed in a [voxel, max_points] table; the rows are then written voxel by voxel,
      //    sequentially (A/B: ~8% faster than scattering the points).
      //  - kRank (other padded rows): the rank of each point in its voxel; the points are then
      //    scattered into the rows.
      //  - kAccumulate (mean, sum, max, first): the voxel's running reduction, in input order, in
      //    a [voxel, C] buffer; rows are then copied (and scaled) from it.
      //  - kNone (count).
      enum Mode { kList, kRank, kAccumulate, kNone };
      const int64_t max_nv = std::min(valid, cap);
      const Mode mode = reduce == kCount ? kNone
                        : reduce != kPad ? kAccumulate
                        : (order_by_first && max_nv * max_points <= (int64_t(1) << 24)) ? kList
                                                                                        : kRank;
      int32_t* vpts = mode == kList ? cpu::scratch(ws.vpts, max_nv * max_points) : nullptr;
      int32_t* pslot = mode == kRank ? cpu::scratch(ws.pslot, n) : nullptr;
      scalar_t* acc = mode == kAccumulate ? cpu::scratch(by_width<scalar_t>(ws.accf, ws.accd), max_nv * c) : nullptr;
      auto assign_all = [&](const auto& on_point) {
        for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
          as.add(key + chunk * kChunk, idx + chunk * kChunk, chunk_valid[chunk], on_point);
        }
      };
      // The callback that folds each kept point into its voxel's running reduction in acc_rows.
      auto folder = [&](auto cc_tag, scalar_t* acc_rows) {
        constexpr int CC = decltype(cc_tag)::value;
        const int64_t cols = CC > 0 ? CC : c;
        return [p, acc_rows, cols, c, reduce](int64_t i, int64_t v, int32_t s, bool keep) {
          if (!keep) return;
          const scalar_t* row = p + i * cols;
          scalar_t* a = acc_rows + v * cols;
          if (s == 0) {
            copy_row<CC>(a, row, c);
          } else {
            fold_row<CC>(a, row, c, reduce);
          }
        };
      };
      auto accumulate = [&](auto cc_tag) { assign_all(folder(cc_tag, acc)); };
      // The first-appearance pass split over `parts` partitions of the voxel keys (part_of), one
      // thread each:
      //  1. each partition walks, in input order, the valid points whose key falls in it, through its
      //     own table: local voxel ids in local first-appearance order, the first point of each voxel
      //     and each point's rank in its voxel.  All the points of a voxel are in one partition, so
      //     the ranks and the running reductions (in input order) are exactly the sequential pass's;
      //  2. sequentially, global ids: the partitions' voxels merged by their first point, which is
      //     the global first-appearance order (max_voxels applies here), or, when no voxel is
      //     dropped and the rows are put in key order anyway, simply concatenated;
      //  3. in parallel, the voxels' data and the points' voxels moved to the global ids, and
      //     max_points applied to the ranks.
      auto assign_partitioned = [&](int64_t parts) {
        const int64_t mp_lim = as.max_points;
        auto& pb = by_width<K>(ws.parts32, ws.parts64);
        if (static_cast<int64_t>(pb.size()) < parts) pb.resize(parts);
        std::vector<int64_t> part_nv(parts);
        // The rank of each point in its voxel (all points, max_points not yet applied).
        int32_t* rank_of = mode == kRank ? pslot : cpu::scratch(ws.idx_rank, n);
        at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
          for (int64_t part = p0; part < p1; ++part) {
            PartBufs<K>& b = pb[part];
            K* okey = cpu::scratch(b.key, valid);
            int32_t* oidx = cpu::scratch(b.idx, valid);
            int64_t m = 0;
            for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {  // branch-free filter, in order
              const K* ck = key + chunk * kChunk;
              const int32_t* ci = idx + chunk * kChunk;
              for (int64_t j = 0; j < chunk_valid[chunk]; ++j) {
                okey[m] = ck[j];
                oidx[m] = ci[j];
                m += part_of(ck[j], parts) == part;
              }
            }
            Assign<K> a;
            a.pv = pv;
            a.vkey = cpu::scratch(b.vkey, m);
            a.vcount = cpu::scratch(b.vcount, m);
            a.vslot = cpu::scratch(b.vslot, m);
            a.table = KeyTable<K>::make(b.table, m);
            a.max_voxels = INT64_MAX;
            a.max_points = INT64_MAX;
            int32_t* first = cpu::scratch(b.first, m);
            auto record = [&](int64_t i, int64_t v, int32_t s) {
              rank_of[i] = s;
              if (s == 0) first[v] = static_cast<int32_t>(i);
            };
            if (mode == kList) {
              int32_t* lp = cpu::scratch(b.vpts, m * max_points);
              a.add(okey, oidx, m, [&](int64_t i, int64_t v, int32_t s, bool) {
                record(i, v, s);
                if (s < mp_lim) lp[v * max_points + s] = static_cast<int32_t>(i);
              });
            } else if (mode == kAccumulate) {
              scalar_t* la = cpu::scratch(by_width<scalar_t>(b.accf, b.accd), m * c);
              a.add(okey, oidx, m, [&](int64_t i, int64_t v, int32_t s, bool) {
                record(i, v, s);
                if (s == 0) {
                  copy_row<0>(la + v * c, p + i * c, c);
                } else if (s < mp_lim) {
                  fold_row<0>(la + v * c, p + i * c, c, reduce);
                }
              });
            } else {
              a.add(okey, oidx, m, [&](int64_t i, int64_t v, int32_t s, bool) { record(i, v, s); });
            }
            a.clear_table();
            part_nv[part] = a.nv;
          }
        });
        // 2. Global ids.
        int64_t total = 0;
        for (int64_t part = 0; part < parts; ++part) total += part_nv[part];
        const int64_t nv_global = std::min(total, as.max_voxels);
        int32_t* inv_part = cpu::scratch(ws.inv_part, nv_global);
        int32_t* inv_local = cpu::scratch(ws.inv_local, nv_global);
        std::vector<int32_t*> gmap(parts);
        for (int64_t part = 0; part < parts; ++part) gmap[part] = cpu::scratch(pb[part].gmap, part_nv[part]);
        if (!order_by_first && total <= as.max_voxels) {
          int64_t g = 0;
          for (int64_t part = 0; part < parts; ++part) {
            for (int64_t l = 0; l < part_nv[part]; ++l, ++g) {
              gmap[part][l] = static_cast<int32_t>(g);
              inv_part[g] = static_cast<int32_t>(part);
              inv_local[g] = static_cast<int32_t>(l);
            }
          }
        } else {
          std::vector<int64_t> head(parts, 0);
          for (int64_t g = 0; g < total; ++g) {
            const int64_t best = earliest_part(pb, part_nv, head);
            const int64_t l = head[best]++;
            gmap[best][l] = g < nv_global ? static_cast<int32_t>(g) : -1;
            if (g < nv_global) {
              inv_part[g] = static_cast<int32_t>(best);
              inv_local[g] = static_cast<int32_t>(l);
            }
          }
        }
        // 3. Voxel data at the global ids (counts with max_points applied), then the points.
        at::parallel_for(0, nv_global, kParallelVoxels, [&](int64_t g0, int64_t g1) {
          for (int64_t g = g0; g < g1; ++g) {
            PartBufs<K>& b = pb[inv_part[g]];
            const int64_t l = inv_local[g];
            as.vkey[g] = b.vkey[l];
            const int32_t kept = static_cast<int32_t>(std::min<int64_t>(b.vcount[l], mp_lim));
            as.vcount[g] = kept;
            if (mode == kList) {
              std::memcpy(vpts + g * max_points, b.vpts.data() + l * max_points, kept * sizeof(int32_t));
            } else if (mode == kAccumulate) {
              std::memcpy(acc + g * c, by_width<scalar_t>(b.accf, b.accd).data() + l * c, c * sizeof(scalar_t));
            }
          }
        });
        std::vector<int64_t> part_over_voxels(parts, 0), part_over_points(parts, 0);
        at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
          for (int64_t part = p0; part < p1; ++part) {
            PartBufs<K>& b = pb[part];
            int64_t ov = 0, op = 0;
            for (int64_t l = 0; l < part_nv[part]; ++l) {
              if (gmap[part][l] < 0) {
                ov += b.vcount[l];
              } else {
                op += std::max<int64_t>(0, b.vcount[l] - mp_lim);
              }
            }
            part_over_voxels[part] = ov;
            part_over_points[part] = op;
          }
        });
        at::parallel_for(0, num_chunks, kParallelChunks, [&](int64_t cb, int64_t ce) {
          for (int64_t chunk = cb; chunk < ce; ++chunk) {
            for (int64_t j = chunk * kChunk; j < chunk * kChunk + chunk_valid[chunk]; ++j) {
              const int64_t i = idx[j];
              const int64_t g = gmap[part_of(key[j], parts)][pv[i]];
              pv[i] = (g >= 0 && rank_of[i] < mp_lim) ? g : -1;
            }
          }
        });
        as.nv = nv_global;
        for (int64_t part = 0; part < parts; ++part) {
          as.over_voxels += part_over_voxels[part];
          as.over_points += part_over_points[part];
        }
      };
      // Grids of at most kDenseCells cells (pillar grids), and not many more cells than points, index
      // the voxels by a direct-mapped array: one load per point, no hashing or probing, and
      // neighbouring cells share cache lines (the hash table spreads them on purpose).
      constexpr uint64_t kDenseCells = uint64_t(1) << 21, kDenseCellsPerPoint = 16;
      const uint64_t cells = max_key + 1;
      const bool use_dense =
          cells <= kDenseCells && cells <= kDenseCellsPerPoint * static_cast<uint64_t>(std::min(valid, cap));
      if (use_dense && ws.dense.size() < cells) ws.dense.resize(cells, -1);  // new cells start empty
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) nonfinite += chunk_nonfinite[chunk];

      // Output rows [b, e) from the voxel data in `src`: coordinates, count, and the features unless
      // written from the points below.  One loop per mode and key width (the per-row work is a few
      // instructions).
      const int32_t kept_limit = static_cast<int32_t>(std::min<int64_t>(as.max_points, INT32_MAX));
      auto row_loop = [&](auto mode_tag, const auto& decode, const RowSrc<K, scalar_t>& src, int64_t b, int64_t e) {
        constexpr int M = decltype(mode_tag)::value;
        // Row by row: the outputs are written sequentially (they are cold); the voxel data, just
        // written by the pass above, is read through row_voxel, fetched a few rows ahead.
        // Everything the loop reads is copied into locals first: read through the captures, the
        // int32 and float row stores may alias them (the decoders' uint32 divisors among them), and
        // the compiler reloaded them after every store (A/B, padded rows at SECOND settings, 1
        // thread: 0.50 -> 0.40 ms warm and 0.52 -> 0.46 ms cold on scan 000001, 0.41 -> 0.35 ms
        // warm and 0.45 -> 0.42 ms cold on scan 000002).
        const auto dec = decode;  // holds its divisors by value
        const int32_t* const rvox = src.row_voxel;
        const K* const rkey = src.row_key;
        const int32_t* const vcnt = src.vcount;
        const int32_t* const lists = src.lists;
        const scalar_t* const pts = p;
        const scalar_t* const accs = src.acc;
        int32_t* const out_coords = src.coords;
        int32_t* const out_counts = src.counts;
        scalar_t* const out_feats = src.feats;
        const int64_t cols = c, width = f, slots = max_points;
        const int32_t limit = kept_limit;
        const bool mean = reduce == kMean;
#if SPARSECONV_VOXELIZE_AVX2
        const bool avx512_rows = rows512, avx2_rows = rows256;
#endif
        constexpr int64_t kAhead = 16;
        for (int64_t r = b; r < e; ++r) {
          int64_t v = r;
          if (rvox) {
            v = rvox[r];
            if (r + kAhead < e) {
              __builtin_prefetch(vcnt + rvox[r + kAhead]);
              if (M == kAccumulate) __builtin_prefetch(accs + rvox[r + kAhead] * cols);
            }
          }
          dec(rkey[r], out_coords + 4 * r);
          const int32_t m = std::min(vcnt[v], limit);
          out_counts[r] = m;
          scalar_t* out = out_feats + r * width;
          if (M == kList) {  // the padded row, from the listed points (the rows are the voxel ids)
            const int32_t* list = lists + v * slots;
#if defined(__SSE2__)
            if (std::is_same<scalar_t, float>::value && cols == 4) {
              float* o = reinterpret_cast<float*>(out);
              const float* pf = reinterpret_cast<const float*>(pts);
#if SPARSECONV_VOXELIZE_AVX2
              if (avx512_rows) {
                padded_row_avx512(o, pf, list, m, slots);
                continue;
              }
              if (avx2_rows) {
                padded_row_avx2(o, pf, list, m, slots);
                continue;
              }
#endif
              int64_t s = 0;
              for (; s < m; ++s) _mm_storeu_ps(o + 4 * s, _mm_loadu_ps(pf + 4 * static_cast<int64_t>(list[s])));
              for (; s < slots; ++s) _mm_storeu_ps(o + 4 * s, _mm_setzero_ps());
              continue;
            }
#endif
            for (int64_t s = 0; s < m; ++s) copy_row<0>(out + s * cols, pts + list[s] * cols, cols);
            std::fill(out + m * cols, out + width, scalar_t(0));
          } else if (M == kNone) {
            out[0] = static_cast<scalar_t>(m);
          } else if (M == kRank) {
            std::fill(out + m * cols, out + width, scalar_t(0));
          } else if (M == kAccumulate) {
            const scalar_t* a = accs + v * cols;
            if (mean) {
              const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(m);
              for (int64_t k = 0; k < cols; ++k) out[k] = a[k] * inv;
            } else {
              for (int64_t k = 0; k < cols; ++k) out[k] = a[k];
            }
          }
        }
      };
      // fn(decode, mode_tag) with this grid's key decoder and the mode as a type.
      auto with_row_kind = [&](const auto& fn) {
        auto for_mode = [&](const auto& decode) {
          switch (mode) {
            case kList:
              fn(decode, std::integral_constant<int, kList>());
              break;
            case kRank:
              fn(decode, std::integral_constant<int, kRank>());
              break;
            case kAccumulate:
              fn(decode, std::integral_constant<int, kAccumulate>());
              break;
            case kNone:
              fn(decode, std::integral_constant<int, kNone>());
              break;
          }
        };
        if (std::is_same<K, uint32_t>::value) {
          const Div32 dz(static_cast<uint32_t>(grid.Z)), dy(static_cast<uint32_t>(grid.Y)),
              dx(static_cast<uint32_t>(grid.X));
          for_mode([=](K key, int32_t* out) { decode_key(dz, dy, dx, static_cast<uint32_t>(key), out); });
        } else if (max_key < (uint64_t(1) << 52)) {
          const FastDiv dz(grid.Z), dy(grid.Y), dx(grid.X);
          for_mode([=](K key, int32_t* out) { decode_key(dz, dy, dx, static_cast<int64_t>(key), out); });
        } else {
          for_mode([=](K key, int32_t* out) { grid.decode(static_cast<int64_t>(key), out); });
        }
      };
      auto allocate_outputs = [&](int64_t nv) {
        coords = at::empty({nv, 4}, points.options().dtype(at::kInt));
        feats = reduce == kPad ? at::empty({nv, max_points, c}, points.options()) : at::empty({nv, f}, points.options());
        counts = at::empty({nv}, points.options().dtype(at::kInt));
      };

      // Key order with several threads (voxelize's layouts, not the padded one): the keys are split
      // into `parts` ranges with about as many points each (quantiles of a sample of the keys), and
      // each range is handled by one thread from the pass to its rows:
      //  0. the points of every chunk grouped by range (in parallel over chunks, stable);
      //  1. a range's points, in input order, through its own table (or its cells of the
      //     direct-mapped array): local voxel ids in local first-appearance order, each voxel's
      //     first point, all its points counted and the first max_points kept (a voxel's points all
      //     fall in one range, so the kept points and the running reductions are exactly the
      //     sequential pass's);
      //  2. (sequentially) with more voxels than max_voxels, the voxels to keep: the first max_voxels
      //     in order of first point, merged over the ranges (in each range a prefix of its ids).
      //     Each range's rows follow those of the ranges below it, since its keys are larger;
      //  3. a range's voxels sorted by key and written as rows, and its points' voxels moved to
      //     those rows.
      // There are two ranges per thread, taken by the threads as they finish one (run_tasks), the
      // ranges with most voxels first in step 3: near the sensor a range of points holds far fewer
      // voxels than one far away (KITTI scan 000002 at SECOND settings split in two: 11.7k and 21k
      // voxels).  The result is the sequential path's.  A/B on 2 threads, mean at SECOND settings:
      // 0.96-1.06 -> 0.73-0.80 ms back to back, 1.43-1.65 -> 1.24-1.31 ms cold (docs/benchmarks.md).
      auto assign_ranges = [&](int64_t parts) {
        // The calling thread's workspace (`ws` inside the parallel regions would name each worker's own).
        auto& pb = by_width<K>(ws.parts32, ws.parts64);
        if (static_cast<int64_t>(pb.size()) < parts) pb.resize(parts);
        int32_t* const dense_cells = use_dense ? ws.dense.data() : nullptr;
        // Range q holds the keys k with bound[q] <= k < bound[q + 1].
        std::vector<K> bound(parts + 1);
        {
          const int64_t stride = std::max<int64_t>(1, valid / 512);
          std::vector<K> sample;
          sample.reserve(valid / stride + 1);
          int64_t seen = 0, next = 0;  // the valid points 0, stride, 2 stride, ...
          for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
            for (; next < seen + chunk_valid[chunk]; next += stride) sample.push_back(key[chunk * kChunk + next - seen]);
            seen += chunk_valid[chunk];
          }
          std::sort(sample.begin(), sample.end());
          bound[0] = 0;
          for (int64_t q = 1; q < parts; ++q) bound[q] = sample[static_cast<size_t>(sample.size() * q / parts)];
          bound[parts] = static_cast<K>(max_key + 1);  // max_key < the largest K
        }
        // 0. Chunk c's points of range q are rkey/ridx[seg[c][q], seg[c][q + 1]) (in chunk c's slice).
        const int64_t stride_seg = parts + 1;
        K* rkey = cpu::scratch(by_width<K>(ws.rkey32, ws.rkey64), n);
        int32_t* ridx = cpu::scratch(ws.ridx, n);
        int64_t* seg = cpu::scratch(ws.seg, num_chunks * stride_seg);
        const K* const bnd = bound.data();
        // In scan order a range's points come in long runs (KITTI scans at SECOND settings split in
        // four ranges: 0.7-1.9k changes of range in ~63k points), so each chunk is cut into runs of
        // one range, and the runs are copied whole: a per-point counter of the point's range was a
        // chain of dependent memory increments wherever consecutive points share a range.
        at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
          std::vector<int64_t> run_end;  // the runs of the chunk: [run_end[r - 1], run_end[r]) in range run_q[r]
          std::vector<uint8_t> run_q;
          for (int64_t chunk = cb; chunk < ce; ++chunk) {
            const int64_t base = chunk * kChunk, cv = chunk_valid[chunk];
            const K* ck = key + base;
            const int32_t* ci = idx + base;
            int64_t pos[kMaxRanges + 1] = {};
            run_end.clear();
            run_q.clear();
            for (int64_t j = 0; j < cv;) {
              int64_t q = 0;
              for (int64_t t = 1; t < parts; ++t) q += ck[j] >= bnd[t];
              const K lo = bnd[q], span = static_cast<K>(bnd[q + 1] - bnd[q] - 1);  // keys lo .. lo + span
              const int64_t start = j;
              for (++j; j < cv && static_cast<K>(ck[j] - lo) <= span; ++j) {
              }
              run_end.push_back(j);
              run_q.push_back(static_cast<uint8_t>(q));
              pos[q + 1] += j - start;
            }
            int64_t* sg = seg + chunk * stride_seg;
            pos[0] = base;
            for (int64_t q = 0; q < parts; ++q) pos[q + 1] += pos[q];
            std::copy(pos, pos + parts + 1, sg);
            int64_t start = 0;
            for (size_t r = 0; r < run_end.size(); start = run_end[r++]) {
              const int64_t len = run_end[r] - start, at = pos[run_q[r]];
              pos[run_q[r]] += len;
              std::memcpy(rkey + at, ck + start, len * sizeof(K));
              std::memcpy(ridx + at, ci + start, len * sizeof(int32_t));
            }
          }
        });
        const int64_t mp_lim = as.max_points;
        std::vector<int64_t> part_nv(parts);
        // 1. The pass, range by range.
        run_tasks(parts, [&](int64_t q) {
          PartBufs<K>& b = pb[q];
          int64_t m = 0;  // points in the range
          for (int64_t chunk = 0; chunk < num_chunks; ++chunk) m += seg[chunk * stride_seg + q + 1] - seg[chunk * stride_seg + q];
          Assign<K> a;
          a.pv = pv;
          a.vkey = cpu::scratch(b.vkey, m);
          a.vcount = cpu::scratch(b.vcount, m);
          a.vslot = cpu::scratch(b.vslot, m);
          a.max_voxels = INT64_MAX;
          a.max_points = mp_lim;
          if (dense_cells) {
            a.dense = dense_cells;  // the ranges' cells are disjoint
          } else {
            a.table = KeyTable<K>::make(b.table, m);
          }
          int32_t* first = cpu::scratch(b.first, m);
          auto add = [&](const auto& on_point) {
            auto record = [first, on_point](int64_t i, int64_t v, int32_t s, bool keep) {
              if (s == 0) first[v] = static_cast<int32_t>(i);
              on_point(i, v, s, keep);
            };
            for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
              const int64_t s0 = seg[chunk * stride_seg + q], s1 = seg[chunk * stride_seg + q + 1];
              a.template add<true>(rkey + s0, ridx + s0, s1 - s0, record);
            }
          };
          if (mode == kAccumulate) {
            scalar_t* la = cpu::scratch(by_width<scalar_t>(b.accf, b.accd), m * c);
            if (c == 4) {
              add(folder(std::integral_constant<int, 4>(), la));
            } else {
              add(folder(std::integral_constant<int, 0>(), la));
            }
          } else {
            add([](int64_t, int64_t, int32_t, bool) {});
          }
          a.clear_table();
          part_nv[q] = a.nv;
        });
        // 2. The voxels kept in each range: ids 0 .. kept[q] - 1.
        std::vector<int64_t> kept(part_nv);
        int64_t total = 0;
        for (int64_t q = 0; q < parts; ++q) total += part_nv[q];
        if (total > as.max_voxels) {
          std::fill(kept.begin(), kept.end(), 0);
          for (int64_t g = 0; g < as.max_voxels; ++g) ++kept[earliest_part(pb, part_nv, kept)];
        }
        std::vector<int64_t> row0(parts + 1, 0), order(parts);
        for (int64_t q = 0; q < parts; ++q) {
          row0[q + 1] = row0[q] + kept[q];
          order[q] = q;
        }
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return kept[x] > kept[y]; });
        allocate_outputs(row0[parts]);
        int32_t* cp = coords.data_ptr<int32_t>();
        int32_t* cnt = counts.data_ptr<int32_t>();
        scalar_t* fp = feats.data_ptr<scalar_t>();
        // 3. Rows and points, range by range.
        std::vector<int64_t> part_ov(parts, 0), part_op(parts, 0);
        run_tasks(parts, [&](int64_t t) {
          const int64_t q = order[t];
          PartBufs<K>& b = pb[q];
          const K lo = bound[q], span = bound[q + 1] - bound[q];
          const int64_t nk = kept[q], off = row0[q];
          sort_voxels(b.vkey.data(), nk, lo, span > 0 ? static_cast<uint64_t>(span - 1) : 0, b.sort);
          const RowSrc<K, scalar_t> src{b.sort.sv.data(),
                                        b.sort.skey.data(),
                                        b.vcount.data(),
                                        nullptr,
                                        mode == kAccumulate ? by_width<scalar_t>(b.accf, b.accd).data() : nullptr,
                                        cp + 4 * off,
                                        cnt + off,
                                        fp + off * f};
          with_row_kind([&](const auto& decode, auto mode_tag) { row_loop(mode_tag, decode, src, 0, nk); });
          const int32_t* vc = b.vcount.data();
          int64_t ov = 0, op = 0;
          for (int64_t v = 0; v < nk; ++v) op += std::max<int64_t>(0, vc[v] - mp_lim);
          for (int64_t v = nk; v < part_nv[q]; ++v) ov += vc[v];
          part_ov[q] = ov;
          part_op[q] = op;
          static const int32_t kNoRank = 0;
          const int32_t* rk = nk > 0 ? b.sort.rank.data() : &kNoRank;  // read (and ignored) below
          for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
            const int64_t s0 = seg[chunk * stride_seg + q], s1 = seg[chunk * stride_seg + q + 1];
            for (int64_t j = s0; j < s1; ++j) {
              // Without a branch on whether the point was kept (unpredictable in dense voxels).
              const int64_t i = ridx[j];
              const int64_t lv = pv[i];
              const bool in = static_cast<uint64_t>(lv) < static_cast<uint64_t>(nk);  // -1: not kept
              const int64_t row = off + rk[in ? lv : 0];
              pv[i] = in ? row : -1;
            }
          }
        });
        for (int64_t q = 0; q < parts; ++q) {
          over_voxels += part_ov[q];
          over_points += part_op[q];
        }
      };
      // Key order with two threads or more and enough points: assign_ranges, which writes everything.
      constexpr int64_t kRangePoints = int64_t(1) << 15;
      // The padded rows from lists (first-appearance order) on two threads: the pass as a pipeline.
      // Thread 0 (the producer) looks each valid point's key up in the table, in input order, and
      // writes its voxel id (voxels opened in first-appearance order, max_voxels applied); thread 1
      // (the consumer) follows it through the same points: counts, max_points, the point lists and
      // point_voxel.  The consumer waits for the producer's published progress (release/acquire),
      // so every id it reads, and the voxel's zeroed count, were written before; the producer never
      // waits.  On one thread the roles run one after the other.  The result is the sequential
      // pass's.  A/B (2 threads, medians of 4-5 interleaved processes, docs/benchmarks.md): padded
      // rows at SECOND settings 0.80-0.81 -> 0.72-0.76 ms warm and 1.27-1.28 -> 1.13-1.16 ms cold
      // on scans 000001 and 000002, at PointPillars settings 0.40-0.51 -> 0.34-0.46 ms warm (a second
      // round, on a noisier VM, agreed but for PointPillars on scan 000001 and one warm SECOND cell).
      //
      // The consumer's work goes in blocks of the valid points, in order.  When the producer is
      // done it takes the consumer's role over from the next block (the consumer finishes the block
      // it holds and stops): a consumer on a slow or late-waking thread then no longer holds the
      // call up (in one benchmark run on the development VM the padded layout of one scan took
      // twice its usual time in 47 of 50 rounds, while the other layout, timed in the same rounds,
      // did not).
      auto assign_pipelined = [&]() {
        int32_t* vid = cpu::scratch(ws.vid, n);
        // Block t: chunk block_chunk[t], points [block_begin[t], block_end[t]) of its compacted
        // slice, the valid points block_seq[t] .. block_seq[t] + (end - begin) - 1 in input order.
        constexpr int64_t kBlock = 1024;
        std::vector<int64_t> block_chunk, block_begin, block_end, block_seq;
        for (int64_t chunk = 0, seq = 0; chunk < num_chunks; seq += chunk_valid[chunk++]) {
          for (int64_t j = 0; j < chunk_valid[chunk]; j += kBlock) {
            block_chunk.push_back(chunk);
            block_begin.push_back(j);
            block_end.push_back(std::min(chunk_valid[chunk], j + kBlock));
            block_seq.push_back(seq + j);
          }
        }
        const int64_t blocks = static_cast<int64_t>(block_chunk.size());
        // Each on its own cache lines: the consumer spins on them while the producer writes.
        struct alignas(64) Counter {
          std::atomic<int64_t> value{0};
        };
        Counter progress;  // valid points (in input order) whose voxel id is written
        Counter next;      // the next block to consume
        Counter done;      // blocks consumed
        Counter takeover;  // 1 once the producer consumes
        int64_t ov_role[2] = {0, 0}, op_role[2] = {0, 0};
        auto spin_until = [](const std::atomic<int64_t>& a, int64_t at_least) {
          while (a.load(std::memory_order_acquire) < at_least) {
#if defined(__SSE2__)
            _mm_pause();
#endif
          }
        };
        auto produce = [&](auto dense_tag) {
          constexpr bool Dense = decltype(dense_tag)::value;
          const KeyTable<K> tab = as.table;
          const int32_t* const cells = as.dense;
          int64_t seq = 0;
          constexpr int64_t kPublish = 1024;
          for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
            const K* ck = key + chunk * kChunk;
            int32_t* cv = vid + chunk * kChunk;
            const int64_t m = chunk_valid[chunk];
            for (int64_t j = 0; j < m; ++j) {
              cv[j] = static_cast<int32_t>(as.template voxel_of<Dense>(ck, j, m, tab, cells));
              if (((j + 1) & (kPublish - 1)) == 0) progress.value.store(seq + j + 1, std::memory_order_release);
            }
            seq += m;
            progress.value.store(seq, std::memory_order_release);
          }
        };
        // Block t: counts, max_points, the lists and point_voxel, after block t - 1 and after the
        // producer's ids.
        auto consume = [&](int64_t t, int role) {
          spin_until(done.value, t);
          spin_until(progress.value, block_seq[t] + block_end[t] - block_begin[t]);
          int32_t* const count = as.vcount;
          int32_t* const lists = vpts;
          int64_t* const point_voxel = pv;
          const int64_t limit = as.max_points, slots = max_points;
          const int32_t* ci = idx + block_chunk[t] * kChunk;
          const int32_t* cv = vid + block_chunk[t] * kChunk;
          int64_t ov = 0, op = 0;
          for (int64_t j = block_begin[t]; j < block_end[t]; ++j) {
            Assign<K>::template count_point<false>(ci[j], cv[j], count, point_voxel, limit, ov, op,
                                                   [lists, slots](int64_t i, int64_t v, int32_t s, bool keep) {
                                                     if (keep) lists[v * slots + s] = static_cast<int32_t>(i);
                                                   });
          }
          ov_role[role] += ov;
          op_role[role] += op;
          done.value.store(t + 1, std::memory_order_release);
        };
        auto producer = [&]() {
          if (as.dense) {
            produce(std::true_type());
          } else {
            produce(std::false_type());
          }
          takeover.value.store(1, std::memory_order_release);
          for (int64_t t = next.value.fetch_add(1); t < blocks; t = next.value.fetch_add(1)) consume(t, 0);
        };
        auto consumer = [&]() {
          for (;;) {
            if (takeover.value.load(std::memory_order_acquire)) return;
            int64_t t = next.value.load(std::memory_order_relaxed);
            // Fails only if the producer has taken the block over (only it and this thread claim).
            if (t >= blocks || !next.value.compare_exchange_strong(t, t + 1)) return;
            consume(t, 1);
          }
        };
        at::parallel_for(0, 2, 1, [&](int64_t b, int64_t e) {
          for (int64_t role = b; role < e; ++role) {  // in this order on one thread
            if (role == 0) {
              producer();
            } else {
              consumer();
            }
          }
        });
        as.over_voxels += ov_role[0] + ov_role[1];
        as.over_points += op_role[0] + op_role[1];
      };
      if (!order_by_first && (mode == kAccumulate || mode == kNone) && valid >= kRangePoints &&
          at::get_num_threads() > 1 && !at::in_parallel_region()) {
        assign_ranges(std::min<int64_t>(2 * at::get_num_threads(), kMaxRanges));
        return;
      }

      // With several threads and enough points, the pass is split over partitions of the keys
      // (assign_partitioned above); the result is the same.
      const int64_t parts = valid >= kParallelPoints ? std::min<int64_t>(at::get_num_threads(), 16) : 1;
      if (parts > 1) {
        assign_partitioned(parts);
      } else {
        if (use_dense) {
          as.dense = ws.dense.data();
        } else {
          as.table = KeyTable<K>::make(table_buf, std::min(valid, cap));
        }
        switch (mode) {
        case kList:
          if (valid >= kRangePoints && at::get_num_threads() > 1 && !at::in_parallel_region()) {
            assign_pipelined();
            break;
          }
          assign_all([vpts, max_points](int64_t i, int64_t v, int32_t s, bool keep) {
            if (keep) vpts[v * max_points + s] = static_cast<int32_t>(i);
          });
          break;
        case kRank:
          assign_all([pslot](int64_t i, int64_t, int32_t s, bool) { pslot[i] = s; });
          break;
        case kAccumulate:
          if (c == 4) {
            accumulate(std::integral_constant<int, 4>());
          } else {
            accumulate(std::integral_constant<int, 0>());
          }
          break;
        case kNone:
          assign_all([](int64_t, int64_t, int32_t, bool) {});
          break;
        }
        as.clear_table();
      }
      over_voxels = as.over_voxels;
      over_points = as.over_points;
      const int64_t nv = as.nv;
      const K* vkey = as.vkey;
      const int32_t* vcount = as.vcount;

      // 2. Output order: first appearance (the ids), or (batch, x, y, z) = key order.
      const int32_t* rank = nullptr;       // voxel id -> output row (null: identity)
      const int32_t* row_voxel = nullptr;  // output row -> voxel id (null: identity)
      const K* row_key = vkey;             // output row -> key
      if (!order_by_first && nv > 1) {
        sort_voxels(vkey, nv, K(0), max_key, sort_bufs);
        rank = sort_bufs.rank.data();
        row_voxel = sort_bufs.sv.data();
        row_key = sort_bufs.skey.data();
      }

      // 3. Outputs.  Every element is written exactly once (padding zeros included).
      allocate_outputs(nv);
      int32_t* cp = coords.data_ptr<int32_t>();
      int32_t* cnt = counts.data_ptr<int32_t>();
      scalar_t* fp = feats.data_ptr<scalar_t>();
      const RowSrc<K, scalar_t> src{row_voxel, row_key, vcount, vpts, acc, cp, cnt, fp};
      with_row_kind([&](const auto& decode, auto mode_tag) {
        // Blocks of rows taken by the threads as they finish one (run_tasks): a slow or late thread
        // leaves its share to the others.
        constexpr int64_t kRowBlock = 2048;
        if (nv > kParallelVoxels && at::get_num_threads() > 1 && !at::in_parallel_region()) {
          run_tasks((nv + kRowBlock - 1) / kRowBlock, [&](int64_t t) {
            row_loop(mode_tag, decode, src, t * kRowBlock, std::min(nv, (t + 1) * kRowBlock));
          });
        } else {
          row_loop(mode_tag, decode, src, 0, nv);
        }
      });
      // The padded rows from the points; point_voxel in output rows.
      auto write_padded = [&](auto cc_tag) {
        constexpr int CC = decltype(cc_tag)::value;
        const int64_t cols = CC > 0 ? CC : c;
        if (mode == kRank) {  // each kept point has its own slot: any split is race-free (kList rows are
                              // written above)
          at::parallel_for(0, num_chunks, kParallelChunks, [&](int64_t cb, int64_t ce) {
            for (int64_t chunk = cb; chunk < ce; ++chunk) {
              for (int64_t j = chunk * kChunk; j < chunk * kChunk + chunk_valid[chunk]; ++j) {
                const int64_t i = idx[j];
                int64_t v = pv[i];
                if (v < 0) continue;
                if (rank) pv[i] = v = rank[v];
                copy_row<CC>(fp + v * f + pslot[i] * cols, p + i * cols, c);
              }
            }
          });
        }
      };
      if (reduce == kPad) {
        if (c == 4) {
          write_padded(std::integral_constant<int, 4>());
        } else {
          write_padded(std::integral_constant<int, 0>());
        }
      } else if (rank) {
        at::parallel_for(0, num_chunks, kParallelChunks, [&](int64_t cb, int64_t ce) {
          for (int64_t chunk = cb; chunk < ce; ++chunk) {
            for (int64_t j = chunk * kChunk; j < chunk * kChunk + chunk_valid[chunk]; ++j) {
              const int64_t i = idx[j];
              if (pv[i] >= 0) pv[i] = rank[pv[i]];
            }
          }
        });
      }
    };
    if (max_key < UINT32_MAX) {
      run(uint32_t(0), ws.key32, ws.table32, ws.vkey32, ws.sort32);
    } else {
      run(uint64_t(0), ws.key64, ws.table64, ws.vkey64, ws.sort64);
    }
  });

  const int64_t outside = n - nonfinite - valid;
  at::Tensor drops = at::empty({4}, points.options().dtype(at::kLong));
  int64_t* dp = drops.data_ptr<int64_t>();
  dp[0] = nonfinite;
  dp[1] = outside;
  dp[2] = over_voxels;
  dp[3] = over_points;
  return {coords, feats, point_voxel, counts, drops};
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("voxelize", &voxelize_cpu);
}

}  // namespace sparseconv
