// The 3x3x3 'SAME' convolution with eight output channels, vectorised along W with AVX-512:
// the full-resolution layers of a width-8 U-Net (the stem, encoder and decoder level 1),
// about two thirds of its inference FLOPs.
//
// oneDNN vectorises its convolutions over output channels, 16 per AVX-512 register, so with
// eight it leaves half of every register (and of every FMA) unused (measured: the same time
// for 8 output channels as for 16). Here a register holds 16 consecutive voxels of one row
// and one output channel instead, so every lane does useful work:
//   1. each thread takes a run of output planes (b, d) and keeps the three input planes they
//      read, d-1..d+1, in a small ring buffer (a few hundred KB: it stays in the core's L2),
//      transposed to rows of W contiguous floats per input channel, (H+2, Ci, Wp), with the
//      'SAME' padding stored as zeros, so the inner loop has no border cases; moving to the
//      next plane transposes one new input plane;
//   2. each output row (b, d, h) is computed in chunks of 16 V voxels: OC channels x V
//      registers of accumulators (8 x 2); for each of the 27 taps and each input channel,
//      V unaligned loads of the shifted input row and 16 FMAs with the broadcast kernel
//      values;
//   3. bias and ReLU are applied while the accumulators are written back channels-last.
// Each output element is summed by one thread in a fixed order (taps, then input channels),
// so results are deterministic; they equal any other float32 convolution to rounding.
#include "direct_conv.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace mlssp {
namespace {

constexpr int64_t kOutUp = 8;  // output channels of the transposed convolution

struct Shape {
  int64_t b, d, h, w, ci;
  int64_t wp;  // floats per transposed row: whole chunks + the two taps beyond the last
  int64_t plane() const { return (h + 2) * ci * wp; }  // floats per transposed plane
};

Shape MakeShape(int64_t b, int64_t d, int64_t h, int64_t w, int64_t ci, int64_t chunk) {
  return {b, d, h, w, ci, (w + chunk - 1) / chunk * chunk + 2};
}

// Input plane pd - 1 of batch element ib (pd: padded depth, 0 and d + 1 are the zero
// padding) -> out (H+2, Ci, Wp): out[ph][c][1 + iw] = x[ib][pd-1][ph-1][iw][c], zero elsewhere.
__attribute__((target("avx512f"))) void TransposePlane(const float* x, const Shape& s,
                                                       int64_t ib, int64_t pd, float* out) {
  if (pd == 0 || pd == s.d + 1) {
    std::memset(out, 0, sizeof(float) * s.plane());
    return;
  }
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(s.ci)));
  for (int64_t ph = 0; ph < s.h + 2; ++ph) {
    float* rows = out + ph * s.ci * s.wp;
    if (ph == 0 || ph == s.h + 1) {
      std::memset(rows, 0, sizeof(float) * s.ci * s.wp);
      continue;
    }
    const float* src = x + (((ib * s.d + pd - 1) * s.h) + ph - 1) * s.w * s.ci;
    for (int64_t c = 0; c < s.ci; ++c) {
      float* row = rows + c * s.wp;
      row[0] = 0.f;
      for (int64_t iw = 0; iw < s.w; iw += 16) {  // row[1 + iw + j] = src[(iw + j) * ci + c]
        const __mmask16 mask = s.w - iw >= 16 ? 0xFFFF : (1u << (s.w - iw)) - 1;
        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, lanes,
                                                  src + iw * s.ci + c, 4);
        _mm512_mask_storeu_ps(row + 1 + iw, mask, v);
      }
      std::fill(row + s.w + 1, row + s.wp, 0.f);
    }
  }
}

