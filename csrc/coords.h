// Coordinate packing shared by every op.
//
// Contract: a voxel coordinate is (batch, x, y, z) with 0 <= batch < B and
// 0 <= x < X, 0 <= y < Y, 0 <= z < Z.  Its 64-bit key is the mixed-radix
// linear index ((batch * X + x) * Y + y) * Z + z, so keys are unique, keys
// sort in (batch, x, y, z) order and decoding is exact.  A grid whose
// B * X * Y * Z does not fit in 62 bits is rejected with a ValueError before
// any key is formed.  All arithmetic is int64.
#pragma once

#include <cstdint>

#include <c10/util/Exception.h>
#include <c10/util/ArrayRef.h>

#if defined(__CUDACC__)
#define SPARSECONV_HD __host__ __device__ __forceinline__
#else
#define SPARSECONV_HD inline
#endif

namespace sparseconv {

constexpr int64_t kEmptyKey = -1;
constexpr int64_t kMaxKeys = int64_t(1) << 62;

struct Grid {
  int64_t B, X, Y, Z;

  SPARSECONV_HD bool contains(int64_t b, int64_t x, int64_t y, int64_t z) const {
    return b >= 0 && b < B && x >= 0 && x < X && y >= 0 && y < Y && z >= 0 && z < Z;
  }
  SPARSECONV_HD int64_t encode(int64_t b, int64_t x, int64_t y, int64_t z) const {
    return ((b * X + x) * Y + y) * Z + z;
  }
  SPARSECONV_HD void decode(int64_t key, int32_t* out) const {
    out[3] = static_cast<int32_t>(key % Z);
    key /= Z;
    out[2] = static_cast<int32_t>(key % Y);
    key /= Y;
    out[1] = static_cast<int32_t>(key % X);
    out[0] = static_cast<int32_t>(key / X);
  }
};

// Builds a Grid from the op argument `shape` = [B, X, Y, Z] and checks that
// every key fits (ValueError otherwise).
inline Grid make_grid(c10::IntArrayRef shape) {
  TORCH_CHECK_VALUE(shape.size() == 4,
                    "sparseconv: grid shape must be [batch_size, X, Y, Z], got ", shape.size(), " values");
  for (size_t d = 0; d < 4; ++d) {
    TORCH_CHECK_VALUE(shape[d] > 0 && shape[d] <= INT32_MAX, "sparseconv: grid shape [batch_size, X, Y, Z] = ", shape,
                      " must be positive and fit in int32");
  }
  int64_t total = 1;
  for (size_t d = 0; d < 4; ++d) {
    int64_t next;
    bool overflow = __builtin_mul_overflow(total, shape[d], &next);
    TORCH_CHECK_VALUE(!overflow && next <= kMaxKeys, "sparseconv: a grid of batch_size x spatial_shape = ", shape,
                      " has more cells than the 2^62 a 64-bit coordinate key can address; "
                      "use a coarser voxel size or split the batch");
    total = next;
  }
  return Grid{shape[0], shape[1], shape[2], shape[3]};
}

// Kernel offsets are enumerated x-major: k = (kx * KY + ky) * KZ + kz.
struct KernelGeom {
  int64_t ks[3], stride[3], pad[3], dil[3];
  int64_t volume() const { return ks[0] * ks[1] * ks[2]; }
  void offset(int64_t k, int64_t* o) const {
    o[2] = k % ks[2];
    o[1] = (k / ks[2]) % ks[1];
    o[0] = k / (ks[2] * ks[1]);
  }
};

inline void check_triple(c10::IntArrayRef v, const char* name, int64_t min_value, int64_t max_value = 1024) {
  TORCH_CHECK_VALUE(v.size() == 3, "sparseconv: ", name, " must have 3 values (x, y, z), got ", v);
  for (auto e : v) {
    TORCH_CHECK_VALUE(e >= min_value && e <= max_value, "sparseconv: ", name, " = ", v, " must be in [", min_value,
                      ", ", max_value, "]");
  }
}

// A validated KernelGeom from the op arguments (ValueError on bad values).
inline KernelGeom make_kernel_geom(c10::IntArrayRef ks, c10::IntArrayRef stride, c10::IntArrayRef pad,
                                   c10::IntArrayRef dil) {
  check_triple(ks, "kernel_size", 1);
  check_triple(stride, "stride", 1);
  check_triple(pad, "padding", 0);
  check_triple(dil, "dilation", 1);
  KernelGeom g;
  for (int d = 0; d < 3; ++d) {
    g.ks[d] = ks[d];
    g.stride[d] = stride[d];
    g.pad[d] = pad[d];
    g.dil[d] = dil[d];
  }
  TORCH_CHECK_VALUE(g.volume() <= INT32_MAX, "sparseconv: kernel volume ", g.volume(), " is too large");
  return g;
}

}  // namespace sparseconv
