/* nasopt integer kernels (C99): int8 activations, weights of 2..8 bits packed little-endian
 * bit by bit, int32 accumulators, fixed-point requantization. The semantics are defined in
 * nasopt/deploy/firmware/reference.py; nasopt export --format c checks the two agree bit for bit.
 * Layouts are channel-major (C, L) / (C, H, W), as PyTorch's. Only the kernels a model uses are
 * compiled in (NQ_USE_* set by model.c). Build without floating-point contraction
 * (-ffp-contract=off): the input quantization is two float32 operations, mul then add.
 *
 * The model runs as a table of steps (nq_steps: kernel, layer record, arena offsets) walked by
 * nq_predict; every model-dependent number (sizes, offsets, scales) is data, not an immediate
 * in the code, and the row buffer and the logits live in static memory, not on the stack. With
 * GCC the kernels and nq_row are kept out of line and out of interprocedural optimization
 * (noipa), the small helpers always inlined: the code of each function does not depend on the
 * model or on which other kernels are compiled in, so the flash of a model is the sum of the
 * code of the kernels it uses plus its data (nasopt.deploy.firmware.footprint). */

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define NQ_OWN __attribute__((noipa))
#define NQ_INLINE __attribute__((always_inline)) inline
#elif defined(__GNUC__)
#define NQ_OWN __attribute__((noinline))
#define NQ_INLINE __attribute__((always_inline)) inline
#else
#define NQ_OWN
#define NQ_INLINE inline
#endif

/* one step of the model: run(arena + x, arena + x2, arena + y or the logits, layer) */
typedef void (*nq_kernel_t)(const int8_t *x, const int8_t *x2, void *y, const void *layer);
typedef struct {
    nq_kernel_t run;       /* NULL ends the table */
    const void *layer;
    uint32_t x, x2, y;     /* arena offsets; y = NQ_LOGITS: the caller's int32 logits */
} nq_step_t;
#define NQ_LOGITS 0xFFFFFFFFu

typedef struct {
    float a, c;            /* u = x * a; u = u + c (see nq_input) */
    uint32_t n, y;         /* floats per sample, the input's arena offset */
    uint32_t classes;
} nq_input_t;

typedef struct {
    const uint8_t *w;      /* kept weights, `bits` each, row-major (cout, cin, k[, k]) */
    const uint8_t *mask;   /* one bit per weight (1: kept) or NULL when dense */
    const int32_t *bias;   /* int32, scale s_in * s_w[c] */
    const int32_t *mult;   /* requantization multiplier per output channel, < 2^31 */
    const uint8_t *shift;  /* right shift per output channel, 1..62 */
    uint16_t cin, cout, k, stride, pad, in_h, in_w, out_h, out_w;
    int16_t zp_in, zp_out;
    int8_t act_min, act_max;
    uint8_t bits, logits;  /* logits: write int32 (no zero point, no clamp to int8) */
} nq_conv_t;

typedef struct {
    uint32_t v, m;  /* next kept value, next mask bit */
} nq_cursor_t;

static NQ_INLINE int64_t nq_scale(int32_t acc, int32_t mult, uint8_t shift)
{
    return ((int64_t)acc * mult + ((int64_t)1 << (shift - 1))) >> shift;
}

