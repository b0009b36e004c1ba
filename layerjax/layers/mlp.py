"""The feed-forward sublayer: gated (SwiGLU, GeGLU) or plain GELU.

The gated kinds keep their gate and up projections as two [D, F] parameters (so they shard and
import like any weight) but run them as one [D, 2F] matmul. All matmuls go through `dense` (tokens
flattened to one axis), which keeps XLA:CPU from transposing activations in the backward pass.
"""

from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers.canon import Canon
from layerjax.layers.params import const_param, dense, normal_param

# Gated kinds: W_out (act(x W_gate) * (x W_up)), differing only in the gate's activation.
GATED_ACTIVATIONS = {
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),  # Gemma's gelu_pytorch_tanh
}


class MLP(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, biases: Collection[str], init_std: float,
                 rngs: nnx.Rngs, canon_d: Canon | None = None):
        """kind: a key of GATED_ACTIVATIONS, or "gelu". biases: which of "up" (the input side: gate
        and up, or w_in) and "down" (the output) have a bias."""
        self.kind = kind
        self.gated = kind in GATED_ACTIVATIONS
        self.canon_d = canon_d  # canon position D: on the hidden pre-activation (gate and up if gated)
        if self.gated:
            self.w_gate = normal_param(rngs, (d_model, d_ff), ("embed", "mlp"), init_std)
            self.w_up = normal_param(rngs, (d_model, d_ff), ("embed", "mlp"), init_std)
        else:
            self.w_in = normal_param(rngs, (d_model, d_ff), ("embed", "mlp"), init_std)
        self.w_out = normal_param(rngs, (d_ff, d_model), ("mlp", "embed"), init_std)
        width = 2 if self.gated else 1
        self.b_in = const_param((width * d_ff,), ("mlp",), 0.0) if "up" in biases else None
        self.b_out = const_param((d_model,), ("embed",), 0.0) if "down" in biases else None

    def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array | None = None,
                 canon_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """Returns the output and, when decoding with canon position D, its new state."""
        dtype = x_BxLxD.dtype
        if self.gated:
            w_in = jnp.concatenate([self.w_gate[...], self.w_up[...]], axis=1)
        else:
            w_in = self.w_in[...]
        h_BxLxF = dense(x_BxLxD, w_in)
        if self.b_in is not None:
            h_BxLxF = h_BxLxF + self.b_in[...].astype(dtype)
        if self.canon_d is not None:
            h_BxLxF, canon_state = self.canon_d(h_BxLxF, segment_ids_BxL, canon_state)
        if self.gated:
            gate, up = jnp.split(h_BxLxF, 2, axis=-1)
            h_BxLxF = GATED_ACTIVATIONS[self.kind](gate) * up
        else:
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
        out_BxLxD = dense(h_BxLxF, self.w_out[...])
        if self.b_out is not None:
            out_BxLxD = out_BxLxD + self.b_out[...].astype(dtype)
        return out_BxLxD, canon_state
