// The 3x3x3 'SAME' convolution with eight output channels, vectorised along W with AVX-512:
// the full-resolution layers of a width-8 U-Net (the stem, encoder and decoder level 1),
// about two thirds of its inference FLOPs.
//
// oneDNN vectorises its convolutions over output channels, 16 per AVX-512 register, so with
// eight it leaves half of every register (and of every FMA) unused (measured: the same time
// for 8 output channels as for 16). Here a register holds 16 output positions of one row and
// one output channel instead, so every lane does useful work, and the W direction uses
// Winograd's minimal filtering F(2,3) (Lavin & Gray 2016): two outputs along W from four
// transformed inputs, 4 multiplies for every 6 of the plain sum, i.e. 2/3 of its FMAs:
//   1. each thread takes a run of output planes (b, d) and keeps the three input planes they
//      read, d-1..d+1, in a small ring buffer (a few hundred KB: it stays in the core's L2),
//      as the four F(2,3) input transforms U0..U3 of every row and input channel,
//      (H+2, Ci, 4, W/2 rounded up to 16), with the 'SAME' padding stored as zeros, so the
//      inner loop has no border cases; moving to the next plane transforms one new plane;
//   2. the kernel's transforms G0..G3 along W (exact: g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2)
//      are made once per call, 4 x 9 x Ci x 8 floats;
//   3. each output row (b, d, h) is computed in chunks of 16 output pairs: for each of the
//      four components, the sum over the 9 (kd, kh) taps and the input channels of U_i G_i
//      (8 accumulators per component, two components at a time), then y[2m] = M0 + M1 + M2
//      and y[2m+1] = M1 - M2 - M3, bias and ReLU, written back channels-last.
// Each output element is summed by one thread in a fixed order, so results are
// deterministic. F(2,3)'s transforms only add and halve, so its rounding error stays within a
// few ulp of a plain float32 convolution's (tests/test_conv_ops.py holds it to the same
// tolerance as oneDNN's result).
#include "direct_conv.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace mlssp {
namespace {

constexpr int64_t kOutUp = 8;  // output channels of the transposed convolution

constexpr int kOut = 8;  // output channels of the 3x3x3 convolution

struct Shape {
  int64_t b, d, h, w, ci;
  int64_t mp;  // floats per transformed row: the W/2 output pairs, rounded up to registers
  int64_t plane() const { return (h + 2) * ci * 4 * mp; }  // floats per transformed plane
};

Shape MakeShape(int64_t b, int64_t d, int64_t h, int64_t w, int64_t ci) {
  const int64_t pairs = (w + 1) / 2;
  return {b, d, h, w, ci, (pairs + 15) / 16 * 16};
}

// Input plane pd - 1 of batch element ib (pd: padded depth; 0 and d + 1 are the zero padding)
// -> out (H+2, Ci, 4, Mp): for each row and channel the four Winograd F(2,3) input
// transforms along W of the zero-padded row, U_i[m] from x[2m-1 .. 2m+2]:
// U0 = x[2m-1] - x[2m+1], U1 = x[2m] + x[2m+1], U2 = x[2m+1] - x[2m], U3 = x[2m] - x[2m+2].
__attribute__((target("avx512f"))) void TransformPlane(const float* x, const Shape& s,
                                                       int64_t ib, int64_t pd, float* out) {
  if (pd == 0 || pd == s.d + 1) {
    std::memset(out, 0, sizeof(float) * s.plane());
    return;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(2 * s.ci)));
  const int64_t row_floats = s.ci * 4 * s.mp;
  // ev[1 + m] = x[2m], od[1 + m] = x[2m + 1], zero outside the row (ev[0], od[0] too)
  std::vector<float> ev(s.mp + 17, 0.f), od(s.mp + 17, 0.f);
  for (int64_t ph = 0; ph < s.h + 2; ++ph) {
    float* rows = out + ph * row_floats;
    if (ph == 0 || ph == s.h + 1) {
      std::memset(rows, 0, sizeof(float) * row_floats);
      continue;
    }
    const float* src = x + (((ib * s.d + pd - 1) * s.h) + ph - 1) * s.w * s.ci;
    for (int64_t c = 0; c < s.ci; ++c) {
      for (int64_t m0 = 0; m0 < s.mp; m0 += 16) {
        const int64_t even_left = std::max<int64_t>(0, (s.w + 1) / 2 - m0);  // x[2m], m >= m0
        const int64_t odd_left = std::max<int64_t>(0, s.w / 2 - m0);         // x[2m + 1]
        const __mmask16 me = even_left >= 16 ? 0xFFFF : (1u << even_left) - 1;
        const __mmask16 mo = odd_left >= 16 ? 0xFFFF : (1u << odd_left) - 1;
        const float* at = src + 2 * m0 * s.ci + c;
        _mm512_storeu_ps(&ev[1 + m0], _mm512_mask_i32gather_ps(_mm512_setzero_ps(), me, step,
                                                                at, 4));
        _mm512_storeu_ps(&od[1 + m0], _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mo, step,
                                                                at + s.ci, 4));
      }
      float* u = rows + c * 4 * s.mp;
      for (int64_t m0 = 0; m0 < s.mp; m0 += 16) {
        const __m512 left = _mm512_loadu_ps(&od[m0]);       // x[2m - 1]
        const __m512 even = _mm512_loadu_ps(&ev[1 + m0]);   // x[2m]
        const __m512 odd = _mm512_loadu_ps(&od[1 + m0]);    // x[2m + 1]
        const __m512 right = _mm512_loadu_ps(&ev[2 + m0]);  // x[2m + 2]
        _mm512_storeu_ps(u + m0, _mm512_sub_ps(left, odd));
        _mm512_storeu_ps(u + s.mp + m0, _mm512_add_ps(even, odd));
        _mm512_storeu_ps(u + 2 * s.mp + m0, _mm512_sub_ps(odd, even));
        _mm512_storeu_ps(u + 3 * s.mp + m0, _mm512_sub_ps(even, right));
      }
    }
  }
}

