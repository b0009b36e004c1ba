"""Autoregressive sampling with a KV cache: one prefill pass over the prompt, then one jitted
call per new token. Greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def filter_logits(logits_BxV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Scales by 1/temperature and sets logits outside the top-k / top-p set to -inf."""
    logits = logits_BxV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def choose(logits_BxV, rng, temperature: float, top_k: int, top_p: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1)
    return jax.random.categorical(rng, filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 9))
def _decode_step(graphdef, params, cache, token_B, index, temperature, top_k, top_p, rng, exit_depth=None):
    model = nnx.merge(graphdef, params)
    logits, cache = model(token_B[:, None], cache=cache, cache_index=index, exit_depth=exit_depth)
    return choose(logits[:, -1], rng, temperature, top_k, top_p), logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 8))
def _prefill(graphdef, params, cache, prompt_BxP, temperature, top_k, top_p, rng, exit_depth=None):
    model = nnx.merge(graphdef, params)
    logits, cache = model(prompt_BxP, cache=cache, cache_index=jnp.int32(0), exit_depth=exit_depth)
    return choose(logits[:, -1], rng, temperature, top_k, top_p), logits[:, -1], cache


def generate(graphdef: nnx.GraphDef, params: nnx.State, prompt_BxP: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, exit_depth: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns (tokens [B, P + n], logits of each generated token [B, n, V]); stops early once
    every row has produced eos_id. exit_depth: decode from the output after that many layers
    (an early exit; the deeper layers never run)."""
    batch, prompt_len = prompt_BxP.shape
    model = nnx.merge(graphdef, params)
    max_len = prompt_len + max_new_tokens
    if max_len > model.config.max_seq_len and model.config.positions == "learned":
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds model.max_seq_len={model.config.max_seq_len}")
    cache = model.init_cache(batch, max_len, jnp.dtype(model.config.dtype))
    rngs = jax.random.split(jax.random.key(seed), max_new_tokens)
    token, logits, cache = _prefill(graphdef, params, cache, prompt_BxP, temperature, top_k, top_p, rngs[0],
                                    exit_depth)
    out_tokens, out_logits = [token], [logits]
    done = jnp.zeros(batch, bool) if eos_id is None else token == eos_id
    for i in range(1, max_new_tokens):
        if eos_id is not None and bool(done.all()):
            break
        token, logits, cache = _decode_step(graphdef, params, cache, token, jnp.int32(prompt_len + i - 1),
                                            temperature, top_k, top_p, rngs[i], exit_depth)
        out_tokens.append(token)
        out_logits.append(logits)
        if eos_id is not None:
            done = done | (token == eos_id)
    return jnp.concatenate([prompt_BxP, jnp.stack(out_tokens, 1)], axis=1), jnp.stack(out_logits, 1)
