"""The feed-forward sublayer: gated (SwiGLU, GeGLU) or plain GELU.

The gated kinds keep their gate and up projections as two [D, F] parameters (so they shard and
import like any weight) but run them as one [D, 2F] matmul. All matmuls go through `dense` (tokens
flattened to one axis), which keeps XLA:CPU from transposing activations in the backward pass.
"""

from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers.activations import gelu_tanh, silu
from layerjax.layers.canon import Canon
from layerjax.layers.params import const_param, dense, normal_param

# Gated kinds: W_out (act(x W_gate) * (x W_up)), differing only in the gate's activation.
GATED_ACTIVATIONS = {
    "swiglu": silu,
    "geglu": gelu_tanh,  # Gemma's gelu_pytorch_tanh
}


class MLP(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, biases: Collection[str], init_std: float,
                 rngs: nnx.Rngs, canon_d: Canon | None = None, adapters: dict | None = None, router=None,
                 matmul: str = "xla"):
        """kind: a key of GATED_ACTIVATIONS, or "gelu". biases: which of "up" (the input side: gate
        and up, or w_in) and "down" (the output) have a bias. matmul: `dense`'s impl."""
        self.kind = kind
        self.matmul = matmul
        # Low-rank adapters by projection ("gate", "up": the input side, "down": the output), and
        # for MoLE one router shared by them (else each mixture routes for itself).
        self.adapters = nnx.Dict(adapters or {})
        self.router = router
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
                 canon_state: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 relax: dict | None = None) -> tuple[jax.Array, jax.Array | None]:
        """Returns the output and, when decoding with canon position D, its new state.
        dropout_key: the adapters' dropout (training only). relax: a shared block's per-depth
        relaxation LoRA by projection name, added like the adapters."""
        dtype = x_BxLxD.dtype
        if self.gated:
            w_in = jnp.concatenate([self.w_gate[...], self.w_up[...]], axis=1)
        else:
            w_in = self.w_in[...]
        h_BxLxF = dense(x_BxLxD, w_in, impl=self.matmul)
        if self.b_in is not None:
            h_BxLxF = h_BxLxF + self.b_in[...].astype(dtype)
        shared = None if self.router is None else self.router(x_BxLxD.reshape(-1, x_BxLxD.shape[-1]))
        relax = relax or {}
        delta = lambda name, h: self._delta(name, h, dropout_key, shared, relax)
        adapted = set(self.adapters) | set(relax)
        if self.gated and {"gate", "up"} & adapted:  # the input side is [gate | up]
            h_BxLxF = h_BxLxF + jnp.concatenate([delta("gate", x_BxLxD), delta("up", x_BxLxD)], axis=-1)
        elif "up" in adapted:
            h_BxLxF = h_BxLxF + delta("up", x_BxLxD)
        if self.canon_d is not None:
            h_BxLxF, canon_state = self.canon_d(h_BxLxF, segment_ids_BxL, canon_state)
        if self.gated:
            gate, up = jnp.split(h_BxLxF, 2, axis=-1)
            h_BxLxF = GATED_ACTIVATIONS[self.kind](gate) * up
        else:
            h_BxLxF = gelu_tanh(h_BxLxF)
        out_BxLxD = dense(h_BxLxF, self.w_out[...], impl=self.matmul)
        if self.b_out is not None:
            out_BxLxD = out_BxLxD + self.b_out[...].astype(dtype)
        if "down" in adapted:
            out_BxLxD = out_BxLxD + delta("down", h_BxLxF)
        return out_BxLxD, canon_state

    def _delta(self, name: str, adapter_in: jax.Array, dropout_key, shared_weights, relax: dict) -> jax.Array:
        """The named adapter's plus relaxation's delta, zeros of the output width where neither exists."""
        width = self.w_out.shape[1] if name == "down" else self.w_out.shape[0]
        delta = jnp.zeros((*adapter_in.shape[:-1], width), adapter_in.dtype)
        if name in relax:
            delta = delta + relax[name](adapter_in)
        if name in self.adapters:
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, 4 + ("gate", "up", "down").index(name))
            delta = delta + self.adapters[name](adapter_in, key, shared_weights)
        return delta
