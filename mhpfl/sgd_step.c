/* SGD's momentum step (after the first one) in one pass over memory, with the roundings of the
 * four elementwise passes torch.optim.SGD runs (weight decay 0 or not, dampening 0, no Nesterov):
 *     d = grad.add(param, alpha=wd)   (a fused multiply-add: one rounding; skipped when wd == 0)
 *     buf.mul_(momentum)              (rounded)
 *     buf.add_(d)                     (rounded)
 *     param.add_(buf, alpha=-lr)      (a fused multiply-add)
 * The gradient is read, not written. Compiled with -ffp-contract=off, so each operation is
 * rounded as written; mhpfl/fused_sgd.py checks the result against torch's passes before use. */
#include <math.h>
#include <stddef.h>

void mhpfl_sgd_momentum(float *restrict param, const float *restrict grad, float *restrict buf,
                        ptrdiff_t n, int decay, float wd, float momentum, float neg_lr)
{
    if (decay) {
        for (ptrdiff_t i = 0; i < n; i++) {
            float b = buf[i] * momentum + fmaf(param[i], wd, grad[i]);
            buf[i] = b;
            param[i] = fmaf(b, neg_lr, param[i]);
        }
    } else {
        for (ptrdiff_t i = 0; i < n; i++) {
            float b = buf[i] * momentum + grad[i];
            buf[i] = b;
            param[i] = fmaf(b, neg_lr, param[i]);
        }
    }
}
