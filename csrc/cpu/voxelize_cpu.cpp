#include <algorithm>
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
#include "radix_sort.h"

namespace sparseconv {

namespace {

using Reduce = VoxelReduce;


// Scratch of one group of points in the split first-appearance pass (see voxelize_cpu): its own
// table and voxels in local first-appearance order, and their global ids / rank offsets.
template <typename K>
struct GroupBufs {
  std::vector<K> table, vkey;
  std::vector<int32_t> vcount, vslot, gmap, goff;
};

// Scratch buffers of one calling thread (see voxelize_cpu).
struct Workspace {
  std::vector<uint32_t> key32, table32, vkey32, skey32, skey32_tmp;
  std::vector<uint64_t> key64, table64, vkey64, skey64, skey64_tmp;
  std::vector<int32_t> idx, pslot, vpts, vcount, vslot, sv, sv_tmp, rank, csr, csr_start;
  std::vector<int64_t> chunk_valid, chunk_nonfinite, hist;
  std::vector<float> accf;
  std::vector<double> accd;
  std::vector<GroupBufs<uint32_t>> groups32;
  std::vector<GroupBufs<uint64_t>> groups64;
};

template <typename K>
std::vector<GroupBufs<K>>& group_bufs(Workspace& ws) {
  if constexpr (std::is_same<K, uint32_t>::value) {
    return ws.groups32;
  } else {
    return ws.groups64;
  }
}

// Open-addressing hash table (linear probing, power-of-two capacity) from a voxel key to its
// voxel id, in the calling thread's workspace.  Between calls every slot holds the empty key:
// a call clears exactly the slots it filled, so no call pays for clearing the whole table.
// Entries are (key, id) pairs; 32-bit keys when the grid allows (half the cache footprint).
template <typename K>
struct KeyTable {
  static constexpr K kEmpty = ~K(0);  // also the "dropped point" key: never inserted
  K* slots;                           // 2 * capacity: key, id, key, id, ...
  uint64_t mask;
  int shift;

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
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// KeyMaker::key for float points with 4 columns and 32-bit keys, two points per 256-bit step
// (the build targets baseline x86-64; this runs only where the CPU has AVX2).  The same
// arithmetic: one correctly rounded division per axis, the same range tests, and the key
// ((b * X + x) * Y + y) * Z + z = b * XYZ + x * YZ + y * Z + z in 32-bit lanes (exact: keys < 2^32).
struct Float4KeysAvx2 {
  const float* p;
  const int64_t* bp;
  float lo[3], vs[3];
  int32_t g[3];
  uint32_t yz, z, xyz;

  // Points [begin, end) (an even count); returns the new end of the compacted keys.
  __attribute__((target("avx2"))) int64_t run(int64_t begin, int64_t end, uint32_t* key, int32_t* idx, int64_t j,
                                              int64_t* pv, int64_t* nonfinite) const {
    const __m256 lo8 = _mm256_setr_ps(lo[0], lo[1], lo[2], 0.f, lo[0], lo[1], lo[2], 0.f);
    const __m256 vs8 = _mm256_setr_ps(vs[0], vs[1], vs[2], 1.f, vs[0], vs[1], vs[2], 1.f);
    const __m256 zero = _mm256_setzero_ps(), lim = _mm256_set1_ps(2147483648.f);
    const __m256i g8 = _mm256_setr_epi32(g[0], g[1], g[2], INT32_MAX, g[0], g[1], g[2], INT32_MAX);
    const __m256i mul8 = _mm256_setr_epi32(int32_t(yz), int32_t(z), 1, 0, int32_t(yz), int32_t(z), 1, 0);
    int64_t nf = 0;
    for (int64_t i = begin; i < end; i += 2) {
      const __m256 t = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(p + 4 * i), lo8), vs8);
      const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(t, zero, _CMP_GE_OQ), _mm256_cmp_ps(t, lim, _CMP_LT_OQ));
      const __m256i q = _mm256_cvttps_epi32(t);
      const __m256i in = _mm256_and_si256(_mm256_castps_si256(ok), _mm256_cmpgt_epi32(g8, q));
      const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(in));
      const __m256i prod = _mm256_mullo_epi32(q, mul8);
      const __m256i s1 = _mm256_add_epi32(prod, _mm256_shuffle_epi32(prod, _MM_SHUFFLE(2, 3, 0, 1)));
      const __m256i s2 = _mm256_add_epi32(s1, _mm256_shuffle_epi32(s1, _MM_SHUFFLE(1, 0, 3, 2)));
      const uint32_t k[2] = {static_cast<uint32_t>(_mm256_cvtsi256_si32(s2)),
                             static_cast<uint32_t>(_mm256_extract_epi32(s2, 4))};
      for (int u = 0; u < 2; ++u) {
        const int64_t ii = i + u;
        key[j] = k[u] + (bp ? static_cast<uint32_t>(bp[ii]) * xyz : 0u);
        idx[j] = static_cast<int32_t>(ii);
        if (C10_LIKELY(((mask >> (4 * u)) & 7) == 7)) {
          ++j;
        } else {
          const float* r = p + 4 * ii;
          nf += !(std::isfinite(r[0]) && std::isfinite(r[1]) && std::isfinite(r[2]));
          pv[ii] = -1;
        }
      }
    }
    *nonfinite += nf;
    return j;
  }
};
#endif

