"""layerjax: a JAX/Flax NNX training framework for layer-aware transformers."""

__version__ = "0.1.0"
