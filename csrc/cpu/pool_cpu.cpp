#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../pool.h"
#include "pairs.h"

namespace sparseconv {

namespace {

void check_pool_args(const char* op, const at::Tensor& feats, const at::Tensor& nbmap) {
  check_feats(feats, op, "feats");
  check_cpu_dtype(feats, op);
  check_nbmap(nbmap, op);
  check_same_device(feats, nbmap, op, "feats", "nbmap");
}

// Raises unless every entry of nbmap is -1 or a row below n.
void check_entries(const at::Tensor& nbmap, int64_t n, const char* op) {
  const int32_t* map = nbmap.data_ptr<int32_t>();
  const int64_t total = nbmap.numel();
  std::atomic<bool> bad{false};
  at::parallel_for(0, total, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      if (map[j] < -1 || map[j] >= n) bad = true;
    }
  });
  TORCH_CHECK_VALUE(!bad.load(), "sparseconv.", op, ": kernel map entries must be -1 or row indices below ", n,
                    "; the map does not belong to these features");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> maxpool_forward_cpu(const at::Tensor& feats_in, const at::Tensor& nbmap_in) {
  check_pool_args("maxpool_forward", feats_in, nbmap_in);
  const at::Tensor feats = feats_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t m = nbmap.size(0), kvol = nbmap.size(1), c = feats.size(1);
  check_entries(nbmap, feats.size(0), "maxpool_forward");
  at::Tensor out = at::zeros({m, c}, feats.options());
  at::Tensor arg = at::full({m, c}, -1, feats.options().dtype(at::kLong));
  const int32_t* map = nbmap.data_ptr<int32_t>();
  int64_t* ap = arg.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "sparseconv_maxpool_forward", [&] {
    const scalar_t* f = feats.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, m, 256, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        scalar_t* orow = op + o * c;
        int64_t* arow = ap + o * c;
        for (int64_t k = 0; k < kvol; ++k) {
          const int64_t i = map[o * kvol + k];
          if (i < 0) continue;
          const scalar_t* frow = f + i * c;
          for (int64_t ch = 0; ch < c; ++ch) {
            // NaN propagates like torch.max_pool3d: a NaN input wins and stays.
            if (arow[ch] < 0 || frow[ch] > orow[ch] || (frow[ch] != frow[ch] && orow[ch] == orow[ch])) {
              orow[ch] = frow[ch];
              arow[ch] = i;
            }
          }
        }
      }
    });
  });
  return {out, arg};
}

at::Tensor maxpool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& argmax_in, int64_t num_in) {
  const char* op = "maxpool_backward";
  check_feats(grad_in, op, "grad_out");
  check_cpu_dtype(grad_in, op);
  check_maxpool_backward_args(grad_in, argmax_in, num_in);
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous();
  const int64_t m = grad.size(0), c = grad.size(1);
  at::Tensor gi = at::zeros({num_in, c}, grad.options());
  const int64_t* ap = argmax.data_ptr<int64_t>();
  {
    std::atomic<bool> bad{false};
    at::parallel_for(0, m * c, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        if (ap[j] < -1 || ap[j] >= num_in) bad = true;
      }
    });
    TORCH_CHECK_VALUE(!bad.load(), "sparseconv.", op, ": argmax entries must be -1 or below num_in = ", num_in);
  }
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "sparseconv_maxpool_backward", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* out = gi.data_ptr<scalar_t>();
    // Parallel over channels: each channel column is written by one thread.
    at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) {
      for (int64_t o = 0; o < m; ++o) {
        for (int64_t ch = b; ch < e; ++ch) {
          const int64_t i = ap[o * c + ch];
          if (i >= 0) out[i * c + ch] += g[o * c + ch];
        }
      }
    });
  });
  return gi;
}

namespace {

// Divisor of output row o.
template <typename scalar_t>
scalar_t avg_divisor(const int32_t* row, int64_t kvol, bool count_inactive) {
  if (count_inactive) return static_cast<scalar_t>(kvol);
  int64_t n = 0;
  for (int64_t k = 0; k < kvol; ++k) n += row[k] >= 0;
  return static_cast<scalar_t>(n > 0 ? n : 1);
}

}  // namespace

at::Tensor avgpool_forward_cpu(const at::Tensor& feats_in, const at::Tensor& nbmap_in, bool count_inactive) {
  check_pool_args("avgpool_forward", feats_in, nbmap_in);
  const at::Tensor feats = feats_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t m = nbmap.size(0), kvol = nbmap.size(1), c = feats.size(1);
  check_entries(nbmap, feats.size(0), "avgpool_forward");
  at::Tensor out = at::zeros({m, c}, feats.options());
  const int32_t* map = nbmap.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "sparseconv_avgpool_forward", [&] {
    const scalar_t* f = feats.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, m, 256, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const int32_t* row = map + o * kvol;
        scalar_t* orow = op + o * c;
        for (int64_t k = 0; k < kvol; ++k) {
          if (row[k] < 0) continue;
          const scalar_t* frow = f + static_cast<int64_t>(row[k]) * c;
          for (int64_t ch = 0; ch < c; ++ch) orow[ch] += frow[ch];
        }
        const scalar_t inv = scalar_t(1) / avg_divisor<scalar_t>(row, kvol, count_inactive);
        for (int64_t ch = 0; ch < c; ++ch) orow[ch] *= inv;
      }
    });
  });
  return out;
}

at::Tensor avgpool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& nbmap_in, int64_t num_in,
                                bool count_inactive) {
  check_pool_args("avgpool_backward", grad_in, nbmap_in);
  TORCH_CHECK_VALUE(grad_in.size(0) == nbmap_in.size(0), "sparseconv.avgpool_backward: grad_out has ",
                    grad_in.size(0), " rows but the kernel map has ", nbmap_in.size(0));
  TORCH_CHECK_VALUE(num_in >= 0, "sparseconv.avgpool_backward: num_in must be >= 0");
  const at::Tensor grad = grad_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t m = nbmap.size(0), kvol = nbmap.size(1), c = grad.size(1);
  check_entries(nbmap, num_in, "avgpool_backward");
  at::Tensor gi = at::zeros({num_in, c}, grad.options());
  const int32_t* map = nbmap.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "sparseconv_avgpool_backward", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* out = gi.data_ptr<scalar_t>();
    std::vector<scalar_t> inv(m);
    at::parallel_for(0, m, 1024, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) inv[o] = scalar_t(1) / avg_divisor<scalar_t>(map + o * kvol, kvol, count_inactive);
    });
    // One offset at a time: within a column the targets are distinct (kernel_map.h).
    for (int64_t k = 0; k < kvol; ++k) {
      at::parallel_for(0, m, 256, [&](int64_t b, int64_t e) {
        for (int64_t o = b; o < e; ++o) {
          const int32_t i = map[o * kvol + k];
          if (i < 0) continue;
          scalar_t* d = out + static_cast<int64_t>(i) * c;
          const scalar_t* s = g + o * c;
          for (int64_t ch = 0; ch < c; ++ch) d[ch] += s[ch] * inv[o];
        }
      });
    }
  });
  return gi;
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("maxpool_forward", &maxpool_forward_cpu);
  m.impl("maxpool_backward", &maxpool_backward_cpu);
  m.impl("avgpool_forward", &avgpool_forward_cpu);
  m.impl("avgpool_backward", &avgpool_backward_cpu);
}

}  // namespace sparseconv
