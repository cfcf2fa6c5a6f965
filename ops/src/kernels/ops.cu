// taesd-ops CUDA kernels (compiled to PTX by build.rs with the pinned nvcc 13.0).
//
// Every tensor is contiguous, NCHW or (kernels named *_cl) NHWC ("channels last", src/format.rs). Arithmetic is in f32 whatever the storage type (f32, bf16,
// f16), rounded once on store. ReLU keeps NaN (as torch.relu), and its gradient passes where
// the output is > 0 (as PyTorch's threshold_backward).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float relu_f(float v) { return v < 0.0f ? 0.0f : v; }

// y = act(y + b[c]) in place. Grid: x over the H*W plane (grid-stride), y over the N*C planes
// (grid-stride). `b` may be null (no bias).
template <typename T>
__device__ void bias_act(T *y, const T *b, uint32_t c, uint32_t hw, uint32_t planes, int relu) {
  for (uint32_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const float bias = b ? to_f(b[p % c]) : 0.0f;
    T *row = y + (size_t)p * hw;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < hw; i += gridDim.x * blockDim.x) {
      float v = to_f(row[i]) + bias;
      row[i] = from_f<T>(relu ? relu_f(v) : v);
    }
  }
}

// Backward of act(z + b): dz = relu ? (y > 0 ? dy : 0) : dy, written to `dz` when relu;
// partial[n * C + c] = sum over the plane (n, c) of dz (f32), when `partial` is not null.
// Grid: (N, C); one block per plane, blockDim a multiple of 32, at most 1024.
template <typename T>
__device__ void act_bias_bwd(const T *dy, const T *y, T *dz, float *partial, uint32_t c,
                             uint32_t hw, int relu) {
  const size_t p = (size_t)blockIdx.x * c + blockIdx.y;
  const T *gy = dy + p * hw;
  const T *yy = y + p * hw;
  T *gz = dz + p * hw;
  float acc = 0.0f;
  for (uint32_t i = threadIdx.x; i < hw; i += blockDim.x) {
    float g = to_f(gy[i]);
    if (relu) {
      g = to_f(yy[i]) > 0.0f ? g : 0.0f;
      gz[i] = from_f<T>(g);
    }
    acc += g;
  }
  if (!partial) return;
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    acc = lane < nw ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) partial[p] = acc;
  }
}

// db[c] = sum_n partial[n * C + c], in a fixed order (deterministic).
template <typename T>
__device__ void bias_grad_finish(const float *partial, T *db, uint32_t n, uint32_t c) {
  const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= c) return;
  float s = 0.0f;
  for (uint32_t k = 0; k < n; ++k) s += partial[(size_t)k * c + j];
  db[j] = from_f<T>(s);
}

// out = relu(a + b), elementwise over `n`.
template <typename T> __device__ void add_relu(const T *a, const T *b, T *out, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    out[i] = from_f<T>(relu_f(to_f(a[i]) + to_f(b[i])));
}

// dx = y > 0 ? dy : 0, elementwise over `n` (ReLU backward from the output).
template <typename T> __device__ void relu_bwd(const T *dy, const T *y, T *dx, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    dx[i] = to_f(y[i]) > 0.0f ? dy[i] : from_f<T>(0.0f);
}

template <typename T> struct alignas(2 * sizeof(T)) Pair {
  T a, b;
};

// Nearest 2x upsample: one thread per input element (plane p, row h, column w) writes the 2x2
// block. x: [planes, h, w], y: [planes, 2h, 2w].
template <typename T>
__device__ void upsample2x(const T *x, T *y, uint32_t h, uint32_t w, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t row = i / w;  // p * h + r
    const uint32_t col = (uint32_t)(i - row * w);
    const T v = x[i];
    Pair<T> pr;
    pr.a = v;
    pr.b = v;
    const size_t o = (2 * row) * (size_t)(2 * w) + 2 * col;  // (p*2h + 2r) * 2w + 2col
    *reinterpret_cast<Pair<T> *>(y + o) = pr;
    *reinterpret_cast<Pair<T> *>(y + o + 2 * w) = pr;
  }
}

