"""Sharding: equal losses on every mesh and preset, two processes == one, checkpoints restore
under another mesh, golden PartitionSpecs per preset, and clear errors for bad meshes."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import FAST_COMPILE, TINY_RUN
from layerjax import distributed, sharding
from layerjax.config import ConfigError, load_config
from layerjax.train.checkpoint import Checkpointer
from layerjax.train.state import build_setup, init_state, jit_train_step
from multiprocess_worker import fixed_batches, step_losses

TESTS = pathlib.Path(__file__).resolve().parent
GOLDEN = TESTS / "golden" / "partition_specs.txt"
# Small, but every dimension divides 8 devices and 2-way tensor parallelism (4 heads, 2 kv heads).
MODEL = ["model.vocab_size=64", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.max_seq_len=16", "data.seq_len=16", "data.batch_size=8"]
MESHES = {  # name -> overrides; all but "1 device" use the 8 simulated devices
    "1 device": ["mesh.num_devices=1"],
    "dp=8": ["mesh.rules=dp"],
    "fsdp=8": ["mesh.rules=fsdp"],
    "fsdp=4 x tensor=2": ["mesh.rules=fsdp_tp", "mesh.shape.tensor=2"],
    "data=4 x tensor=2 (tp)": ["mesh.rules=tp", "mesh.shape=data:-1,tensor:2"],
    "fsdp_tp + 2 microbatches + remat": ["mesh.rules=fsdp_tp", "mesh.shape.tensor=2", "train.microbatches=2",
                                         "model.remat=full", "model.canon=ABCD"],
    "fsdp=4 + 2 microbatches + remat": ["mesh.rules=fsdp", "mesh.num_devices=4", "train.microbatches=2",
                                        "model.remat=save_matmuls"],
    "tp + 2 microbatches + remat": ["mesh.rules=tp", "mesh.shape=data:4,tensor:2", "train.microbatches=2",
                                    "model.remat=full"],
}


def config(*overrides):
    return load_config("default", [*MODEL, *overrides])


# The default run checks the 2-D meshes: data x tensor, and fsdp x tensor with microbatches and
# remat on top (plain fsdp x tensor takes the same sharding path). The 1-D dp and fsdp meshes are
# also in tests/test_train.py, so the rest waits for -m slow.
DEFAULT_MESHES = ("data=4 x tensor=2 (tp)", "fsdp_tp + 2 microbatches + remat")


@pytest.mark.parametrize("names", [
    pytest.param(DEFAULT_MESHES, id="2d"),
    pytest.param(tuple(n for n in MESHES if n not in DEFAULT_MESHES and n != "1 device"), id="rest",
                 marks=pytest.mark.slow)])
def test_losses_equal_on_every_mesh(names):
    # Canon at every position in all of them (it has per-channel weights on every width that
    # shards), so one single-device reference serves every mesh.
    reference = step_losses(config("mesh.num_devices=1", "model.canon=ABCD"))
    for name in names:
        overrides = [*MESHES[name], "model.canon=ABCD"]
        np.testing.assert_allclose(step_losses(config(*overrides)), reference, rtol=2e-5, err_msg=name)


def test_fsdp_tp_places_weights_on_both_axes():
    setup = build_setup(config("mesh.rules=fsdp_tp", "mesh.shape.tensor=2"))
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    blocks = setup.state_shardings.params["stacks"][0]["blocks"]
    assert blocks["attn"]["wq"].spec == P(None, "fsdp", "tensor", None)
    assert blocks["attn"]["wo"].spec == P(None, "tensor", None, "fsdp")
    assert blocks["mlp"]["w_out"].spec == P(None, "tensor", "fsdp")
    assert setup.batch_sharding.spec == P(("fsdp",))
    # The optimizer moments follow their parameters.
    mu = setup.state_shardings.opt_state[1][0].mu["stacks"][0]["blocks"]["attn"]["wq"]
    assert mu.spec == blocks["attn"]["wq"].spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(args_per_process, env_devices=4, timeout=240):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={env_devices} {FAST_COMPILE}",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(args, cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args in args_per_process]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives over localhost) train the same steps as one
    process with 8 devices, under fsdp_tp."""
    overrides = [*MODEL, "mesh.rules=fsdp_tp", "mesh.shape.tensor=2"]
    coordinator = f"localhost:{_free_port()}"
    out = tmp_path / "losses.json"
    _launch([[sys.executable, "multiprocess_worker.py", str(out), coordinator, "2", str(i), *overrides]
             for i in range(2)])
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["devices"] == 8
    np.testing.assert_allclose(result["losses"], step_losses(config("mesh.rules=fsdp_tp", "mesh.shape.tensor=2")),
                               rtol=2e-5)