// Output row (ib, id, ih), all W voxels, OC channels, from the three transposed input planes
// id..id+2 (padded depth) in ``planes``; V registers (16 V voxels) of the row per pass.
template <int OC, int V>
__attribute__((target("avx512f"))) void ComputeRow(const float* const planes[3],
                                                   const float* kernel, const float* bias,
                                                   bool relu, const Shape& s, int64_t ih,
                                                   float* dst) {
  constexpr int kChunk = 16 * V, kVoxelsPerStore = 16 / OC;
  alignas(64) float out[OC][kChunk];
  // lane l of a store holds channel l % OC of voxel l / OC (of the pair, for OC = 8)
  alignas(64) int gather[16];
  for (int l = 0; l < 16; ++l) gather[l] = (l % OC) * kChunk + l / OC;
  const __m512i lanes = _mm512_load_si512(gather);
  for (int64_t w0 = 0; w0 < s.w; w0 += kChunk) {
    __m512 acc[OC][V];
#pragma GCC unroll 16
    for (int o = 0; o < OC; ++o) {
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[o][v] = _mm512_setzero_ps();
    }
    for (int64_t kd = 0; kd < 3; ++kd) {
      for (int64_t kh = 0; kh < 3; ++kh) {
        const float* base = planes[kd] + (ih + kh) * s.ci * s.wp + w0;
        const float* taps = kernel + (kd * 3 + kh) * 3 * s.ci * OC;  // [kw][ci][o]
        for (int64_t c = 0; c < s.ci; ++c) {
          const float* src = base + c * s.wp;
#pragma GCC unroll 3
          for (int64_t kw = 0; kw < 3; ++kw) {
            __m512 in[V];
#pragma GCC unroll 2
            for (int v = 0; v < V; ++v) in[v] = _mm512_loadu_ps(src + kw + 16 * v);
            const float* k = taps + (kw * s.ci + c) * OC;
#pragma GCC unroll 16
            for (int o = 0; o < OC; ++o) {
              const __m512 kv = _mm512_set1_ps(k[o]);
#pragma GCC unroll 2
              for (int v = 0; v < V; ++v) acc[o][v] = _mm512_fmadd_ps(in[v], kv, acc[o][v]);
            }
          }
        }
      }
    }
#pragma GCC unroll 16
    for (int o = 0; o < OC; ++o) {  // bias, ReLU, then channels-last via a transpose
      const __m512 shift = _mm512_set1_ps(bias ? bias[o] : 0.f);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        __m512 a = _mm512_add_ps(acc[o][v], shift);
        if (relu) a = _mm512_max_ps(a, _mm512_setzero_ps());
        _mm512_store_ps(out[o] + 16 * v, a);
      }
    }
    const int64_t n = std::min<int64_t>(kChunk, s.w - w0);
    for (int64_t i = 0; i < n; i += kVoxelsPerStore) {
      const __mmask16 mask = n - i >= kVoxelsPerStore ? 0xFFFF : (1u << ((n - i) * OC)) - 1;
      const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(i)));
      _mm512_mask_storeu_ps(dst + (w0 + i) * OC, mask, _mm512_i32gather_ps(at, &out[0][0], 4));
    }
  }
}

template <int OC, int V>
void Run(const float* x, const float* kernel, const float* bias, bool relu, float* y,
         int64_t b, int64_t d, int64_t h, int64_t w, int64_t ci) {
  const Shape s = MakeShape(b, d, h, w, ci, 16 * V);
  const int64_t planes = b * d;  // output planes (ib, id)
#pragma omp parallel
  {
    static thread_local std::vector<float> ring;  // 3 transposed input planes, per thread
    if (ring.size() < static_cast<size_t>(3 * s.plane())) ring.resize(3 * s.plane());
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t first = planes * t / threads, last = planes * (t + 1) / threads;
    int64_t held_b = -1, held_top = -1;  // ring holds padded planes held_top-2..held_top of held_b
    for (int64_t p = first; p < last; ++p) {
      const int64_t ib = p / d, id = p % d;  // reads padded planes id, id + 1, id + 2
      for (int64_t pd = id; pd <= id + 2; ++pd) {
        const bool held = ib == held_b && pd <= held_top && pd >= held_top - 2;
        if (!held) TransposePlane(x, s, ib, pd, ring.data() + (pd % 3) * s.plane());
      }
      held_b = ib;
      held_top = id + 2;
      const float* window[3];
      for (int64_t kd = 0; kd < 3; ++kd) window[kd] = ring.data() + ((id + kd) % 3) * s.plane();
      for (int64_t ih = 0; ih < h; ++ih) {
        ComputeRow<OC, V>(window, kernel, bias, relu, s, ih, y + ((p * h + ih) * w) * OC);
      }
    }
  }
}

