/* headlab's fused row pass for the torch backend on CPU (loaded by kernels/fused_rows.py).

   After the score product, the chunk body needs from each row of scores s: e = 2^(s - shift), the row sum l,
   the entropy's dot Σ e·(s - shift - log2 l) and the key mass += w · e / L. As torch ops these are five or
   six passes over a tile larger than the L2 cache; here each row is read while it is still in L1 / L2.
   Scores are in base-2 units. Compiled with the system C compiler for the machine it runs on; GCC / Clang
   vector extensions, so the same source builds for AVX-512, AVX2, SSE or NEON. */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* One vector register of the compiler's target: 16 floats under AVX-512, 8 under AVX / AVX2, else 4 (SSE,
   NEON). Wider than the target's registers, GCC splits the generic vectors but scalarises parts of exp2v:
   16 lanes built for AVX2 ran the row pass 7x slower (T = 4096, smollm2's shape: 251-297 ms against 37). */
#ifndef LANES
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

#define ROUND_MAGIC 12582912.0f /* 1.5 · 2^23: (x + M) - M rounds x to the nearest integer */
#define MASKED_BELOW -1.0e38f   /* the chunk body writes masked scores as -3.4e38 */
/* 2^-24 and 2^24: a reference shift within 24 bits of the max (torch_backend.SHIFT_RANGE; a test holds them equal) */
#define SHIFT_LOW 5.9604644775390625e-08f
#define SHIFT_HIGH 16777216.0f

static inline vf load(const float *p, long n) {
    vf v;
    if (n >= LANES) {
        memcpy(&v, p, sizeof v); /* an unaligned load */
        return v;
    }
    for (int j = 0; j < LANES; j++) v[j] = j < n ? p[j] : -3.0e38f; /* a masked score: 2^x = 0 */
    return v;
}

static inline void store(float *p, vf v, long n) {
    if (n >= LANES) {
        memcpy(p, &v, sizeof v);
        return;
    }
    for (long j = 0; j < n; j++) p[j] = v[j];
}

static inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline float hsum(vf v) {
    float t = 0.0f;
    for (int j = 0; j < LANES; j++) t += v[j];
    return t;
}

/* 2^x per lane. x = n + f with n an integer and |f| <= 1/2; 2^f from its degree-7 Taylor polynomial
   (truncation error below 6e-9 relative), 2^n written into the exponent bits. 0 below 2^-126 (denormals
   are dropped: they weigh less than 1e-38 against a row maximum of 1). */
static inline vf exp2v(vf x) {
    const vf lo = (vf){0} - 126.0f, hi = (vf){0} + 126.0f;
    vf xc = select(x < lo, lo, x);
    xc = select(xc > hi, hi, xc);
    vf n = (xc + ROUND_MAGIC) - ROUND_MAGIC;
    vf f = xc - n;
    vf p = f * 1.5252733804059840e-5f + 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
    vf r = p * (vf)scale;
    return (vf)((vi)r & ~(x < lo));
}

/* e = 2^(s - m) over one row of w scores; returns Σ e. */
static float exp_row(const float *s, float *e, long w, float m) {
    vf acc0 = {0}, acc1 = {0};
    long k = 0;
    for (; k + 2 * LANES <= w; k += 2 * LANES) {
        vf a = exp2v(load(s + k, LANES) - m), b = exp2v(load(s + k + LANES, LANES) - m);
        store(e + k, a, LANES);
        store(e + k + LANES, b, LANES);
        acc0 += a;
        acc1 += b;
    }
    for (; k < w; k += LANES) {
        vf a = exp2v(load(s + k, w - k) - m);
        store(e + k, a, w - k);
        acc0 += a;
    }
    return hsum(acc0 + acc1);
}

static float max_row(const float *s, long w) {
    vf m = load(s, w);
    for (long k = LANES; k < w; k += LANES) {
        vf v = load(s + k, w - k);
        m = select(v > m, v, m);
    }
    float r = m[0];
    for (int j = 1; j < LANES; j++) r = m[j] > r ? m[j] : r;
    return r;
}

/* Returns Σ e·((s - m) - t) (centred on t = log2 l, which keeps the fp32 sum as precise as under the max
   shift however far m lies above the reference); adds weight · e to the key mass. */
static float dot_and_mass(const float *s, const float *e, long w, float m, float t, float weight, float *mass) {
    vf acc = {0};
    long k = 0;
    for (; k + LANES <= w; k += LANES) {
        vf ev = load(e + k, LANES);
        acc += ev * ((load(s + k, LANES) - m) - t);
        if (weight != 0.0f) store(mass + k, load(mass + k, LANES) + ev * weight, LANES);
    }
    float tail = 0.0f;
    for (; k < w; k++) {
        tail += e[k] * ((s[k] - m) - t);
        if (weight != 0.0f) mass[k] += e[k] * weight;
    }
    return hsum(acc) + tail;
}

/* One chunk: s and e are [batch · head, rows, w]; this call does heads [bh_lo, bh_hi) (threads split the
   heads, so no two write the same key mass). Row arrays (shift, row_sum, row_dot, dot_center) are
   [batch · head, n_q] with this chunk's rows from `start`; weight is [batch, n_q] (0: a row not counted);
   sinks [head] in base 2 or NULL; key_mass [batch · head, n_k] with this chunk's keys from `lo`.
   reference = 1: s is already shifted by shift[row] (a reference score), and a row whose sum leaves
   [2^-24, 2^24] is redone with its maximum; reference = 0: every row is shifted by its maximum.
   Returns how many rows (that see a key) were redone. */
long headlab_fused_rows(const float *s, float *e, long bh_lo, long bh_hi, long rows, long w, long n_heads,
                        float *shift, float *row_sum, float *row_dot, float *dot_center, long n_q, long start,
                        const float *weight, const float *sinks, float *key_mass, long n_k, long lo,
                        int reference) {
    long redone = 0;
    for (long bh = bh_lo; bh < bh_hi; bh++) {
        long b = bh / n_heads, h = bh % n_heads;
        for (long r = 0; r < rows; r++) {
            const float *sr = s + (bh * rows + r) * w;
            float *er = e + (bh * rows + r) * w;
            long at = bh * n_q + start + r;
            float c = reference ? shift[at] : 0.0f, m = 0.0f, l = 0.0f;
            int redo = !reference;
            if (reference) {
                l = exp_row(sr, er, w, 0.0f);
                redo = !(l >= SHIFT_LOW && l <= SHIFT_HIGH); /* true for NaN too */
            }
            if (redo) {
                m = max_row(sr, w);
                if (!(m > MASKED_BELOW)) { /* the row sees no key: output 0, nothing counted */
                    memset(er, 0, w * sizeof(float));
                    row_sum[at] = row_dot[at] = dot_center[at] = 0.0f;
                    if (!reference) shift[at] = 0.0f;
                    continue;
                }
                l = exp_row(sr, er, w, m);
                shift[at] = c + m;
                redone += reference;
            }
            float t = log2f(l);
            float total = sinks ? l + exp2f(sinks[h] - (c + m)) : l;
            row_sum[at] = l;
            dot_center[at] = t;
            row_dot[at] = dot_and_mass(sr, er, w, m, t, weight[b * n_q + start + r] / total,
                                       key_mass + bh * n_k + lo);
        }
    }
    return redone;
}
