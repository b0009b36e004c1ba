"""The optimizer update through the two-pass CPU kernel (layers/adamw_cpu.cc): the same AdamW, with
clipping, weight-decay mask, frozen kinds and the non-finite guard, as optax's chain from
`build_optimizer`, on that chain's own state, so checkpoints do not change (tests/test_adamw_kernel.py).

optim.update_impl picks it: "auto" where it runs (float32 parameters on one CPU device, the
kernel library built), "cpu_kernel" to insist, "optax" never.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerjax.config import OptimConfig
from layerjax.layers import cpu_kernels
from layerjax.train.optimizer import decay_mask, kinds_mask


def blocker(trainable) -> str | None:
    """None when the kernel can update these parameters here, else why not."""
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(trainable)}
    if dtypes - {jnp.dtype(jnp.float32)}:
        return f"it updates float32 parameters, these are {sorted(map(str, dtypes))}"
    return cpu_kernels.blocker("adamw", jnp.float32)


def use_kernel(o: OptimConfig, trainable) -> bool:
    """Whether the train step's update runs the kernel (optim.update_impl)."""
    if o.update_impl == "optax":
        return False
    reason = blocker(trainable)
    if reason is not None and o.update_impl == "cpu_kernel":
        raise ValueError(f"optim.update_impl='cpu_kernel' cannot run here: {reason}; "
                         "use optim.update_impl=auto (the kernel where it runs, else optax)")
    return reason is None


def _call(target: str, results, grad, param, mu, nu, step, rates: dict, **aliases):
    return jax.ffi.ffi_call(target, results, vmap_method="sequential", **aliases)(
        grad, param, mu, nu, step, **{k: np.float32(v) for k, v in rates.items()})


def apply_adamw(o: OptimConfig, schedule: optax.Schedule, frozen_kinds: tuple[str, ...], trainable,
                grads, opt_state, loss: jax.Array):
    """(new parameters, new optimizer state, gradient norm, update norm, finite): one AdamW step
    on `build_optimizer`'s state. The update applies only when the loss, the gradient norm and
    the update norm are all finite; otherwise parameters and state stay as they were."""
    cpu_kernels.require("adamw")
    mu, nu = optax.tree_utils.tree_get(opt_state, "mu"), optax.tree_utils.tree_get(opt_state, "nu")
    # The chain counts applied updates twice (Adam's bias correction, the schedule): both alike.
    count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
    grad_norm = optax.global_norm(grads)
    next_count = optax.safe_increment(count)
    lr = schedule(count)
    coefficients = lambda rate, finite: jnp.stack([
        grad_norm, jnp.float32(o.clip_norm), 1 - jnp.float32(o.b1) ** next_count,
        1 - jnp.float32(o.b2) ** next_count, rate, finite]).astype(jnp.float32)
    decays = decay_mask(trainable, (*o.no_decay, *frozen_kinds))
    frozen = kinds_mask(trainable, frozen_kinds) if frozen_kinds else jax.tree.map(lambda _: False, trainable)
    # A frozen kind's moments still follow its gradient (as in the chain); its update is zero.
    rates_of = lambda decay: {"b1": o.b1, "b2": o.b2, "eps": o.eps, "weight_decay": o.weight_decay if decay else 0.0}
    # Each pass's coefficients, for live and for frozen parameters (learning rate 0); the norm
    # pass runs before `finite` is known, and the apply pass writes only when it is true.
    steps = lambda finite: {False: coefficients(lr, finite), True: coefficients(0.0, finite)}
    norm_steps = steps(1.0)

    def squares(g, p, m, v, decay, is_frozen):
        return _call("layerjax_adamw_norm", jax.ShapeDtypeStruct((), jnp.float32), g, p, m, v,
                     norm_steps[is_frozen], rates_of(decay))

    update_norm = jnp.sqrt(sum(jax.tree.leaves(jax.tree.map(squares, grads, trainable, mu, nu, decays, frozen))))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    apply_steps = steps(finite.astype(jnp.float32))

    def apply(g, p, m, v, decay, is_frozen):
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (p, m, v))
        return _call("layerjax_adamw_apply", shapes, g, p, m, v, apply_steps[is_frozen], rates_of(decay),
                     input_output_aliases={1: 0, 2: 1, 3: 2})

    out = jax.tree.map(apply, grads, trainable, mu, nu, decays, frozen)
    part = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=lambda t: isinstance(t, tuple))
    new_state = optax.tree_utils.tree_set(opt_state, mu=part(1), nu=part(2),
                                          count=jnp.where(finite, next_count, count))
    return part(0), new_state, grad_norm, update_norm, finite
