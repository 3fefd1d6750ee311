// The 3x3x3 convolution with eight output channels of direct_conv.cc (see there for why).
#pragma once

#include <cstdint>

namespace mlssp {

// Whether DirectConv computes this convolution: 8 output channels, a 3x3x3 kernel, stride 1
// ('SAME'), on a CPU with AVX-512F.
bool DirectConvApplies(int64_t ci, int64_t co, int64_t kd, int64_t kh, int64_t kw,
                       int64_t stride);

// y = conv(x, kernel) + bias, then ReLU if ``relu``; 'SAME' zero padding, stride 1.
// x (b, d, h, w, ci) and y (b, d, h, w, 8) channels-last; kernel DHWIO (3, 3, 3, ci, 8);
// bias (8) or nullptr. Runs on the calling thread's OpenMP team; each of its threads keeps
// a scratch buffer (three transposed input planes) between calls, so calls from different
// threads must not overlap while sharing a team (callers serialise them).
void DirectConv(const float* x, const float* kernel, const float* bias, bool relu, float* y,
                int64_t b, int64_t d, int64_t h, int64_t w, int64_t ci);

// Whether DirectUpConv computes this transposed convolution: 8 output channels, a 2x2x2
// kernel with stride 2, on a CPU with AVX-512F.
bool DirectUpConvApplies(int64_t cx, int64_t kd, int64_t kh, int64_t kw, int64_t stride);

// The 2x2x2 stride-2 transposed convolution (the input gradient of the stride-2 'VALID'
// convolution x -> y with this kernel): y (b, d, h, w, c) -> x (b, 2d, 2h, 2w, 8),
// x[.., 2i + a, 2j + e, 2k + f, o] = sum_ci y[.., i, j, k, ci] kernel[a, e, f, o, ci];
// kernel DHWIO (2, 2, 2, 8, c). Runs on the calling thread's OpenMP team.
void DirectUpConv(const float* y, const float* kernel, float* x, int64_t b, int64_t d,
                  int64_t h, int64_t w, int64_t c);

}  // namespace mlssp
