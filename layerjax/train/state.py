"""Everything the config determines before training: the mesh, the abstract model, shardings,
the optimizer, and the initial (sharded) train state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from layerjax import sharding
from layerjax.config import Config, ConfigError
from layerjax.model.plan import Plan, build_plan
from layerjax.model.transformer import Transformer
from layerjax.train.optimizer import build_optimizer, frozen_kinds
from layerjax.train.step import TrainState, join_trainable, make_train_step, split_trainable


def resolve_vocab(cfg: Config, data_vocab: int) -> Config:
    """model.vocab_size=0 takes the data's vocabulary; an explicit one must be large enough."""
    v = cfg.model.vocab_size
    if v == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data_vocab))
    if v < data_vocab:
        raise ConfigError(f"model.vocab_size={v} is smaller than the data's vocabulary ({data_vocab}); "
                          "raise it or set model.vocab_size=0 to take the data's")
    return cfg


@dataclasses.dataclass
class Setup:
    cfg: Config
    plan: Plan
    mesh: Mesh
    rules: dict
    graphdef: nnx.GraphDef
    abstract_state: TrainState  # shapes and dtypes only
    state_shardings: TrainState  # a prefix tree of NamedShardings
    batch_sharding: NamedSharding
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_state.params))

    @property
    def num_trainable(self) -> int:
        """Parameters that get gradients: all of them, or a fine-tune's adapters and routers."""
        return sum(x.size for x in jax.tree.leaves(split_trainable(self.abstract_state.params, self.cfg.model)[0]))


def _make_state(cfg: Config, plan: Plan, tx: optax.GradientTransformation, seed: int) -> TrainState:
    model = Transformer(cfg.model, nnx.Rngs(params=seed), plan)
    # Drawn in float32, stored in model.param_dtype: the abstract state, the shardings, the
    # optimizer state and checkpoints all follow from this one cast.
    # Adapters always train in float32; a frozen base may be held in bfloat16.
    param_dtype = jnp.dtype(cfg.model.param_dtype)
    trainable, frozen = split_trainable(nnx.state(model, nnx.Param), cfg.model)
    if frozen is None:
        trainable = jax.tree.map(lambda p: p.astype(param_dtype), trainable)
    else:
        frozen = jax.tree.map(lambda p: p.astype(param_dtype), frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=join_trainable(trainable, frozen),
                      opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(seed + 1)))


def build_setup(cfg: Config) -> Setup:
    """Needs cfg.model.vocab_size resolved (see resolve_vocab)."""
    assert cfg.model.vocab_size > 0, "resolve model.vocab_size before build_setup"
    plan = build_plan(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps, frozen_kinds(cfg))
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(params=0), plan))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    abstract_state = jax.eval_shape(lambda: _make_state(cfg, plan, tx, 0))
    batch_shards = 1
    for axis in rules["batch"]:
        batch_shards *= mesh.shape[axis]
    microbatch = cfg.data.batch_size // cfg.train.microbatches
    if microbatch % batch_shards:
        raise ConfigError(
            f"the batch is split over {batch_shards} devices, but a microbatch has {microbatch} rows "
            f"(data.batch_size={cfg.data.batch_size} / train.microbatches={cfg.train.microbatches}); "
            f"make it a multiple of {batch_shards} or set mesh.num_devices")
    return Setup(cfg, plan, mesh, rules, graphdef, abstract_state,
                 sharding.tree_shardings(abstract_state, rules, mesh),
                 sharding.batch_sharding(rules, mesh), tx, schedule)


def init_state(setup: Setup, seed: int) -> TrainState:
    """Initialises parameters directly into their shardings (no full copy on one device)."""
    make = jax.jit(lambda: _make_state(setup.cfg, setup.plan, setup.tx, seed),
                   out_shardings=setup.state_shardings)
    with setup.mesh:
        return make()


def state_from_params(setup: Setup, params: nnx.State, seed: int, step: int = 0) -> TrainState:
    """A train state around given (already sharded) parameters: a fresh optimizer state, for
    training that starts from imported or pretrained weights."""
    make = jax.jit(lambda p: TrainState(step=jnp.asarray(step, jnp.int32), params=p,
                                        opt_state=setup.tx.init(split_trainable(p, setup.cfg.model)[0]),
                                        rng=jax.random.key_data(jax.random.key(seed + 1))),
                   out_shardings=setup.state_shardings)
    with setup.mesh:
        return make(params)


def jit_train_step(setup: Setup):
    """The train step, jitted with the state and batch shardings, activation constraints traced
    in, and the state donated."""
    step = sharding.with_activation_sharding(
        make_train_step(setup.cfg, setup.graphdef, setup.tx, setup.schedule), setup.mesh, setup.rules)
    return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, None), donate_argnums=0)


def jit_params_step(setup: Setup, fn):
    """A (params, batch) -> outputs function (eval, diagnostics), jitted like the train step."""
    return jax.jit(sharding.with_activation_sharding(fn, setup.mesh, setup.rules),
                   in_shardings=(setup.state_shardings.params, setup.batch_sharding))