// Its backward: dx[p, r, c] = sum of the 2x2 block of dy (f32 accumulation).
template <typename T>
__device__ void downsum2x(const T *dy, T *dx, uint32_t h, uint32_t w, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t row = i / w;
    const uint32_t col = (uint32_t)(i - row * w);
    const size_t o = (2 * row) * (size_t)(2 * w) + 2 * col;
    const Pair<T> t = *reinterpret_cast<const Pair<T> *>(dy + o);
    const Pair<T> u = *reinterpret_cast<const Pair<T> *>(dy + o + 2 * w);
    // The order of candle's reshape + sum (row pairs, then columns) is irrelevant in f32 for
    // bf16/f16 inputs; for f32 we add as (t.a + t.b) + (u.a + u.b).
    dx[i] = from_f<T>((to_f(t.a) + to_f(t.b)) + (to_f(u.a) + to_f(u.b)));
  }
}

// Channels last: the tensor is [rows, C]. Launched with blockDim a multiple of C, so the
// grid-stride is one too and thread t always meets channel threadIdx.x % C.
// y = act(y + b[c]) in place over n elements; `b` may be null.
template <typename T>
__device__ void bias_act_cl(T *y, const T *b, uint32_t c, size_t n, int relu) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const float bias = b ? to_f(b[threadIdx.x % c]) : 0.0f;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float v = to_f(y[i]) + bias;
    y[i] = from_f<T>(relu ? relu_f(v) : v);
  }
}

// Backward of act(z + b), channels last (launched as bias_act_cl, blockDim floats of dynamic
// shared memory): dz as act_bias_bwd; partial[block * C + c] = this block's sum of dz over
// channel c (f32, fixed order), when `partial` is not null. bias_grad_finish sums the blocks.
template <typename T>
__device__ void act_bias_bwd_cl(const T *dy, const T *y, T *dz, float *partial, uint32_t c,
                                size_t n, int relu) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  float acc = 0.0f;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float g = to_f(dy[i]);
    if (relu) {
      g = to_f(y[i]) > 0.0f ? g : 0.0f;
      dz[i] = from_f<T>(g);
    }
    acc += g;
  }
  if (!partial) return;
  extern __shared__ float sums[];
  sums[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < c) {
    float s = 0.0f;
    for (uint32_t k = threadIdx.x; k < blockDim.x; k += c) s += sums[k];
    partial[(size_t)blockIdx.x * c + threadIdx.x] = s;
  }
}

// Nearest 2x upsample, channels last: x [rows = N*H, W, C] -> y [2 rows, 2W, C], one thread
// per input element.
template <typename T>
__device__ void upsample2x_cl(const T *x, T *y, uint32_t w, uint32_t c, size_t n) {
  const size_t wc = (size_t)w * c;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t row = i / wc;
    const size_t rem = i - row * wc;  // col * c + ch
    const size_t ch = rem % c;
    const size_t o = (2 * row) * (2 * wc) + 2 * (rem - ch) + ch;
    const T v = x[i];
    y[o] = v;
    y[o + c] = v;
    y[o + 2 * wc] = v;
    y[o + 2 * wc + c] = v;
  }
}

// Its backward: dx = the sum of the 2x2 block, added as downsum2x does.
template <typename T>
__device__ void downsum2x_cl(const T *dy, T *dx, uint32_t w, uint32_t c, size_t n) {
  const size_t wc = (size_t)w * c;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t row = i / wc;
    const size_t rem = i - row * wc;
    const size_t ch = rem % c;
    const size_t o = (2 * row) * (2 * wc) + 2 * (rem - ch) + ch;
    dx[i] = from_f<T>((to_f(dy[o]) + to_f(dy[o + c])) +
                      (to_f(dy[o + 2 * wc]) + to_f(dy[o + 2 * wc + c])));
  }
}

