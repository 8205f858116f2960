// The bodies of the CPU window-attention kernels (window_attention.h), written
// once as plain loops over a scalar type T and included by each ISA's
// translation unit *inside an anonymous namespace*, so every inclusion is a
// separate internal-linkage copy compiled for that ISA (the loops over a
// group's keys and over a head's channels are what the compiler vectorizes).
// Include nothing here: the including file includes <cmath>, <cstdint> and
// <cstring> first, and defines AttnVec<T>: a block of kAttnBlock values of T
// in registers (V; zero(), load(p), store(p, v), fma(acc, a, p) = acc + a * p[0, 16),
// max(acc, p)) -- intrinsics in the ISA units, plain arrays in the portable one.
//
// Each group's qkv rows are projected in the kernel: the group's rows of x
// (read through row pointers, no gather copy) times W^T (+ bias) into a small
// buffer that stays in cache -- no [N, 3C] tensor.  qkv rows are [q | k | v],
// each C = heads * d wide.  Scores s_ij = scale * q_i . k_j; the forward keeps
// lse_i = max_j s_ij + log sum_j exp(s_ij - max), and the backward recomputes
// p_ij = exp(s_ij - lse_i) from it (no n x n storage).

// exp(x) for a float array, x <= 0 (softmax arguments; clamped to [-87, 0]):
// exp(x) = 2^i * 2^f with i = round(x / ln 2) and f in [-1/2, 1/2], 2^f by a
// degree-6 polynomial (relative error ~1e-7, about one float ulp).  Branch-free
// and without library calls, so the loop vectorizes.
inline void exp_nonpositive(float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = x[j];
    v = v < -87.0f ? -87.0f : (v > 0.0f ? 0.0f : v);
    const float t = v * 1.44269504088896341f;
    const float r = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
    const float f = t - r;
    float p = 1.5337585279558578e-4f;
    p = p * f + 1.3399869912931184e-3f;
    p = p * f + 9.6185195903431840e-3f;
    p = p * f + 5.5503289740006200e-2f;
    p = p * f + 2.4022646607377607e-1f;
    p = p * f + 6.9314720561125810e-1f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    x[j] = p * scale;
  }
}

inline void exp_nonpositive(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}

constexpr int64_t kAttnBlock = 16;  // keys per register block (one AVX-512 vector, two AVX2 vectors)
inline int64_t attn_pad(int64_t n) { return (n + kAttnBlock - 1) / kAttnBlock * kAttnBlock; }

// Scratch elements the forward and backward need per thread for groups of at most max_n rows of C = heads * d
// channels: the group's rows copied together (qkv; and grad_out / out in the backward), the results of the
// group, a transposed head of keys (and values), a padded head of values, score rows.
inline int64_t attn_forward_scratch(int64_t max_n, int64_t heads, int64_t d) {
  const int64_t np = attn_pad(max_n), dp = attn_pad(d), c = heads * d;
  return max_n * 3 * c + max_n * c + d * np + max_n * dp + 4 * (np + d + dp);
}
inline int64_t attn_backward_scratch(int64_t max_n, int64_t heads, int64_t d) {
  const int64_t np = attn_pad(max_n), dp = attn_pad(d), c = heads * d;
  return max_n * 3 * c + 2 * max_n * c + max_n * 3 * c + 2 * d * np + 5 * max_n * dp + 4 * (2 * np + 2 * d + dp);
}

// Prefetches the rows of the next group (its rows are about to be copied): the rows of a group are scattered
// over qkv, and without this each row's first touch is a cache miss that the hardware prefetchers cannot predict.
template <typename T>
inline void attn_prefetch_rows(const T* base, const int64_t* offsets, const int64_t* index, int64_t g, int64_t g_end,
                               int64_t ld) {  // rows of ld elements
#if defined(__GNUC__) || defined(__clang__)
  if (g + 1 >= g_end) return;
  const int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t r = offsets[g + 1]; r < offsets[g + 2]; ++r) {
    const T* row = base + (index ? index[r] : r) * ld;
    for (int64_t e = 0; e < ld; e += line) __builtin_prefetch(row + e, 0, 3);
  }
#else
  (void)base, (void)offsets, (void)index, (void)g, (void)g_end, (void)ld;
#endif
}

// c_rows[r][0, n) += a_rows[r][0, k) @ b for r < m (b row-major, leading dimension ldb): the portable
// projection (float64; float32 uses the convolution's gemm_rows micro-kernel, which has this contract).
template <typename T>
void attn_project_generic(int64_t m, int64_t n, int64_t k, const T* const* a_rows, const T* b, int64_t ldb,
                          T* const* c_rows) {
  for (int64_t r = 0; r < m; ++r) {
    T* c = c_rows[r];
    for (int64_t p = 0; p < k; ++p) {
      const T a = a_rows[r][p];
      const T* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) c[j] += a * bp[j];
    }
  }
}