static NQ_INLINE int8_t nq_clamp8(int64_t v, int8_t lo, int8_t hi)
{
    return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

#if defined(NQ_USE_CONV1D) || defined(NQ_USE_POINTWISE) || defined(NQ_USE_CONV2D) \
    || defined(NQ_USE_DW)
static int8_t nq_wrow[NQ_MAX_ROW];  /* one output channel's weights, decoded */

/* Decode the next `n` weights (one output channel's row) into int8. */
NQ_OWN static void nq_row(const nq_conv_t *p, int n, int8_t *dst, nq_cursor_t *cur)
{
    const uint32_t bits = p->bits;
    int i;
    for (i = 0; i < n; i++) {
        uint32_t v, bit, byte, off, raw;
        if (p->mask) {
            const uint32_t m = cur->m++;
            if (!((p->mask[m >> 3] >> (m & 7u)) & 1u)) {
                dst[i] = 0;
                continue;
            }
        }
        v = cur->v++;
        if (bits == 8u) {
            dst[i] = (int8_t)p->w[v];
            continue;
        }
        bit = v * bits;
        byte = bit >> 3;
        off = bit & 7u;
        raw = (uint32_t)p->w[byte] >> off;
        if (off + bits > 8u)
            raw |= (uint32_t)p->w[byte + 1] << (8u - off);
        raw &= (1u << bits) - 1u;
        dst[i] = (int8_t)((raw & (1u << (bits - 1u))) ? (int32_t)raw - (int32_t)(1u << bits)
                                                       : (int32_t)raw);
    }
}

#if defined(__GNUC__)
__attribute__((always_inline)) /* one copy per kernel: a call per output costs more */
#endif
static inline void nq_store(void *y, int i, int32_t acc, const nq_conv_t *p, int c)
{
    int64_t v = nq_scale(acc, p->mult[c], p->shift[c]);
    if (p->logits) {
        if (v > INT32_MAX) v = INT32_MAX;
        if (v < INT32_MIN) v = INT32_MIN;
        ((int32_t *)y)[i] = (int32_t)v;
    } else {
        ((int8_t *)y)[i] = nq_clamp8(v + p->zp_out, p->act_min, p->act_max);
    }
}
#endif

#ifdef NQ_USE_CONV1D
/* 1-D convolution */
NQ_OWN static void nq_conv1d(const int8_t *x, const int8_t *x2, void *y, const void *layer)
{
    const nq_conv_t *p = (const nq_conv_t *)layer;
    int8_t *w = nq_wrow;
    (void)x2;
    nq_cursor_t cur = {0u, 0u};
    const int n = p->cin * p->k, k = p->k, in_w = p->in_w, zp = p->zp_in;
    int co, l, ci, j;
    for (co = 0; co < p->cout; co++) {
        nq_row(p, n, w, &cur);
        for (l = 0; l < p->out_w; l++) {
            int32_t acc = p->bias[co];
            const int start = l * p->stride - p->pad;
            const int lo = start < 0 ? -start : 0;
            const int hi = start + k > in_w ? in_w - start : k;
            for (ci = 0; ci < p->cin; ci++) {
                const int8_t *xr = x + ci * in_w;
                const int8_t *wr = w + ci * k;
                for (j = lo; j < hi; j++)
                    acc += (int32_t)(xr[start + j] - zp) * wr[j];
            }
            nq_store(y, co * p->out_w + l, acc, p, co);
        }
    }
}
#endif

#ifdef NQ_USE_POINTWISE
/* a linear layer (in_w = out_w = 1) or a pointwise 2-D conv (in_w = out_w = H * W): k = 1,
 * stride 1, no padding */
NQ_OWN static void nq_pointwise(const int8_t *x, const int8_t *x2, void *y, const void *layer)
{
    const nq_conv_t *p = (const nq_conv_t *)layer;
    int8_t *w = nq_wrow;
    (void)x2;
    nq_cursor_t cur = {0u, 0u};
    const int in_w = p->in_w, zp = p->zp_in;
    int co, l, ci;
    for (co = 0; co < p->cout; co++) {
        nq_row(p, p->cin, w, &cur);
        for (l = 0; l < p->out_w; l++) {
            int32_t acc = p->bias[co];
            for (ci = 0; ci < p->cin; ci++)
                acc += (int32_t)(x[ci * in_w + l] - zp) * w[ci];
            nq_store(y, co * p->out_w + l, acc, p, co);
        }
    }
}
#endif

#ifdef NQ_USE_CONV2D
NQ_OWN static void nq_conv2d(const int8_t *x, const int8_t *x2, void *y, const void *layer)
{
    const nq_conv_t *p = (const nq_conv_t *)layer;
    int8_t *w = nq_wrow;
    (void)x2;
    nq_cursor_t cur = {0u, 0u};
    const int k = p->k, in_h = p->in_h, in_w = p->in_w, zp = p->zp_in;
    int co, oy, ox, ci, ky, kx;
    for (co = 0; co < p->cout; co++) {
        nq_row(p, p->cin * k * k, w, &cur);
        for (oy = 0; oy < p->out_h; oy++) {
            for (ox = 0; ox < p->out_w; ox++) {
                const int sx = ox * p->stride - p->pad;
                const int lo = sx < 0 ? -sx : 0, hi = sx + k > in_w ? in_w - sx : k;
                int32_t acc = p->bias[co];
                for (ci = 0; ci < p->cin; ci++) {
                    for (ky = 0; ky < k; ky++) {
                        const int iy = oy * p->stride - p->pad + ky;
                        const int8_t *xr, *wr;
                        if (iy < 0 || iy >= in_h)
                            continue;
                        xr = x + (ci * in_h + iy) * in_w;
                        wr = w + (ci * k + ky) * k;
                        for (kx = lo; kx < hi; kx++)
                            acc += (int32_t)(xr[sx + kx] - zp) * wr[kx];
                    }
                }
                nq_store(y, (co * p->out_h + oy) * p->out_w + ox, acc, p, co);
            }
        }
    }
}
#endif

#ifdef NQ_USE_DW
/* depthwise 2-D convolution: one k x k filter per channel */
NQ_OWN static void nq_dwconv2d(const int8_t *x, const int8_t *x2, void *y, const void *layer)
{
    const nq_conv_t *p = (const nq_conv_t *)layer;
    int8_t *w = nq_wrow;
    (void)x2;
    nq_cursor_t cur = {0u, 0u};
    const int k = p->k, in_h = p->in_h, in_w = p->in_w, zp = p->zp_in;
    int c, oy, ox, ky, kx;
    for (c = 0; c < p->cout; c++) {
        const int8_t *xc = x + c * in_h * in_w;
        nq_row(p, k * k, w, &cur);
        for (oy = 0; oy < p->out_h; oy++) {
            for (ox = 0; ox < p->out_w; ox++) {
                const int sx = ox * p->stride - p->pad;
                const int lo = sx < 0 ? -sx : 0, hi = sx + k > in_w ? in_w - sx : k;
                int32_t acc = p->bias[c];
                for (ky = 0; ky < k; ky++) {
                    const int iy = oy * p->stride - p->pad + ky;
                    const int8_t *xr, *wr;
                    if (iy < 0 || iy >= in_h)
                        continue;
                    xr = xc + iy * in_w;
                    wr = w + ky * k;
                    for (kx = lo; kx < hi; kx++)
                        acc += (int32_t)(xr[sx + kx] - zp) * wr[kx];
                }
                nq_store(y, (c * p->out_h + oy) * p->out_w + ox, acc, p, c);
            }
        }
    }
}
#endif

#ifdef NQ_USE_ADD
typedef struct {
    uint32_t n;
    int16_t zp_a, zp_b, zp_out;
    int32_t mult_a, mult_b;  /* < 2^21: the int32 sum cannot overflow */
    uint8_t shift;
    int8_t act_min, act_max;
} nq_add_t;

/* y = a + b, requantized; y may be a or b (element by element, in place) */
NQ_OWN static void nq_add(const int8_t *a, const int8_t *b, void *out, const void *layer)
{
    const nq_add_t *p = (const nq_add_t *)layer;
    int8_t *y = (int8_t *)out;
    const int32_t round = (int32_t)1 << (p->shift - 1);
    uint32_t i;
    for (i = 0; i < p->n; i++) {
        const int32_t acc = (a[i] - p->zp_a) * p->mult_a + (b[i] - p->zp_b) * p->mult_b + round;
        y[i] = nq_clamp8((int64_t)(acc >> p->shift) + p->zp_out, p->act_min, p->act_max);
    }
}
#endif

#ifdef NQ_USE_MEAN
typedef struct {
    uint16_t channels;
    uint32_t spatial;
    int16_t zp_in, zp_out;
    int32_t mult;
    uint8_t shift;
} nq_mean_t;

/* mean over the spatial positions of each channel */
NQ_OWN static void nq_mean(const int8_t *x, const int8_t *x2, void *out, const void *layer)
{
    const nq_mean_t *p = (const nq_mean_t *)layer;
    int8_t *y = (int8_t *)out;
    (void)x2;
    uint32_t c, i;
    for (c = 0; c < p->channels; c++) {
        int32_t acc = 0;
        for (i = 0; i < p->spatial; i++)
            acc += x[c * p->spatial + i] - p->zp_in;
        y[c] = nq_clamp8(nq_scale(acc, p->mult, p->shift) + p->zp_out, -128, 127);
    }
}
#endif

#ifdef NQ_USE_MAXPOOL
typedef struct {
    uint16_t channels, in_h, in_w, out_h, out_w, k, stride, pad;
    int8_t act_min, act_max;
} nq_maxpool_t;

/* 2-D max pooling: the largest value of each window's positions inside the map (padding never
 * wins); the output keeps the input's scale and zero point */
NQ_OWN static void nq_maxpool(const int8_t *x, const int8_t *x2, void *out, const void *layer)
{
    const nq_maxpool_t *p = (const nq_maxpool_t *)layer;
    int8_t *y = (int8_t *)out;
    (void)x2;
    int c, oy, ox, iy, ix;
    for (c = 0; c < p->channels; c++) {
        const int8_t *xc = x + c * p->in_h * p->in_w;
        for (oy = 0; oy < p->out_h; oy++) {
            const int y0 = oy * p->stride - p->pad, y1 = y0 + p->k;
            for (ox = 0; ox < p->out_w; ox++) {
                const int x0 = ox * p->stride - p->pad, x1 = x0 + p->k;
                int8_t m = -128;
                for (iy = y0 < 0 ? 0 : y0; iy < y1 && iy < p->in_h; iy++)
                    for (ix = x0 < 0 ? 0 : x0; ix < x1 && ix < p->in_w; ix++)
                        if (xc[iy * p->in_w + ix] > m)
                            m = xc[iy * p->in_w + ix];
                *y++ = nq_clamp8(m, p->act_min, p->act_max);
            }
        }
    }
}
#endif

/* raw float32 samples -> int8: u = x * a; u = u + c (c holds the zero point + 256.5);
 * clamp to [0, 511] (NaN: 0); truncate; - 256 */
NQ_OWN static void nq_input(const float *x, int8_t *y, const nq_input_t *p)
{
    const float a = p->a, c = p->c;
    uint32_t i;
    for (i = 0; i < p->n; i++) {
        float u = x[i] * a;
        u = u + c;
        if (!(u > 0.0f)) u = 0.0f;
        if (u > 511.0f) u = 511.0f;
        y[i] = nq_clamp8((int64_t)(int32_t)u - 256, -128, 127);
    }
}

/* the model: quantize the input, run the steps, write the logits; returns the class */
NQ_OWN static int nq_predict(const nq_input_t *in, const nq_step_t *s, const float *x,
                             int32_t *out, int8_t *arena)
{
    uint32_t i, best = 0;
    nq_input(x, arena + in->y, in);
    for (; s->run; s++)
        s->run(arena + s->x, arena + s->x2,
               s->y == NQ_LOGITS ? (void *)out : (void *)(arena + s->y), s->layer);
    for (i = 1; i < in->classes; i++)
        if (out[i] > out[best])
            best = i;
    return (int)best;
}