// Input rows (ib, i, j) [first, last) of y (B, D, H, W, C) -> the output rows (2i + a, 2j + e)
// of x (B, 2D, 2H, 2W, 8): x[.., 2k + c, o] = sum_ci y[.., k, ci] kernel[a, e, c, o, ci].
// A register holds the 16 values (c, o) of output voxels 2k, 2k + 1, which are contiguous.
__attribute__((target("avx512f"))) void UpRows(const float* y, const float* kernel, float* x,
                                               int64_t first, int64_t last, int64_t d,
                                               int64_t h, int64_t w, int64_t c) {
  constexpr int kBlock = 8;  // input voxels k per pass: 8 accumulators
  std::vector<float> taps(4 * c * 16);  // [a][e][ci][f * 8 + o] = kernel[a, e, f, o, ci]
  for (int64_t ae = 0; ae < 4; ++ae) {
    for (int64_t ci = 0; ci < c; ++ci) {
      for (int l = 0; l < 16; ++l) {
        taps[(ae * c + ci) * 16 + l] =
            kernel[((ae * 2 + l / kOutUp) * kOutUp + l % kOutUp) * c + ci];
      }
    }
  }
  for (int64_t r = first; r < last; ++r) {
    const int64_t ib = r / (d * h), i = (r / h) % d, j = r % h;
    const float* src = y + r * w * c;
    for (int64_t ae = 0; ae < 4; ++ae) {
      const int64_t a = ae / 2, e = ae % 2;
      float* dst = x + (((ib * 2 * d + 2 * i + a) * 2 * h) + 2 * j + e) * 2 * w * kOutUp;
      for (int64_t k0 = 0; k0 < w; k0 += kBlock) {
        const int64_t n = std::min<int64_t>(kBlock, w - k0);
        __m512 acc[kBlock];
#pragma GCC unroll 8
        for (int kk = 0; kk < kBlock; ++kk) acc[kk] = _mm512_setzero_ps();
        for (int64_t ci = 0; ci < c; ++ci) {
          const __m512 tap = _mm512_loadu_ps(&taps[(ae * c + ci) * 16]);
#pragma GCC unroll 8
          for (int kk = 0; kk < kBlock; ++kk) {
            if (kk < n) {
              acc[kk] = _mm512_fmadd_ps(_mm512_set1_ps(src[(k0 + kk) * c + ci]), tap, acc[kk]);
            }
          }
        }
        for (int64_t kk = 0; kk < n; ++kk) _mm512_storeu_ps(dst + (k0 + kk) * 16, acc[kk]);
      }
    }
  }
}

}  // namespace

bool DirectUpConvApplies(int64_t cx, int64_t kd, int64_t kh, int64_t kw, int64_t stride) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && cx == kOutUp && kd == 2 && kh == 2 && kw == 2 && stride == 2;
}

void DirectUpConv(const float* y, const float* kernel, float* x, int64_t b, int64_t d,
                  int64_t h, int64_t w, int64_t c) {
  const int64_t rows = b * d * h;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    UpRows(y, kernel, x, rows * t / threads, rows * (t + 1) / threads, d, h, w, c);
  }
}

bool DirectConvApplies(int64_t ci, int64_t co, int64_t kd, int64_t kh, int64_t kw,
                       int64_t stride) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  // 16 output channels fill oneDNN's registers: there it was as fast as this (measured)
  return avx512 && co == 8 && ci >= 1 && kd == 3 && kh == 3 && kw == 3 && stride == 1;
}

void DirectConv(const float* x, const float* kernel, const float* bias, bool relu, float* y,
                int64_t b, int64_t d, int64_t h, int64_t w, int64_t ci) {
  Run<8, 2>(x, kernel, bias, relu, y, b, d, h, w, ci);
}

}  // namespace mlssp
