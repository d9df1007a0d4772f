/* Fused CPU kernels for the elementwise work of a Llama block and its loss, forward and backward: one pass over
 * memory where eager PyTorch makes 4-8 (RMSNorm, RoPE, the SwiGLU product, cross-entropy). Built and loaded by
 * cakelm/kernels.py (gcc -O3 -march=native -fopenmp, called through ctypes); the plain PyTorch code in
 * cakelm/model.py and cakelm/losses.py is the reference they are tested against (tests/test_kernels.py). Every array is contiguous float32; sizes are int64. OpenMP threads:
 * `nt`, passed from torch.get_num_threads(); the library shares torch's libgomp (same soname, already loaded).
 * No -ffast-math: the products and sums round as PyTorch's do, so RoPE is bit for bit PyTorch's. */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's vector expf (libmvec), which gcc otherwise uses only under -ffast-math: SiLU vectorises */
float expf(float) __attribute__((simd("notinbranch")));
#endif

/* Work below this many floats runs on one thread: an OpenMP fork costs microseconds (decoding one token). */
#define SERIAL_BELOW 32768

/* ---- RMSNorm: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps) per row. x, y: (n, c); w: (c); r: (n) saved. */
void rms_norm_fwd(const float *x, const float *w, float *y, float *r, int64_t n, int64_t c, float eps, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (n * c >= SERIAL_BELOW)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * c;
        float *yi = y + i * c;
        float ss = 0.f;
        #pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < c; j++) ss += xi[j] * xi[j];
        float ri = 1.f / sqrtf(ss / (float)c + eps);
        r[i] = ri;
        #pragma omp simd
        for (int64_t j = 0; j < c; j++) yi[j] = xi[j] * ri * w[j];
    }
}

/* dx = r * (g*w - xhat * mean(g*w*xhat)), xhat = x*r (the normalisation's Jacobian; RMSNorm has no mean term).
 * dw = sum over rows of g * xhat, as `nb` partial sums over fixed blocks of rows, dwp: (nb, c), which the caller
 * adds up: the same numbers whatever the thread count. */
void rms_norm_bwd(const float *g, const float *x, const float *w, const float *r, float *dx, float *dwp,
                  int64_t n, int64_t c, int64_t nb, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (n * c >= SERIAL_BELOW)
    for (int64_t b = 0; b < nb; b++) {
        float *dwb = dwp + b * c;
        for (int64_t j = 0; j < c; j++) dwb[j] = 0.f;
        for (int64_t i = n * b / nb; i < n * (b + 1) / nb; i++) {
            const float *gi = g + i * c, *xi = x + i * c;
            float *dxi = dx + i * c;
            float ri = r[i], dot = 0.f;
            #pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < c; j++) dot += gi[j] * w[j] * xi[j];
            dot = dot * ri / (float)c;  /* mean(g*w*xhat) */
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) {
                float xh = xi[j] * ri;
                dwb[j] += gi[j] * xh;
                dxi[j] = ri * (gi[j] * w[j] - xh * dot);
            }
        }
    }
}

/* ---- RoPE (model.apply_rope): y[j] = x[j] cos[j] + x[j'] sin[j], j' = (j + D/2) mod D, with the signed sin
 * table of model.rope_cache; `adjoint` != 0 gives the backward, dx[j] = dy[j] cos[j] + dy[j'] sin[j'] (the
 * rotation by minus the angle: the partner's sin, whose sign is the other). x, y: (B, T, H, D), the projection's
 * layout; attention reads y through a transposed view, as nanoGPT's q and k, so the flash kernel's output and
 * gradients come back in that layout too and the transposes around attention copy nothing. Position (b, t)'s H
 * heads are read at in + (b*T + t)*ldi and written at out + (b*T + t)*ldo: ldi = ldo = H*D for separate arrays;
 * (H + 2 KV)*D for q's or k's columns of one packed q/k/v product (model.Attention in training), read there by
 * the forward (ldi) and written there by the backward (ldo). cos, sin: (T, D) rows, at cos + b*cbs + t*D
 * (cbs = 0: one table for the batch; T*D: a table per row, packed sequences). rope_heads does one position's H
 * heads. */
static inline void rope_heads(const float *x, const float *c, const float *s, float *y, int64_t H, int64_t D,
                              const int adjoint) {
    const int64_t h2 = D / 2, o = adjoint ? h2 : 0;  /* where sin is read, relative to j, in the first half */
    for (int64_t h = 0; h < H; h++, x += D, y += D) {
        #pragma omp simd
        for (int64_t j = 0; j < h2; j++) y[j] = x[j] * c[j] + x[j + h2] * s[j + o];
        #pragma omp simd
        for (int64_t j = h2; j < D; j++) y[j] = x[j] * c[j] + x[j - h2] * s[j - o];
    }
}