// grp[i * 3C ..] = bias + x[rows[i]] @ wt for the group's n rows (wt = W^T, [cin, 3C]).
template <typename T>
inline void attn_project_group(const AttnProblem<T>& pb, const int64_t* rows, int64_t n, T* grp,
                               const AttnScratch<T>& sc) {
  const int64_t ld = 3 * pb.heads * pb.d;
  for (int64_t i = 0; i < n; ++i) {
    sc.a_rows[i] = pb.x + rows[i] * pb.cin;
    sc.c_rows[i] = grp + i * ld;
    if (pb.bias) {
      std::memcpy(grp + i * ld, pb.bias, sizeof(T) * ld);
    } else {
      std::memset(grp + i * ld, 0, sizeof(T) * ld);
    }
  }
  pb.proj(n, ld, pb.cin, sc.a_rows, pb.wt, ld, sc.c_rows);
}

// dst[i * ld .. + ld) = src row rows[i], for i < n.
template <typename T>
inline void attn_copy_rows(const T* src, const int64_t* rows, int64_t n, int64_t ld, T* dst) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * ld, src + rows[i] * ld, sizeof(T) * ld);
}

// A score far below any real one: exp() of it minus the row maximum is (about) zero.
template <typename T>
constexpr T kAttnPadScore = T(-1e30);

// kt[k * np + j] = columns col .. col + d - 1 of row j of the group's rows g (zero for j in [n, np)).
template <typename T>
inline void attn_transpose(const T* g, int64_t ld, int64_t col, int64_t n, int64_t np, int64_t d, T* kt) {
  for (int64_t j = 0; j < n; ++j) {
    const T* src = g + j * ld + col;
    for (int64_t k = 0; k < d; ++k) kt[k * np + j] = src[k];
  }
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t j = n; j < np; ++j) kt[k * np + j] = T(0);
  }
}

template <typename T>
inline T attn_max(const T* s, int64_t np) {
  using B = AttnVec<T>;
  typename B::V acc = B::load(s);
  for (int64_t jb = kAttnBlock; jb < np; jb += kAttnBlock) acc = B::max(acc, s + jb);
  T m[kAttnBlock];
  B::store(m, acc);
  T r = m[0];
  for (int64_t jj = 1; jj < kAttnBlock; ++jj) r = m[jj] > r ? m[jj] : r;
  return r;
}

// Queries per register block of the forward: their score and output chains are independent, so the FMAs of
// kAttnRows queries overlap (one query alone waits on each FMA's latency), and each key / value load is shared.
constexpr int64_t kAttnRows = 4;

// c[r * ldc + col] = sum_{p < k} a[r * lda + p] * b[p * ldb + col] for the kAttnRows rows r and col < ncols
// (a multiple of kAttnBlock): four rows of scores (a = queries, b = transposed keys) or of weighted sums
// (a = probabilities, b = padded values).
template <typename T>
inline void attn_rows_product(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t k, int64_t ncols, T* c,
                              int64_t ldc) {
  using B = AttnVec<T>;
  for (int64_t cb = 0; cb < ncols; cb += kAttnBlock) {
    typename B::V a0 = B::zero(), a1 = B::zero(), a2 = B::zero(), a3 = B::zero();
    for (int64_t p = 0; p < k; ++p) {
      const T* row = b + p * ldb + cb;
      a0 = B::fma(a0, a[p], row);
      a1 = B::fma(a1, a[lda + p], row);
      a2 = B::fma(a2, a[2 * lda + p], row);
      a3 = B::fma(a3, a[3 * lda + p], row);
    }
    B::store(c + cb, a0);
    B::store(c + ldc + cb, a1);
    B::store(c + 2 * ldc + cb, a2);
    B::store(c + 3 * ldc + cb, a3);
  }
}

// Scores of the kAttnRows queries qs [kAttnRows, d] against the transposed keys kt [d, np]: s [kAttnRows, np],
// the padding score for j in [n, np).
template <typename T>
inline void attn_scores_rows(const T* qs, const T* kt, int64_t n, int64_t np, int64_t d, T* s) {
  attn_rows_product(qs, d, kt, np, d, np, s, np);
  for (int64_t r = 0; r < kAttnRows; ++r) {
    for (int64_t j = n; j < np; ++j) s[r * np + j] = kAttnPadScore<T>;
  }
}

// Starts group g: prefetches the next group's rows of x, writes the group's row indices to rows and returns
// how many there are.
template <typename T>
inline int64_t attn_group_rows(const AttnProblem<T>& pb, int64_t g, int64_t g_end, int64_t* rows) {
  attn_prefetch_rows(pb.x, pb.offsets, pb.index, g, g_end, pb.cin);
  const int64_t r0 = pb.offsets[g], n = pb.offsets[g + 1] - r0;
  for (int64_t i = 0; i < n; ++i) rows[i] = pb.index ? pb.index[r0 + i] : r0 + i;
  return n;
}

