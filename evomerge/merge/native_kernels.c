/* Native twins of the torch engine's bfloat16 kernels, for `evomerge.merge.fast` (numpy has no
 * bfloat16) and for the torch engine itself on the CPU. They follow the torch kernels operation for operation: float32 arithmetic, each
 * `add(x, alpha=w)` one fused multiply-add, the result rounded to bfloat16 to nearest even, a NaN
 * written as 0xFFFF as torch's vectorized conversion writes it. Built with -ffp-contract=off, so
 * the compiler fuses nothing else. Work goes in blocks that stay in a core's L1/L2. */
#include <float.h>
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
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0xFFFF : rounded;
}

/* d = bf16(x - b), torch's bfloat16 subtraction (in float32, rounded), back in float32 */
static inline float bf16_delta(uint16_t x, uint16_t b) { return bf16_to_f32(f32_to_bf16(bf16_to_f32(x) - bf16_to_f32(b))); }

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

/* One source's kept delta in a block, as `ThresholdBandMask` keeps it in the torch kernel:
 * d = `bf16_delta`, hardshrink by `lam` (a bfloat16 value: drop
 * -lam <= d <= lam, written +0), then the first `*left` dropped elements whose magnitude bits
 * equal `key` (ties with the threshold, in index order) put back. A block keeps all its ties
 * while they are fewer than those left; only the block where they run out is walked in order. */
static void kept_delta(int64_t m, const uint16_t *restrict x, const uint16_t *restrict b, float lam, uint16_t key,
                       int64_t *left, float *restrict dd) {
    int64_t r = *left;
    const float thr = bf16_to_f32(key);
    if (r == 0) {
        for (int64_t i = 0; i < m; i++) {
            float d = bf16_delta(x[i], b[i]);
            dd[i] = (d >= -lam && d <= lam) ? 0.0f : d;
        }
        return;
    }
    for (int64_t i = 0; i < m; i++) {
        float d = bf16_delta(x[i], b[i]);
        float shrunk = (d >= -lam && d <= lam) ? 0.0f : d;
        dd[i] = fabsf(d) == thr ? d : shrunk;
    }
    /* lam is thr here: what is dropped is 0 and not a tie (with thr = 0, every 0 is a tie) */
    int32_t ties = 0;
    for (int64_t i = 0; i < m; i++) ties += fabsf(dd[i]) == thr;
    if (ties <= r) {
        *left = r - ties;
        return;
    }
    for (int64_t i = 0; i < m; i++) {
        if (fabsf(dd[i]) == thr) {
            if (r > 0)
                r--;
            else
                dd[i] = 0.0f;
        }
    }
    *left = 0;
}

static inline float sign_of(float x) { return (float)(0.0f < x) - (float)(x < 0.0f); }

/* TIES over bfloat16 inputs with magnitude masks: torch's `_ties_fast` for 16-bit inputs,
 * operation for operation (sums in float32; `addcmul(a, t, u, value=v)` is fma(v * t, u, a),
 * `add(a, t, alpha=v)` is fma(t, v, a), `addcdiv(a, t, u, value=v)` is a + v * t / u; `clamp_min(tiny)`
 * is FLT_MIN). `left[j]`: how many ties with input j's threshold to put back, used up as it goes. */
void evomerge_ties_bf16(int64_t n, const uint16_t *base, int k, const uint16_t *const *xs, const float *w,
                        const float *lams, const uint16_t *keys, int64_t *left, int normalize, float lam,
                        float half_lam, uint16_t *out) {
    float S[BLOCK], da[BLOCK], ws[BLOCK], wa[BLOCK], dd[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        const uint16_t *restrict b = base + s;
        for (int j = 0; j < k; j++) {
            kept_delta(m, xs[j] + s, b, lams[j], keys[j], &left[j], dd);
            float wj = w[j];
            if (j == 0) {
                for (int64_t i = 0; i < m; i++) {
                    float g = sign_of(dd[i]);
                    S[i] = dd[i] * wj;
                    da[i] = fabsf(dd[i]);
                    if (normalize) {
                        ws[i] = g * wj;
                        wa[i] = (g * g) * wj;
                    }
                    if (wj != 1.0f) da[i] = da[i] * wj;
                }
            } else if (normalize) {
                for (int64_t i = 0; i < m; i++) {
                    float g = sign_of(dd[i]);
                    S[i] = fmaf(dd[i], wj, S[i]);
                    da[i] = fmaf(wj * dd[i], g, da[i]);
                    ws[i] = fmaf(g, wj, ws[i]);
                    wa[i] = fmaf(wj * g, g, wa[i]);
                }
            } else {
                for (int64_t i = 0; i < m; i++) {
                    S[i] = fmaf(dd[i], wj, S[i]);
                    da[i] = fmaf(fabsf(dd[i]), wj, da[i]);
                }
            }
        }
        uint16_t *restrict o = out + s;
        for (int64_t i = 0; i < m; i++) {
            float g = copysignf(1.0f, S[i]);
            float num = fmaf(da[i], g, S[i]);
            float bb = bf16_to_f32(b[i]);
            float r;
            if (normalize) {
                float den = fmaf(ws[i], g, wa[i]);
                den = den < FLT_MIN ? FLT_MIN : den;
                r = bb + (lam * num) / den;
            } else {
                r = fmaf(num, half_lam, bb);
            }
            o[i] = f32_to_bf16(r);
        }
    }
}