/* The rotation, and its adjoint for the backward; each passes `adjoint` as a constant, so each compiles its own
 * loops (a runtime flag measured 20-40% slower). */
void rope_fwd(const float *x, const float *cos, const float *sin, float *y, int64_t B, int64_t T, int64_t H,
              int64_t D, int64_t ldi, int64_t ldo, int64_t cbs, int nt) {
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nt) if (B * T * H * D >= SERIAL_BELOW)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            rope_heads(x + (b * T + t) * ldi, cos + b * cbs + t * D, sin + b * cbs + t * D,
                       y + (b * T + t) * ldo, H, D, 0);
}

void rope_bwd(const float *dy, const float *cos, const float *sin, float *dx, int64_t B, int64_t T, int64_t H,
              int64_t D, int64_t ldi, int64_t ldo, int64_t cbs, int nt) {
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nt) if (B * T * H * D >= SERIAL_BELOW)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            rope_heads(dy + (b * T + t) * ldi, cos + b * cbs + t * D, sin + b * cbs + t * D,
                       dx + (b * T + t) * ldo, H, D, 1);
}

/* ---- SwiGLU's product: h = silu(a) * u, silu(a) = a * sigmoid(a), over `rows` rows of f values. a and u are read
 * at row stride ld: f for two separate (rows, f) arrays, 2f for the halves of one packed (rows, 2f) product
 * [a | u], as model.MLP makes it when training (one matrix product for gate and up). h: (rows, f). */
void swiglu_fwd(const float *a, const float *u, int64_t ld, float *h, int64_t rows, int64_t f, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (rows * f >= SERIAL_BELOW)
    for (int64_t r = 0; r < rows; r++) {
        const float *ar = a + r * ld, *ur = u + r * ld;
        float *hr = h + r * f;
        #pragma omp simd
        for (int64_t i = 0; i < f; i++) hr[i] = ar[i] / (1.f + expf(-ar[i])) * ur[i];
    }
}

/* da = g * u * sigmoid(a) * (1 + a * (1 - sigmoid(a))), du = g * silu(a); g: (rows, f); da and du are written at
 * row stride ld as a and u are read (packed: the product's gradient in one (rows, 2f) array). */
void swiglu_bwd(const float *g, const float *a, const float *u, float *da, float *du, int64_t ld, int64_t rows,
                int64_t f, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (rows * f >= SERIAL_BELOW)
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = g + r * f, *ar = a + r * ld, *ur = u + r * ld;
        float *dar = da + r * ld, *dur = du + r * ld;
        #pragma omp simd
        for (int64_t i = 0; i < f; i++) {
            float sg = 1.f / (1.f + expf(-ar[i]));
            dur[i] = gr[i] * ar[i] * sg;
            dar[i] = gr[i] * ur[i] * sg * (1.f + ar[i] * (1.f - sg));
        }
    }
}

/* ---- Cross-entropy over a vocabulary (losses.token_nll): per row, lse = log(sum(exp(x))) (with its max taken out
 * first) and loss = lse - x[t], 0 where t == ignore. x: (n, v) logits; t: (n) targets, each ignore or in [0, v)
 * (the caller checks); loss, lse: (n). The backward writes the logits' gradient in one pass,
 * dx = g * (softmax(x) - onehot(t)), where eager PyTorch keeps a log-softmax copy, fills a zero tensor, scatters
 * into it and reads both back. */
void cross_entropy_fwd(const float *x, const int64_t *t, float *loss, float *lse, int64_t n, int64_t v,
                       int64_t ignore, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (n * v >= SERIAL_BELOW)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * v;
        float m = -INFINITY, s = 0.f;
        #pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < v; j++) m = xi[j] > m ? xi[j] : m;
        #pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < v; j++) s += expf(xi[j] - m);
        float l = m + logf(s);
        lse[i] = l;
        loss[i] = t[i] == ignore ? 0.f : l - xi[t[i]];
    }
}

void cross_entropy_bwd(const float *g, const float *x, const int64_t *t, const float *lse, float *dx, int64_t n,
                       int64_t v, int64_t ignore, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (n * v >= SERIAL_BELOW)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * v;
        float *dxi = dx + i * v;
        if (t[i] == ignore) {
            for (int64_t j = 0; j < v; j++) dxi[j] = 0.f;
            continue;
        }
        float gi = g[i], l = lse[i];
        #pragma omp simd
        for (int64_t j = 0; j < v; j++) dxi[j] = gi * expf(xi[j] - l);
        dxi[t[i]] -= gi;
    }
}
