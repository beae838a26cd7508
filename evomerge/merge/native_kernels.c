/* Native twins of the torch engine's bfloat16 kernels for `evomerge.merge.fast` (numpy has no
 * bfloat16). They follow the torch kernels operation for operation: float32 arithmetic, each
 * `add(x, alpha=w)` one fused multiply-add, the result rounded to bfloat16 to nearest even, a NaN
 * written as 0xFFFF as torch's vectorized conversion writes it. Built with -ffp-contract=off, so
 * the compiler fuses nothing else. Work goes in blocks that stay in a core's L1/L2. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 2048

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    if (f != f) return 0xFFFF;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* acc[i] = fma(x_{k-1}[s+i], w_{k-1}, ... fma(x_0[s+i], w_0, acc[i])), inputs in order. Up to four
 * inputs share one pass over acc: written as one loop per input, GCC jams pairs of them into a
 * loop it does not vectorize. */
static void accumulate(int64_t m, float *restrict acc, int k, const uint16_t *const *xs, int64_t s, const float *w) {
    for (int j = 0; j < k; j += 4) {
        const uint16_t *restrict x0 = xs[j] + s;
        if (k - j == 1) {
            float w0 = w[j];
            for (int64_t i = 0; i < m; i++) acc[i] = fmaf(bf16_to_f32(x0[i]), w0, acc[i]);
        } else if (k - j == 2) {
            const uint16_t *restrict x1 = xs[j + 1] + s;
            float w0 = w[j], w1 = w[j + 1];
            for (int64_t i = 0; i < m; i++)
                acc[i] = fmaf(bf16_to_f32(x1[i]), w1, fmaf(bf16_to_f32(x0[i]), w0, acc[i]));
        } else if (k - j == 3) {
            const uint16_t *restrict x1 = xs[j + 1] + s, *restrict x2 = xs[j + 2] + s;
            float w0 = w[j], w1 = w[j + 1], w2 = w[j + 2];
            for (int64_t i = 0; i < m; i++)
                acc[i] = fmaf(bf16_to_f32(x2[i]), w2, fmaf(bf16_to_f32(x1[i]), w1, fmaf(bf16_to_f32(x0[i]), w0, acc[i])));
        } else {
            const uint16_t *restrict x1 = xs[j + 1] + s, *restrict x2 = xs[j + 2] + s, *restrict x3 = xs[j + 3] + s;
            float w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
            for (int64_t i = 0; i < m; i++)
                acc[i] = fmaf(bf16_to_f32(x3[i]), w3,
                              fmaf(bf16_to_f32(x2[i]), w2, fmaf(bf16_to_f32(x1[i]), w1, fmaf(bf16_to_f32(x0[i]), w0, acc[i]))));
        }
    }
}

/* out = round_bf16(keep * base + sum_j scales[j] * xs[j]), summed left to right with FMAs:
 * torch's `_linear_sum_half` without masks (task_arithmetic over 16-bit inputs). */
void evomerge_task_arithmetic_bf16(int64_t n, const uint16_t *base, int k, const uint16_t *const *xs,
                                   const float *scales, float keep, uint16_t *out) {
    float acc[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        const uint16_t *restrict b = base + s;
        for (int64_t i = 0; i < m; i++) acc[i] = bf16_to_f32(b[i]) * keep;
        accumulate(m, acc, k, xs, s, scales);
        uint16_t *restrict o = out + s;
        for (int64_t i = 0; i < m; i++) o[i] = f32_to_bf16(acc[i]);
    }
}

/* out = round_bf16(sum_j weights[j] * xs[j] [/ divisor]) from +0, with FMAs: methods.Linear over
 * bfloat16 inputs (accumulated in float32). */
void evomerge_linear_bf16(int64_t n, int k, const uint16_t *const *xs, const float *weights, int divide,
                          float divisor, uint16_t *out) {
    float acc[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        accumulate(m, acc, k, xs, s, weights);
        if (divide)
            for (int64_t i = 0; i < m; i++) acc[i] /= divisor;
        uint16_t *restrict o = out + s;
        for (int64_t i = 0; i < m; i++) o[i] = f32_to_bf16(acc[i]);
    }
}