def _two_process_run(run_dir, *extra):
    """train.py as two processes (fsdp_tp over 2 x 4 CPU devices) into run_dir; their outputs."""
    coordinator = f"localhost:{_free_port()}"
    args = [*TINY_RUN, "train.steps=4", "train.log_every=2", "train.eval_every=2", "checkpoint.every=2",
            "mesh.num_devices=0", "mesh.rules=fsdp_tp", "mesh.shape.tensor=2", f"train.run_dir={run_dir}",
            "model.num_heads=2", "model.num_kv_heads=2", *extra]
    return _launch([[sys.executable, str(TESTS.parent / "train.py"), "--coordinator", coordinator,
                     "--num-processes", "2", "--process-id", str(i), *args] for i in range(2)])


def _train_steps_logged(run_dir) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "train"]


def test_two_process_training_run_logs_once_and_checkpoints(tmp_path):
    outputs = _two_process_run(tmp_path / "run")
    assert "run summary" in outputs[0] and "run summary" not in outputs[1]
    assert "step 2: eval" in outputs[0] and "step 2: eval" not in outputs[1]
    assert _train_steps_logged(tmp_path / "run") == [2, 4]  # written once, by process 0
    data = json.loads(next((tmp_path / "run" / "checkpoints" / "4" / "data").glob("*")).read_text())
    assert data["process_count"] == 2 and len(data["states"]) == 2  # each process's own data position


@pytest.mark.slow  # two more process launches (~25 s); the run above checks what each process saves
def test_two_process_training_run_resumes(tmp_path):
    _two_process_run(tmp_path / "run")
    outputs = _two_process_run(tmp_path / "run", "train.steps=6", "--allow-config-change")
    assert "resumed from step 4" in outputs[0]  # both resume their state and data position
    assert _train_steps_logged(tmp_path / "run") == [2, 4, 6]


def test_checkpoint_restores_under_other_meshes(tmp_path):
    """Saved on 8 devices with fsdp=8; restored on 4 devices as fsdp=2 x tensor=2 and on 1 device,
    the next step gives the same loss."""
    saved_cfg = config("mesh.rules=fsdp", f"train.run_dir={tmp_path}")
    setup = build_setup(saved_cfg)
    state = init_state(setup, seed=0)
    train_step = jit_train_step(setup)
    batches = list(fixed_batches(saved_cfg, 64, steps=3))
    put = lambda s, b: {k: jax.device_put(v, s.batch_sharding) for k, v in b.items()}
    for batch in batches[:2]:
        state, _ = train_step(state, put(setup, batch))
    checkpointer = Checkpointer(tmp_path, saved_cfg.checkpoint)
    checkpointer.save(2, state, {"position": 2})
    checkpointer.close()
    _, metrics = train_step(state, put(setup, batches[2]))
    expected = float(metrics["loss"])
    for overrides in (["mesh.num_devices=4", "mesh.rules=fsdp_tp", "mesh.shape=fsdp:2,tensor:2"],
                      ["mesh.num_devices=1"]):
        other = build_setup(config(*overrides, f"train.run_dir={tmp_path}"))
        checkpointer = Checkpointer(tmp_path, saved_cfg.checkpoint)
        restored, data_state = checkpointer.restore(2, other.abstract_state, other.state_shardings)
        checkpointer.close()
        assert data_state == {"position": 2} and int(restored.step) == 2
        wq = restored.params["stacks"][0]["blocks"]["attn"]["wq"][...]
        assert wq.sharding == other.state_shardings.params["stacks"][0]["blocks"]["attn"]["wq"]
        _, metrics = jit_train_step(other)(restored, put(other, batches[2]))
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5, err_msg=str(overrides))


GOLDEN_MESHES = {"dp": ["mesh.rules=dp"], "fsdp": ["mesh.rules=fsdp"],
                 "fsdp_tp": ["mesh.rules=fsdp_tp", "mesh.shape=fsdp:4,tensor:2"],
                 "tp": ["mesh.rules=tp", "mesh.shape=data:4,tensor:2"]}