// Groups [g_begin, g_end) (rows index[offsets[g]] .., or offsets[g] .. when index is null): y, out (the attended
// rows before the output projection) and lse ([N, heads]) of their rows.  rows: scratch of max_n entries.
template <typename T>
void attn_forward_groups(const AttnProblem<T>& pb, int64_t g_begin, int64_t g_end, T* y, T* out, T* lse,
                         const AttnScratch<T>& sc) {
  const int64_t heads = pb.heads, d = pb.d, c = heads * d, ld = 3 * c, dp = attn_pad(d);
  const T scale = pb.scale;
  int64_t* rows = sc.rows;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t n = attn_group_rows(pb, g, g_end, rows), np = attn_pad(n);
    if (n <= 0) continue;
    T* grp = sc.values;                // [n, 3C] the group's rows
    T* res = grp + n * ld;           // [n, C] its outputs
    T* kt = res + n * c;             // [d, np] keys of one head, transposed
    T* vp = kt + d * np;             // [n, dp] values of one head, zero-padded to dp columns
    T* s = vp + n * dp;              // [kAttnRows, np] scores, then probabilities
    T* qs = s + kAttnRows * np;      // [kAttnRows, d] scaled queries
    T* o = qs + kAttnRows * d;       // [kAttnRows, dp] weighted sums
    attn_project_group(pb, rows, n, grp, sc);
    for (int64_t h = 0; h < heads; ++h) {
      attn_transpose(grp, ld, c + h * d, n, np, d, kt);
      for (int64_t j = 0; j < n; ++j) {
        const T* v = grp + j * ld + 2 * c + h * d;
        for (int64_t k = 0; k < d; ++k) vp[j * dp + k] = v[k];
        for (int64_t k = d; k < dp; ++k) vp[j * dp + k] = T(0);
      }
      for (int64_t i0 = 0; i0 < n; i0 += kAttnRows) {
        const int64_t m = n - i0 < kAttnRows ? n - i0 : kAttnRows;
        for (int64_t r = 0; r < kAttnRows; ++r) {
          const T* q = grp + (i0 + (r < m ? r : 0)) * ld + h * d;  // missing rows repeat the first (ignored)
          for (int64_t k = 0; k < d; ++k) qs[r * d + k] = q[k] * scale;
        }
        attn_scores_rows(qs, kt, n, np, d, s);
        T mx[kAttnRows], inv[kAttnRows];
        for (int64_t r = 0; r < kAttnRows; ++r) {
          T* sr = s + r * np;
          mx[r] = attn_max(sr, np);
          for (int64_t j = 0; j < np; ++j) sr[j] -= mx[r];
          exp_nonpositive(sr, np);
          T l = T(0);
          for (int64_t j = 0; j < n; ++j) l += sr[j];
          inv[r] = T(1) / l;
          if (r < m) lse[rows[i0 + r] * heads + h] = mx[r] + std::log(l);
        }
        attn_rows_product(s, np, vp, dp, n, dp, o, dp);
        for (int64_t r = 0; r < m; ++r) {
          T* dst = res + (i0 + r) * c + h * d;
          for (int64_t k = 0; k < d; ++k) dst[k] = o[r * dp + k] * inv[r];
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) std::memcpy(out + rows[i] * c, res + i * c, sizeof(T) * c);
    // y rows = attended rows @ pwt + pbias, written in place (rows are distinct)
    for (int64_t i = 0; i < n; ++i) {
      sc.a_rows[i] = res + i * c;
      sc.c_rows[i] = y + rows[i] * pb.cout;
      if (pb.pbias) {
        std::memcpy(sc.c_rows[i], pb.pbias, sizeof(T) * pb.cout);
      } else {
        std::memset(sc.c_rows[i], 0, sizeof(T) * pb.cout);
      }
    }
    pb.proj(n, pb.cout, c, sc.a_rows, pb.pwt, pb.cout, sc.c_rows);
  }
}

// Groups [g_begin, g_end): their rows of grad_qkv (written, not accumulated).  Per head, kAttnRows queries at a
// time: p = exp(s - lse) and dp = dO v^T from the transposed keys / values, dS = p (dp - dO . o) * scale, then
// dq = dS k (the forward's weighted sum), dk_j += dS_ij q_i and dv_j += p_ij dO_i in registers over padded rows.
template <typename T>
void attn_backward_groups(const AttnProblem<T>& pb, const T* grad_out, const T* out, const T* lse, int64_t g_begin,
                          int64_t g_end, T* grad_qkv, const AttnScratch<T>& sc) {
  using B = AttnVec<T>;
  const int64_t heads = pb.heads, d = pb.d, c = heads * d, ld = 3 * c, dp = attn_pad(d);
  const T scale = pb.scale;
  int64_t* rows = sc.rows;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t n = attn_group_rows(pb, g, g_end, rows), np = attn_pad(n);
    if (n <= 0) continue;
    T* grp = sc.values;                // [n, 3C] qkv rows
    T* gog = grp + n * ld;            // [n, C] grad_out rows
    T* og = gog + n * c;              // [n, C] out rows
    T* res = og + n * c;              // [n, 3C] grad_qkv rows
    T* kt = res + n * ld;             // [d, np] keys, transposed
    T* vt = kt + d * np;              // [d, np] values, transposed
    T* kp = vt + d * np;              // [n, dp] keys, padded
    T* qp = kp + n * dp;              // [n, dp] queries, padded
    T* gp = qp + n * dp;              // [n, dp] grad_out, padded
    T* dk = gp + n * dp;              // [n, dp]
    T* dv = dk + n * dp;              // [n, dp]
    T* p = dv + n * dp;               // [kAttnRows, np]
    T* ds = p + kAttnRows * np;       // [kAttnRows, np]
    T* qs = ds + kAttnRows * np;      // [kAttnRows, d]
    T* gs = qs + kAttnRows * d;       // [kAttnRows, d]
    T* dq = gs + kAttnRows * d;       // [kAttnRows, dp]
    attn_project_group(pb, rows, n, grp, sc);
    attn_copy_rows(grad_out, rows, n, c, gog);
    attn_copy_rows(out, rows, n, c, og);
    for (int64_t h = 0; h < heads; ++h) {
      attn_transpose(grp, ld, c + h * d, n, np, d, kt);
      attn_transpose(grp, ld, 2 * c + h * d, n, np, d, vt);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t k = 0; k < dp; ++k) {
          kp[j * dp + k] = k < d ? grp[j * ld + c + h * d + k] : T(0);
          qp[j * dp + k] = k < d ? grp[j * ld + h * d + k] : T(0);
          gp[j * dp + k] = k < d ? gog[j * c + h * d + k] : T(0);
          dk[j * dp + k] = dv[j * dp + k] = T(0);
        }
      }
      for (int64_t i0 = 0; i0 < n; i0 += kAttnRows) {
        const int64_t m = n - i0 < kAttnRows ? n - i0 : kAttnRows;
        T di[kAttnRows];
        for (int64_t r = 0; r < kAttnRows; ++r) {
          const int64_t i = i0 + (r < m ? r : 0);  // missing rows repeat the first (their results are ignored)
          const T* q = grp + i * ld + h * d;
          const T* go = gog + i * c + h * d;
          const T* o = og + i * c + h * d;
          di[r] = T(0);
          for (int64_t k = 0; k < d; ++k) {
            qs[r * d + k] = q[k] * scale;
            gs[r * d + k] = go[k];
            di[r] += go[k] * o[k];
          }
        }
        attn_scores_rows(qs, kt, n, np, d, p);
        attn_scores_rows(gs, vt, n, np, d, ds);  // dO_i . v_j
        for (int64_t r = 0; r < kAttnRows; ++r) {
          T* pr = p + r * np;
          T* dr = ds + r * np;
          const T li = lse[rows[i0 + (r < m ? r : 0)] * heads + h];
          for (int64_t j = 0; j < np; ++j) pr[j] -= li;
          exp_nonpositive(pr, np);
          for (int64_t j = 0; j < np; ++j) dr[j] = pr[j] * (dr[j] - di[r]) * scale;
          if (r >= m) {
            for (int64_t j = 0; j < np; ++j) pr[j] = dr[j] = T(0);  // no contribution to dk, dv
          }
        }
        attn_rows_product(ds, np, kp, dp, n, dp, dq, dp);
        for (int64_t r = 0; r < m; ++r) {
          T* gq = res + (i0 + r) * ld + h * d;
          for (int64_t k = 0; k < d; ++k) gq[k] = dq[r * dp + k];
        }
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t kb = 0; kb < dp; kb += kAttnBlock) {
            typename B::V ak = B::load(dk + j * dp + kb), av = B::load(dv + j * dp + kb);
            for (int64_t r = 0; r < m; ++r) {
              ak = B::fma(ak, ds[r * np + j], qp + (i0 + r) * dp + kb);
              av = B::fma(av, p[r * np + j], gp + (i0 + r) * dp + kb);
            }
            B::store(dk + j * dp + kb, ak);
            B::store(dv + j * dp + kb, av);
          }
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        T* gk = res + j * ld + c + h * d;
        for (int64_t k = 0; k < d; ++k) {
          gk[k] = dk[j * dp + k];
          gk[c + k] = dv[j * dp + k];
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) std::memcpy(grad_qkv + rows[i] * ld, res + i * ld, sizeof(T) * ld);
  }
}
