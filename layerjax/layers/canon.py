"""Canon layers (Physics of Language Models, Part 4.1): a causal depthwise convolution over the
sequence that mixes each token with its K-1 predecessors,

    h'_t = h_t + sum_{i=0}^{K-1} w_i * h_{t-i}      (w_i per channel; zero left padding)

with the residual term h_t switchable, and an optional bias and SiLU on the convolution. A token
never mixes with tokens of another document in a packed row (segment ids). During decoding the
layer keeps the last K-1 inputs as its state, so one token at a time equals the full forward.

model.canon_impl picks the computation of full sequences: the shifted adds below ("xla"), or
one-pass C++ kernels on a one-device CPU computation ("cpu_kernel", canon_kernel.py), whose
backward pass reads each array once where XLA:CPU's reads them about eight times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers import canon_kernel


class Canon(nnx.Module):
    def __init__(self, dim: int, kernel: int, *, residual: bool, use_bias: bool, activation: bool,
                 axis_name: str | None, rngs: nnx.Rngs, trainable: bool = True, impl: str = "auto"):
        self.kernel, self.residual, self.activation = kernel, residual, activation
        self.impl = impl  # model.canon_impl: "xla", "cpu_kernel" or "auto"
        # Frozen canon weights (the paper's random-canon ablation) get no gradient here, and the
        # optimizer leaves them untouched (train.optimizer: frozen parameter kinds).
        self.trainable = trainable
        # PyTorch's Conv1d default for a depthwise conv: uniform(+-1/sqrt(fan_in)), fan_in = K.
        bound = kernel ** -0.5
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        self.weight = nnx.Param(uniform((kernel, dim)), axes=(None, axis_name))
        self.bias = nnx.Param(uniform((dim,)), axes=(axis_name,)) if use_bias else None

    def __call__(self, h_BxLxC: jax.Array, segment_ids_BxL: jax.Array | None = None,
                 state_BxSxC: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """Returns (output, new state). state: the previous K-1 inputs (decoding), else None."""
        fixed = (lambda a: a) if self.trainable else jax.lax.stop_gradient
        if state_BxSxC is None and self._use_kernel(h_BxLxC):
            return self._kernel_forward(h_BxLxC, segment_ids_BxL, fixed), None
        k, length = self.kernel, h_BxLxC.shape[1]
        if state_BxSxC is not None:
            padded = jnp.concatenate([state_BxSxC.astype(h_BxLxC.dtype), h_BxLxC], axis=1)
        else:
            padded = jnp.pad(h_BxLxC, ((0, 0), (k - 1, 0), (0, 0)))
        w = fixed(self.weight[...]).astype(h_BxLxC.dtype)
        if segment_ids_BxL is not None and state_BxSxC is None:
            seg_padded = jnp.pad(segment_ids_BxL, ((0, 0), (k - 1, 0)), constant_values=-1)
        conv = jnp.zeros_like(h_BxLxC)
        for i in range(k):  # tap i reads the token i steps back
            tap = padded[:, k - 1 - i: k - 1 - i + length]
            if segment_ids_BxL is not None and state_BxSxC is None:
                same_doc = seg_padded[:, k - 1 - i: k - 1 - i + length] == segment_ids_BxL
                tap = jnp.where(same_doc[..., None], tap, 0)
            conv = conv + w[i] * tap
        if self.bias is not None:
            conv = conv + fixed(self.bias[...]).astype(conv.dtype)
        if self.activation:
            conv = jax.nn.silu(conv)
        out = h_BxLxC + conv if self.residual else conv
        new_state = padded[:, padded.shape[1] - (k - 1):] if state_BxSxC is not None else None
        return out, new_state

    def _use_kernel(self, h_BxLxC: jax.Array) -> bool:
        """Whether this call runs the one-pass CPU kernel (decoding steps never do: one token)."""
        if self.impl == "xla":
            return False
        reason = canon_kernel.blocker(h_BxLxC, self.kernel)
        if reason is not None and self.impl == "cpu_kernel":
            raise ValueError(f"model.canon_impl='cpu_kernel' cannot run here: {reason}; "
                             "use model.canon_impl=auto (the kernel where it runs, else xla)")
        return reason is None

    def _kernel_forward(self, h_BxLxC, segment_ids_BxL, fixed) -> jax.Array:
        w = fixed(self.weight[...]).astype(h_BxLxC.dtype)
        # The kernel adds the residual itself unless a SiLU comes between it and the convolution.
        fuse_residual = self.residual and not self.activation
        conv = canon_kernel.causal_conv(h_BxLxC, w, segment_ids_BxL, fuse_residual)
        if self.bias is not None:
            conv = conv + fixed(self.bias[...]).astype(conv.dtype)
        if self.activation:
            conv = jax.nn.silu(conv)
        return h_BxLxC + conv if self.residual and not fuse_residual else conv


def canon_widths(m) -> dict[str, int]:
    """Channels at each canon position for a model config (m: ModelConfig)."""
    from layerjax.config import d_ff, head_dim, kv_heads
    from layerjax.layers.mlp import GATED_ACTIVATIONS  # imported here: mlp imports this module

    return {"A": m.d_model, "B": (m.num_heads + 2 * kv_heads(m)) * head_dim(m), "C": m.d_model,
            "D": d_ff(m) * (2 if m.mlp in GATED_ACTIVATIONS else 1)}


def make_canon(m, dim: int, axis_name: str | None, rngs: nnx.Rngs) -> Canon:
    """A canon layer of width `dim` with the model config's canon settings."""
    return Canon(dim, m.canon_kernel, residual=m.canon_residual, use_bias=m.canon_bias,
                 activation=m.canon_activation, axis_name=axis_name, rngs=rngs, trainable=m.canon_trainable,
                 impl=m.canon_impl)