def golden_table() -> str:
    """Every parameter's PartitionSpec under each preset, for a model that has every kind of
    parameter (canon ABCD, QK-norm, biases, untied head, Peri-LN's output norms)."""
    lines = []
    for preset, overrides in GOLDEN_MESHES.items():
        cfg = config(*overrides, "model.canon=ABCD", "model.qk_norm=true", "model.use_bias=true",
                     "model.tie_embeddings=false", "model.norm=peri", "model.embed_norm=true")
        setup = build_setup(cfg)
        flat = jax.tree_util.tree_flatten_with_path(setup.state_shardings.params)[0]
        lines += [f"{preset:8} {jax.tree_util.keystr(path, simple=True, separator='/')}: {s.spec}" for path, s in flat]
    return "\n".join(lines) + "\n"


def test_golden_partition_specs():
    """A renamed parameter or logical axis must not silently change (e.g. replicate) a weight.
    After an intended change: LAYERJAX_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py -k golden."""
    table = golden_table()
    if os.environ.get("LAYERJAX_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(table)
    assert table == GOLDEN.read_text()


@pytest.mark.parametrize("overrides,message", [
    (["mesh.shape.data=3"], r"multiplies to 3 devices, but there are 8"),
    (["mesh.shape=data:-1,fsdp:-1"], r"only one axis may be -1"),
    (["mesh.shape=fsdp:3,data:-1"], r"multiply to 3, which does not divide the 8 devices"),
    (["mesh.rules=tp", "mesh.shape=data:2,tensor:4"], r"wk.*dimension 2 \('kv_heads', size 2\).*does not divide"),
    (["mesh.rules=custom", "mesh.custom_rules=embed=fsdp"], r"must say where the batch goes"),
    (["mesh.rules=custom", "mesh.custom_rules=batch=gpu"], r"is not 'logical=axis"),
    (["mesh.custom_rules=batch=data"], r"only read with mesh.rules=custom"),
    (["mesh.num_devices=16"], r"only 8 devices are visible"),
])
def test_bad_mesh_is_refused_with_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_setup(config(*overrides))


def test_custom_rules_equal_their_preset():
    custom = ["mesh.rules=custom", "mesh.shape.fsdp=-1",
              "mesh.custom_rules=batch=data+fsdp+expert,embed=fsdp,expert=expert"]
    assert sharding.rules_from_config(config(*custom).mesh) == sharding.RULES["fsdp"]


def test_distributed_flags_and_cluster_detection():
    assert not distributed.initialize(mode="auto") or jax.process_count() > 1
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize(coordinator="localhost:1234")
    assert distributed.cluster_detected({"SLURM_NTASKS": "4"})
    assert not distributed.cluster_detected({"SLURM_NTASKS": "1"})
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})


def test_dry_run_refuses_a_bad_mesh_before_building_anything():
    env = {"PATH": "/usr/bin:/bin", "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"}
    out = subprocess.run([sys.executable, "train.py", "--dry-run", "mesh.rules=fsdp_tp", "mesh.shape.tensor=3"],
                         capture_output=True, text=True, cwd=TESTS.parent, env=env)
    assert out.returncode != 0
    assert "config error: mesh.shape: the fixed sizes {'data': 1, 'expert': 1, 'tensor': 3} multiply to 3" in out.stderr


def test_train_step_program_does_not_grow_with_depth_with_canon_under_fsdp_tp():
    """Compile time flat in depth (issue 13 item 5): with canon layers everywhere and under
    fsdp_tp, the compiled train step of 12 layers is the same program as that of 2 (one scan
    body); only the trip count and the stacked shapes differ."""
    def hlo_ops(layers):
        # model.scan_unroll=auto would unroll both on CPU (up to 12 layers); this is about the scan.
        cfg = load_config("default", [*MODEL, f"model.num_layers={layers}", "model.canon=ABCD", "model.scan_unroll=1",
                                      "mesh.rules=fsdp_tp", "mesh.shape.tensor=2"])
        setup = build_setup(cfg)
        batch = next(fixed_batches(cfg, 64, 1))
        text = jit_train_step(setup).lower(setup.abstract_state, batch).compile().as_text()
        return sum(1 for line in text.splitlines() if " = " in line)

    two, twelve = hlo_ops(2), hlo_ops(12)
    assert twelve <= 1.05 * two, (two, twelve)