// The kernel's Winograd F(2,3) transforms along W: (4, 3, 3, Ci, 8) from DHWIO (3, 3, 3, Ci, 8),
// G0 = g0, G1 = (g0 + g1 + g2) / 2, G2 = (g0 - g1 + g2) / 2, G3 = g2 (g_k: the tap kw = k).
std::vector<float> TransformKernel(const float* kernel, int64_t ci) {
  const int64_t taps = ci * kOut;  // floats per (kd, kh, kw)
  std::vector<float> g(4 * 9 * taps);
  for (int64_t t = 0; t < 9; ++t) {
    for (int64_t j = 0; j < taps; ++j) {
      const float g0 = kernel[(t * 3) * taps + j], g1 = kernel[(t * 3 + 1) * taps + j];
      const float g2 = kernel[(t * 3 + 2) * taps + j];
      g[(0 * 9 + t) * taps + j] = g0;
      g[(1 * 9 + t) * taps + j] = 0.5f * (g0 + g1 + g2);
      g[(2 * 9 + t) * taps + j] = 0.5f * (g0 - g1 + g2);
      g[(3 * 9 + t) * taps + j] = g2;
    }
  }
  return g;
}

// Output row (ib, id, ih), all W voxels, from the three transformed input planes id..id+2
// (padded depth) in ``planes``: per 16 output pairs, the four products M_i = sum over
// (kd, kh, c) of U_i G_i (two at a time: 2 x 8 accumulators), then y[2m] = M0 + M1 + M2 and
// y[2m+1] = M1 - M2 - M3, bias and ReLU, written back channels-last.
__attribute__((target("avx512f"))) void ComputeRow(const float* const planes[3],
                                                   const float* g, const float* bias,
                                                   bool relu, const Shape& s, int64_t ih,
                                                   float* dst) {
  alignas(64) float m[4][kOut][16];
  alignas(64) float out[2][kOut][16];  // [parity of w][o][pair]
  alignas(64) int gather[16];  // lane l: channel l % 8 of voxel w0 + 2i' + l / 8
  for (int l = 0; l < 16; ++l) gather[l] = (l / kOut) * kOut * 16 + (l % kOut) * 16;
  const __m512i lanes = _mm512_load_si512(gather);
  const int64_t taps = s.ci * kOut, row_floats = s.ci * 4 * s.mp;
  for (int64_t m0 = 0; m0 < (s.w + 1) / 2; m0 += 16) {
    for (int first = 0; first < 4; first += 2) {
      __m512 a[kOut], b[kOut];
#pragma GCC unroll 8
      for (int o = 0; o < kOut; ++o) a[o] = b[o] = _mm512_setzero_ps();
      for (int64_t kd = 0; kd < 3; ++kd) {
        for (int64_t kh = 0; kh < 3; ++kh) {
          const float* row = planes[kd] + (ih + kh) * row_floats + m0;
          const float* ga = g + (first * 9 + kd * 3 + kh) * taps;
          const float* gb = ga + 9 * taps;
          for (int64_t c = 0; c < s.ci; ++c) {
            const __m512 ua = _mm512_loadu_ps(row + (c * 4 + first) * s.mp);
            const __m512 ub = _mm512_loadu_ps(row + (c * 4 + first + 1) * s.mp);
#pragma GCC unroll 8
            for (int o = 0; o < kOut; ++o) {
              a[o] = _mm512_fmadd_ps(ua, _mm512_set1_ps(ga[c * kOut + o]), a[o]);
              b[o] = _mm512_fmadd_ps(ub, _mm512_set1_ps(gb[c * kOut + o]), b[o]);
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int o = 0; o < kOut; ++o) {
        _mm512_store_ps(m[first][o], a[o]);
        _mm512_store_ps(m[first + 1][o], b[o]);
      }
    }
#pragma GCC unroll 8
    for (int o = 0; o < kOut; ++o) {
      const __m512 shift = _mm512_set1_ps(bias ? bias[o] : 0.f);
      const __m512 m0v = _mm512_load_ps(m[0][o]), m1v = _mm512_load_ps(m[1][o]);
      const __m512 m2v = _mm512_load_ps(m[2][o]), m3v = _mm512_load_ps(m[3][o]);
      __m512 even = _mm512_add_ps(_mm512_add_ps(m0v, m1v), _mm512_add_ps(m2v, shift));
      __m512 odd = _mm512_sub_ps(_mm512_sub_ps(m1v, m2v), _mm512_sub_ps(m3v, shift));
      if (relu) {
        even = _mm512_max_ps(even, _mm512_setzero_ps());
        odd = _mm512_max_ps(odd, _mm512_setzero_ps());
      }
      _mm512_store_ps(out[0][o], even);
      _mm512_store_ps(out[1][o], odd);
    }
    const int64_t w0 = 2 * m0, n = std::min<int64_t>(32, s.w - w0);
    for (int64_t i = 0; i < n; i += 2) {  // voxels w0 + i (even) and w0 + i + 1 (odd)
      const __mmask16 mask = n - i >= 2 ? 0xFFFF : 0x00FF;
      const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(i / 2)));
      _mm512_mask_storeu_ps(dst + (w0 + i) * kOut, mask, _mm512_i32gather_ps(at, &out[0][0][0], 4));
    }
  }
}

void Run(const float* x, const float* kernel, const float* bias, bool relu, float* y,
         int64_t b, int64_t d, int64_t h, int64_t w, int64_t ci) {
  const Shape s = MakeShape(b, d, h, w, ci);
  const std::vector<float> g = TransformKernel(kernel, ci);
  const int64_t planes = b * d;  // output planes (ib, id)
#pragma omp parallel
  {
    static thread_local std::vector<float> ring;  // 3 transformed input planes, per thread
    if (ring.size() < static_cast<size_t>(3 * s.plane())) ring.resize(3 * s.plane());
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t first = planes * t / threads, last = planes * (t + 1) / threads;
    int64_t held_b = -1, held_top = -1;  // ring holds padded planes held_top-2..held_top of held_b
    for (int64_t p = first; p < last; ++p) {
      const int64_t ib = p / d, id = p % d;  // reads padded planes id, id + 1, id + 2
      for (int64_t pd = id; pd <= id + 2; ++pd) {
        const bool held = ib == held_b && pd <= held_top && pd >= held_top - 2;
        if (!held) TransformPlane(x, s, ib, pd, ring.data() + (pd % 3) * s.plane());
      }
      held_b = ib;
      held_top = id + 2;
      const float* window[3];
      for (int64_t kd = 0; kd < 3; ++kd) window[kd] = ring.data() + ((id + kd) % 3) * s.plane();
      for (int64_t ih = 0; ih < h; ++ih) {
        ComputeRow(window, g.data(), bias, relu, s, ih, y + ((p * h + ih) * w) * kOut);
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
  return avx512 && co == kOut && ci >= 1 && kd == 3 && kh == 3 && kw == 3 && stride == 1;
}

void DirectConv(const float* x, const float* kernel, const float* bias, bool relu, float* y,
                int64_t b, int64_t d, int64_t h, int64_t w, int64_t ci) {
  Run(x, kernel, bias, relu, y, b, d, h, w, ci);
}

}  // namespace mlssp