// Training-mode BatchNorm, channels last (launched as bias_act_cl, 2 * blockDim floats of
// dynamic shared memory). One pass of per-channel sums: with mode 0 p1 = sum a; mode 1
// p1 = sum (a - mean)^2; mode 2 p1 = sum a, p2 = sum a * (b - mean) * invstd (a = dz, b = x).
// p1, p2: [blocks, C] partial sums (f32, fixed order); bias_grad_finish_f32 sums the blocks.
template <typename T>
__device__ void bn_sums_cl(const T *a, const T *b, const float *mean, const float *invstd,
                           float *p1, float *p2, uint32_t c, size_t n, int mode) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const uint32_t ch = threadIdx.x % c;
  const float m = mean ? mean[ch] : 0.0f;
  const float is = invstd ? invstd[ch] : 1.0f;
  float s1 = 0.0f, s2 = 0.0f;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = to_f(a[i]);
    if (mode == 0) {
      s1 += v;
    } else if (mode == 1) {
      const float d = v - m;
      s1 += d * d;
    } else {
      s1 += v;
      s2 += v * ((to_f(b[i]) - m) * is);
    }
  }
  extern __shared__ float sums[];
  sums[threadIdx.x] = s1;
  sums[blockDim.x + threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.x < c) {
    float t1 = 0.0f, t2 = 0.0f;
    for (uint32_t k = threadIdx.x; k < blockDim.x; k += c) {
      t1 += sums[k];
      t2 += sums[blockDim.x + k];
    }
    p1[(size_t)blockIdx.x * c + threadIdx.x] = t1;
    if (p2) p2[(size_t)blockIdx.x * c + threadIdx.x] = t2;
  }
}

// y = relu((x - mean[c]) * invstd[c] * w[c] + bias[c]), channels last (as bias_act_cl).
template <typename T>
__device__ void bn_apply_relu_cl(const T *x, T *y, const float *mean, const float *invstd,
                                 const float *w, const float *bias, uint32_t c, size_t n) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const uint32_t ch = threadIdx.x % c;
  const float sc = invstd[ch] * w[ch];
  const float sh = bias[ch] - mean[ch] * sc;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = from_f<T>(relu_f(to_f(x[i]) * sc + sh));
}

// dx = w[c] * invstd[c] * (dz - db[c] / m - xhat * dw[c] / m), xhat = (x - mean) * invstd, with
// db = sum dz and dw = sum dz * xhat over the m = N*H*W values of the channel (as bias_act_cl).
template <typename T>
__device__ void bn_bwd_dx_cl(const T *dz, const T *x, T *dx, const float *mean,
                             const float *invstd, const float *w, const float *db,
                             const float *dw, float inv_m, uint32_t c, size_t n) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const uint32_t ch = threadIdx.x % c;
  const float m = mean[ch], is = invstd[ch], k = w[ch] * is;
  const float gb = db[ch] * inv_m, gw = dw[ch] * inv_m;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float xh = (to_f(x[i]) - m) * is;
    dx[i] = from_f<T>(k * (to_f(dz[i]) - gb - xh * gw));
  }
}