// The voxels of the valid points in input order: a voxel id on first sight (the first max_voxels
// voxels only), each point's voxel (or -1) and its slot (rank among the voxel's kept points).
template <typename K>
struct Assign {
  int64_t* pv;       // [n] voxel id or -1
  K* vkey;           // [cap] key of voxel v
  int32_t* vcount;   // [cap] kept points of voxel v
  int32_t* vslot;    // [cap] table slot of voxel v
  KeyTable<K> table;
  int64_t max_voxels, max_points;  // INT64_MAX when unlimited
  int64_t nv = 0, over_voxels = 0, over_points = 0;

  // The voxel of key k: found, inserted (a new id), or -1 (new beyond max_voxels: not inserted,
  // so the later points of that voxel are dropped too).
  int64_t probe(K k, uint64_t h) {
    for (;;) {
      const K s = table.slots[2 * h];
      if (s == k) return static_cast<int64_t>(table.slots[2 * h + 1]);
      if (s == KeyTable<K>::kEmpty) {
        if (nv >= max_voxels) return -1;
        const int64_t v = nv++;
        table.slots[2 * h] = k;
        table.slots[2 * h + 1] = static_cast<K>(v);
        vkey[v] = k;
        vcount[v] = 0;
        vslot[v] = static_cast<int32_t>(h);
        return v;
      }
      h = (h + 1) & table.mask;
    }
  }

  // Points idx[0, m) (valid, in input order) with keys key[0, m); on_point(i, v, s, kept) is
  // called for each point that has a voxel (s: its rank among the voxel's points so far).
  template <typename OnPoint>
  void add(const K* key, const int32_t* idx, int64_t m, const OnPoint& on_point) {
    int64_t ov = 0, op = 0;
    // The table is about as large as L2 and cold on entry: fetch the slots of later points early
    // (A/B: 16 points ahead cut the pass by ~25%, 40 by another ~5%).
    constexpr int64_t kAhead = 40;
    for (int64_t j = 0; j < m; ++j) {
      const K k = key[j];
      if (j + kAhead < m) __builtin_prefetch(table.slots + 2 * table.home(key[j + kAhead]));
      const int64_t i = idx[j];
      const uint64_t h = table.home(k);
      int64_t v;
      if (C10_LIKELY(table.slots[2 * h] == k)) {
        v = static_cast<int64_t>(table.slots[2 * h + 1]);
      } else {
        v = probe(k, h);
        if (v < 0) {
          ++ov;
          pv[i] = -1;
          continue;
        }
      }
      const int32_t s = vcount[v];
      const bool keep = s < max_points;
      vcount[v] = s + keep;
      op += !keep;
      pv[i] = keep ? v : -1;
      on_point(i, v, s, keep);
    }
    over_voxels += ov;
    over_points += op;
  }

  void clear_table() {
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

template <typename scalar_t>
std::vector<scalar_t>& acc_buf(Workspace& ws) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    return ws.accf;
  } else {
    return ws.accd;
  }
}

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
                   std::vector<decltype(key_tag)>& vkey_buf, std::vector<decltype(key_tag)>& skey_buf,
                   std::vector<decltype(key_tag)>& skey_tmp_buf) {
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
      const int64_t num_chunks = (n + kChunk - 1) / kChunk;
      K* key = cpu::scratch(key_buf, n);
      int32_t* idx = cpu::scratch(ws.idx, n);
      int64_t* chunk_valid = cpu::scratch(ws.chunk_valid, num_chunks);
      int64_t* chunk_nonfinite = cpu::scratch(ws.chunk_nonfinite, num_chunks);
#if SPARSECONV_VOXELIZE_AVX2
      const bool avx2_keys = std::is_same<scalar_t, float>::value && std::is_same<K, uint32_t>::value && c == 4 &&
                             cpu_has_avx2();
#endif
      at::parallel_for(0, num_chunks, kParallelChunks, [&](int64_t cb, int64_t ce) {
        for (int64_t chunk = cb; chunk < ce; ++chunk) {
          int64_t nf = 0, j = chunk * kChunk, i = chunk * kChunk;
          const int64_t end = std::min(n, (chunk + 1) * kChunk);
#if SPARSECONV_VOXELIZE_AVX2
          if (avx2_keys) {
            Float4KeysAvx2 a{reinterpret_cast<const float*>(p), bp, {float(km.lo[0]), float(km.lo[1]), float(km.lo[2])},
                             {float(km.vs[0]), float(km.vs[1]), float(km.vs[2])},
                             {int32_t(grid.X), int32_t(grid.Y), int32_t(grid.Z)},
                             static_cast<uint32_t>(grid.Y * grid.Z), static_cast<uint32_t>(grid.Z),
                             static_cast<uint32_t>(grid.X * grid.Y * grid.Z)};
            const int64_t pairs_end = i + (end - i) / 2 * 2;
            j = a.run(i, pairs_end, reinterpret_cast<uint32_t*>(key), idx, j, pv, &nf);
            i = pairs_end;
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
      as.table = KeyTable<K>::make(table_buf, std::min(valid, cap));
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
      scalar_t* acc = mode == kAccumulate ? cpu::scratch(acc_buf<scalar_t>(ws), max_nv * c) : nullptr;
      auto assign_all = [&](const auto& on_point) {
        for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
          as.add(key + chunk * kChunk, idx + chunk * kChunk, chunk_valid[chunk], on_point);
        }
      };
      auto accumulate = [&](auto cc_tag) {
        constexpr int CC = decltype(cc_tag)::value;
        const int64_t cols = CC > 0 ? CC : c;
        assign_all([&](int64_t i, int64_t v, int32_t s, bool keep) {
          if (!keep) return;
          const scalar_t* row = p + i * cols;
          scalar_t* a = acc + v * cols;
          if (s == 0) {
            copy_row<CC>(a, row, c);
          } else {
            fold_row<CC>(a, row, c, reduce);
          }
        });
      };
      // The first-appearance pass split over `groups` groups of consecutive chunks:
      //  1. in parallel, each group walks its points in order through its own table: local voxel
      //     ids in local first-appearance order and each point's local rank (group 0 uses the
      //     global table, so its ids are global and max_voxels applies to it directly);
      //  2. sequentially, the voxels of groups 1, 2, ... in their local order are looked up in (or
      //     added to) the global table: this is exactly the global first-appearance order, since
      //     every point of group g comes after those of groups < g.  A voxel's rank offset in group
      //     g is its count over the groups before;
      //  3. in parallel, each point's global voxel and rank (kept when below max_points); the
      //     running reductions are then computed voxel by voxel over the points in input order, so
      //     the sums are bit-identical to the sequential pass.
      auto assign_split = [&](int64_t groups) {
        const int64_t mp_lim = as.max_points;
        as.max_points = INT64_MAX;  // raw ranks and counts first
        auto& gb = group_bufs<K>(ws);
        if (static_cast<int64_t>(gb.size()) < groups) gb.resize(groups);
        std::vector<Assign<K>> gas(groups);
        int32_t* rank_of = cpu::scratch(ws.pslot, n);  // local, then global rank of each point
        auto chunk_lo = [&](int64_t g) { return g * num_chunks / groups; };
        at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
          for (int64_t g = g0; g < g1; ++g) {
            Assign<K>& a = g == 0 ? as : gas[g];
            if (g > 0) {
              int64_t m = 0;
              for (int64_t chunk = chunk_lo(g); chunk < chunk_lo(g + 1); ++chunk) m += chunk_valid[chunk];
              a.pv = pv;
              a.vkey = cpu::scratch(gb[g].vkey, m);
              a.vcount = cpu::scratch(gb[g].vcount, m);
              a.vslot = cpu::scratch(gb[g].vslot, m);
              a.table = KeyTable<K>::make(gb[g].table, m);
              a.max_voxels = INT64_MAX;
              a.max_points = INT64_MAX;
            }
            for (int64_t chunk = chunk_lo(g); chunk < chunk_lo(g + 1); ++chunk) {
              a.add(key + chunk * kChunk, idx + chunk * kChunk, chunk_valid[chunk],
                    [&](int64_t i, int64_t, int32_t s, bool) { rank_of[i] = s; });
            }
            if (g > 0) a.clear_table();
          }
        });
        for (int64_t g = 1; g < groups; ++g) {
          const Assign<K>& a = gas[g];
          int32_t* gmap = cpu::scratch(gb[g].gmap, a.nv);
          int32_t* goff = cpu::scratch(gb[g].goff, a.nv);
          constexpr int64_t kAhead = 32;
          for (int64_t lv = 0; lv < a.nv; ++lv) {
            if (lv + kAhead < a.nv) __builtin_prefetch(as.table.slots + 2 * as.table.home(a.vkey[lv + kAhead]));
            const K k = a.vkey[lv];
            const int64_t v = as.probe(k, as.table.home(k));
            gmap[lv] = static_cast<int32_t>(v);
            if (v < 0) {
              goff[lv] = 0;
              as.over_voxels += a.vcount[lv];
              continue;
            }
            goff[lv] = as.vcount[v];
            as.vcount[v] += a.vcount[lv];
          }
        }
        for (int64_t v = 0; v < as.nv; ++v) {
          if (as.vcount[v] > mp_lim) {
            as.over_points += as.vcount[v] - mp_lim;
            as.vcount[v] = static_cast<int32_t>(mp_lim);
          }
        }
        as.max_points = mp_lim;
        int32_t* start = nullptr;
        int32_t* csr = nullptr;
        if (mode == kAccumulate) {  // the kept points of each voxel, in input order
          start = cpu::scratch(ws.csr_start, as.nv + 1);
          start[0] = 0;
          for (int64_t v = 0; v < as.nv; ++v) start[v + 1] = start[v] + as.vcount[v];
          csr = cpu::scratch(ws.csr, start[as.nv]);
        }
        at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
          for (int64_t g = g0; g < g1; ++g) {
            const int32_t* gmap = g > 0 ? gb[g].gmap.data() : nullptr;
            const int32_t* goff = g > 0 ? gb[g].goff.data() : nullptr;
            for (int64_t chunk = chunk_lo(g); chunk < chunk_lo(g + 1); ++chunk) {
              for (int64_t j = chunk * kChunk; j < chunk * kChunk + chunk_valid[chunk]; ++j) {
                const int64_t i = idx[j];
                const int64_t lv = pv[i];
                if (lv < 0) continue;  // group 0: beyond max_voxels
                const int64_t v = gmap ? gmap[lv] : lv;
                const int64_t s = (goff ? goff[lv] : 0) + rank_of[i];
                if (v < 0 || s >= mp_lim) {
                  pv[i] = -1;
                  continue;
                }
                pv[i] = v;
                switch (mode) {
                  case kList:
                    vpts[v * max_points + s] = static_cast<int32_t>(i);
                    break;
                  case kRank:
                    rank_of[i] = static_cast<int32_t>(s);
                    break;
                  case kAccumulate:
                    csr[start[v] + s] = static_cast<int32_t>(i);
                    break;
                  case kNone:
                    break;
                }
              }
            }
          }
        });
        if (mode == kAccumulate) {
          auto reduce_voxels = [&](auto cc_tag) {
            constexpr int CC = decltype(cc_tag)::value;
            const int64_t cols = CC > 0 ? CC : c;
            at::parallel_for(0, as.nv, kParallelVoxels, [&](int64_t b, int64_t e) {
              for (int64_t v = b; v < e; ++v) {
                const int32_t* list = csr + start[v];
                const int64_t m = as.vcount[v];
                scalar_t* a = acc + v * cols;
                if (m == 0) continue;
                copy_row<CC>(a, p + list[0] * cols, c);
                for (int64_t s = 1; s < m; ++s) fold_row<CC>(a, p + list[s] * cols, c, reduce);
              }
            });
          };
          if (c == 4) {
            reduce_voxels(std::integral_constant<int, 4>());
          } else {
            reduce_voxels(std::integral_constant<int, 0>());
          }
        }
      };
      // With several threads and enough points, the pass is split over groups of consecutive
      // chunks (assign_split below); the result is the same.
      const int64_t groups = std::min<int64_t>(at::get_num_threads(), num_chunks / kParallelChunks);
      if (groups > 1) {
        assign_split(groups);
      } else {
        switch (mode) {
        case kList:
          assign_all([&](int64_t i, int64_t v, int32_t s, bool keep) {
            if (keep) vpts[v * max_points + s] = static_cast<int32_t>(i);
          });
          break;
        case kRank:
          assign_all([&](int64_t i, int64_t, int32_t s, bool) { pslot[i] = s; });
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
      }
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) nonfinite += chunk_nonfinite[chunk];
      as.clear_table();
      over_voxels = as.over_voxels;
      over_points = as.over_points;
      const int64_t nv = as.nv;
      const K* vkey = as.vkey;
      const int32_t* vcount = as.vcount;

      // 2. Output order: first appearance (the ids), or (batch, x, y, z) = key order.
      const int32_t* row_voxel = nullptr;  // output row -> voxel id (null: identity)
      const int32_t* rank = nullptr;       // voxel id -> output row (null: identity)
      const K* row_key = vkey;
      if (!order_by_first && nv > 1) {
        K* sk = cpu::scratch(skey_buf, nv);
        int32_t* sv = cpu::scratch(ws.sv, nv);
        std::copy(vkey, vkey + nv, sk);
        for (int64_t v = 0; v < nv; ++v) sv[v] = static_cast<int32_t>(v);
        cpu::radix_sort_pairs(sk, sv, cpu::scratch(skey_tmp_buf, nv), cpu::scratch(ws.sv_tmp, nv), nv,
                              cpu::bit_width(max_key), ws.hist, 14);
        int32_t* rk = cpu::scratch(ws.rank, nv);
        for (int64_t r = 0; r < nv; ++r) rk[sv[r]] = static_cast<int32_t>(r);
        row_voxel = sv;
        rank = rk;
        row_key = sk;
      }

      // 3. Outputs.  Every element is written exactly once (padding zeros included).
      coords = at::empty({nv, 4}, points.options().dtype(at::kInt));
      feats = at::empty({nv, f}, points.options());
      counts = at::empty({nv}, points.options().dtype(at::kInt));
      int32_t* cp = coords.data_ptr<int32_t>();
      int32_t* cnt = counts.data_ptr<int32_t>();
      scalar_t* fp = feats.data_ptr<scalar_t>();
      const bool fast_decode = max_key < (uint64_t(1) << 52);
      const FastDiv dz(grid.Z), dy(grid.Y), dx(grid.X);
      // Per row: coordinates, count, and the features unless written from the points below.
      at::parallel_for(0, nv, kParallelVoxels, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const int64_t v = row_voxel ? row_voxel[r] : r;
          if (fast_decode) {
            int64_t key = static_cast<int64_t>(row_key[r]), rem;
            key = dz.div(key, &rem);
            cp[4 * r + 3] = static_cast<int32_t>(rem);
            key = dy.div(key, &rem);
            cp[4 * r + 2] = static_cast<int32_t>(rem);
            cp[4 * r + 0] = static_cast<int32_t>(dx.div(key, &rem));
            cp[4 * r + 1] = static_cast<int32_t>(rem);
          } else {
            grid.decode(static_cast<int64_t>(row_key[r]), cp + 4 * r);
          }
          const int32_t m = vcount[v];
          cnt[r] = m;
          scalar_t* out = fp + r * f;
          switch (mode) {
            case kNone:
              out[0] = static_cast<scalar_t>(m);
              break;
            case kRank:
              std::fill(out + m * c, out + f, scalar_t(0));
              break;
            case kAccumulate:
              std::copy(acc + v * c, acc + (v + 1) * c, out);
              if (reduce == kMean) {
                const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(m);
                for (int64_t k = 0; k < c; ++k) out[k] *= inv;
              }
              break;
            case kList:
              break;
          }
        }
      });
      // The padded rows from the points; point_voxel in output rows.
      auto write_padded = [&](auto cc_tag) {
        constexpr int CC = decltype(cc_tag)::value;
        const int64_t cols = CC > 0 ? CC : c;
        if (mode == kList) {  // voxel by voxel (the rows are the voxel ids here)
          at::parallel_for(0, nv, kParallelVoxels, [&](int64_t b, int64_t e) {
            for (int64_t v = b; v < e; ++v) {
              const int64_t m = vcount[v];
              const int32_t* list = vpts + v * max_points;
              scalar_t* out = fp + v * f;
              for (int64_t s = 0; s < m; ++s) copy_row<CC>(out + s * cols, p + list[s] * cols, c);
              std::fill(out + m * cols, out + f, scalar_t(0));
            }
          });
        } else {  // each kept point has its own slot: any split is race-free
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
      run(uint32_t(0), ws.key32, ws.table32, ws.vkey32, ws.skey32, ws.skey32_tmp);
    } else {
      run(uint64_t(0), ws.key64, ws.table64, ws.vkey64, ws.skey64, ws.skey64_tmp);
    }
  });

  const int64_t outside = n - nonfinite - valid;
  at::Tensor drops = at::tensor({nonfinite, outside, over_voxels, over_points}, points.options().dtype(at::kLong));
  return {coords, feats, point_voxel, counts, drops};
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("voxelize", &voxelize_cpu);
}

}  // namespace sparseconv