#define INSTANTIATE(NAME, T)                                                                    \
  extern "C" __global__ void bias_act_##NAME(T *y, const T *b, uint32_t c, uint32_t hw,          \
                                             uint32_t planes, int relu) {                        \
    bias_act<T>(y, b, c, hw, planes, relu);                                                      \
  }                                                                                             \
  extern "C" __global__ void act_bias_bwd_##NAME(const T *dy, const T *y, T *dz, float *partial, \
                                                 uint32_t c, uint32_t hw, int relu) {            \
    act_bias_bwd<T>(dy, y, dz, partial, c, hw, relu);                                            \
  }                                                                                             \
  extern "C" __global__ void bias_grad_finish_##NAME(const float *partial, T *db, uint32_t n,    \
                                                     uint32_t c) {                               \
    bias_grad_finish<T>(partial, db, n, c);                                                      \
  }                                                                                             \
  extern "C" __global__ void add_relu_##NAME(const T *a, const T *b, T *out, size_t n) {         \
    add_relu<T>(a, b, out, n);                                                                   \
  }                                                                                             \
  extern "C" __global__ void relu_bwd_##NAME(const T *dy, const T *y, T *dx, size_t n) {         \
    relu_bwd<T>(dy, y, dx, n);                                                                   \
  }                                                                                             \
  extern "C" __global__ void upsample2x_##NAME(const T *x, T *y, uint32_t h, uint32_t w,         \
                                               size_t n) {                                       \
    upsample2x<T>(x, y, h, w, n);                                                                \
  }                                                                                             \
  extern "C" __global__ void downsum2x_##NAME(const T *dy, T *dx, uint32_t h, uint32_t w,        \
                                              size_t n) {                                        \
    downsum2x<T>(dy, dx, h, w, n);                                                               \
  }                                                                                             \
  extern "C" __global__ void bias_act_cl_##NAME(T *y, const T *b, uint32_t c, size_t n,          \
                                                int relu) {                                      \
    bias_act_cl<T>(y, b, c, n, relu);                                                            \
  }                                                                                             \
  extern "C" __global__ void act_bias_bwd_cl_##NAME(const T *dy, const T *y, T *dz,              \
                                                    float *partial, uint32_t c, size_t n,        \
                                                    int relu) {                                  \
    act_bias_bwd_cl<T>(dy, y, dz, partial, c, n, relu);                                          \
  }                                                                                             \
  extern "C" __global__ void upsample2x_cl_##NAME(const T *x, T *y, uint32_t w, uint32_t c,      \
                                                  size_t n) {                                    \
    upsample2x_cl<T>(x, y, w, c, n);                                                             \
  }                                                                                             \
  extern "C" __global__ void downsum2x_cl_##NAME(const T *dy, T *dx, uint32_t w, uint32_t c,     \
                                                 size_t n) {                                     \
    downsum2x_cl<T>(dy, dx, w, c, n);                                                            \
  }                                                                                             \
  extern "C" __global__ void bn_sums_cl_##NAME(const T *a, const T *b, const float *mean,        \
                                               const float *invstd, float *p1, float *p2,        \
                                               uint32_t c, size_t n, int mode) {                 \
    bn_sums_cl<T>(a, b, mean, invstd, p1, p2, c, n, mode);                                       \
  }                                                                                             \
  extern "C" __global__ void bn_apply_relu_cl_##NAME(const T *x, T *y, const float *mean,        \
                                                     const float *invstd, const float *w,        \
                                                     const float *bias, uint32_t c, size_t n) {  \
    bn_apply_relu_cl<T>(x, y, mean, invstd, w, bias, c, n);                                      \
  }                                                                                             \
  extern "C" __global__ void bn_bwd_dx_cl_##NAME(const T *dz, const T *x, T *dx,                 \
                                                 const float *mean, const float *invstd,         \
                                                 const float *w, const float *db,                \
                                                 const float *dw, float inv_m, uint32_t c,       \
                                                 size_t n) {                                     \
    bn_bwd_dx_cl<T>(dz, x, dx, mean, invstd, w, db, dw, inv_m, c, n);                            \
  }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, __nv_bfloat16)
INSTANTIATE(f16, __half)

// Adam / AMSGrad / AdamW on flat f32 buffers, one thread per element, writing fresh outputs
// (p_out, m_out, v_out, vmax_out; vmax and vmax_out null without AMSGrad). `scale` (nullable):
// a device scalar that multiplies the gradient (gradient clipping), read on the device so the
// host never waits for it. Hyperparameters come precomputed in f64 and rounded to f32 on the
// host, and every product and sum is rounded separately (no FMA contraction): the same f32
// arithmetic as the CPU loop, and as the candle op sequence in train/src/recipe/optim.rs:
//   g = g * scale;  AdamW: p = p * (1 - lr wd)  |  Adam: g = g + p * wd
//   m = m + (g - m) * (1 - b1);  v = v * b2 + (g * g) * (1 - b2);  s = amsgrad ? max(vmax, v) : v
//   p = p - (m / (sqrt(s) * inv_bc2_sqrt + eps)) * step_size
extern "C" __global__ void adam_f32(const float *p, const float *g, const float *m,
                                    const float *v, const float *vmax, const float *scale,
                                    float *p_out, float *m_out, float *v_out, float *vmax_out,
                                    size_t n, float decay_mul, float wd, int decoupled,
                                    float one_minus_b1, float b2, float one_minus_b2,
                                    float inv_bc2_sqrt, float eps, float step_size) {
  const float sc = scale ? scale[0] : 1.0f;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i];
    if (scale) gi = __fmul_rn(gi, sc);
    float pi = p[i];
    if (wd != 0.0f) {
      if (decoupled)
        pi = __fmul_rn(pi, decay_mul);
      else
        gi = __fadd_rn(gi, __fmul_rn(pi, wd));
    }
    const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(gi, m[i]), one_minus_b1));
    const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), one_minus_b2));
    float s = vi;
    if (vmax) {
      s = fmaxf(vmax[i], vi);
      vmax_out[i] = s;
    }
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(s), inv_bc2_sqrt), eps);
    p_out[i] = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step_size));
    m_out[i] = mi;
    v_out[i] = vi;
  }
}
