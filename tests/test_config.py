"""Config: presets and overrides resolve with types, and every bad input fails early with a
message that names the setting and says what was expected."""

import subprocess
import sys

import pytest

from layerjax.config import Config, ConfigError, all_keys, load_config, load_preset, to_toml


def test_defaults_presets_and_overrides():
    cfg = load_config("default", ["model.num_layers=12", "optim.lr=3e-4", "model.qk_norm=true",
                                  "model.layer_norms=0-2:post,5:post", "data.depo.max_hops=8"])
    assert cfg.model.num_layers == 12 and cfg.optim.lr == 3e-4 and cfg.model.qk_norm is True
    assert cfg.model.layer_norms == ("0-2:post", "5:post") and cfg.data.depo.max_hops == 8
    assert load_config("bench_cpu").model.d_model == 384


def test_preset_extends_parent(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text('extends = "default"\n[model]\nnum_layers = 7\n')
    cfg = load_config(str(child))
    assert cfg.model.num_layers == 7 and cfg.model.d_model == load_config("default").model.d_model
    assert "extends" not in load_preset(str(child))


def test_toml_round_trip(tmp_path):
    cfg = load_config("default", ["model.layer_norms=0-1:post", "train.z_loss=1e-4"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, message", [
    (["model.num_layer=3"], "unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"),
    (["optim.lrr=1"], "did you mean 'optim.lr'"),
    (["model.num_layers=three"], "model.num_layers: expected an integer, got 'three'"),
    (["model.num_layers=2.5"], "expected an integer"),
    (["model.qk_norm=maybe"], "model.qk_norm: expected true or false"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["model.norm=sandwich"], "model.norm='sandwich' is not one of ['pre', 'post', 'mix', 'peri'"),
    (["model.positions=alibi"], "is not one of ['rope', 'learned', 'none']"),
    (["model.d_model=100", "model.num_heads=3"], "model.num_heads=3 does not divide model.d_model=100"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3 must divide model.num_heads=4"),
    (["data.seq_len=512"], "data.seq_len=512 is longer than the model's context model.max_seq_len=128"),
    (["train.microbatches=3"], "train.microbatches=3 must divide data.batch_size=32"),
    (["model.layer_norms=0-9:post"], "layers must satisfy 0 <= first <= last < model.num_layers=4"),
    (["model.layer_norms=zero:post"], "is not 'first-last:scheme'"),
    (["model.layer_norms=0:side"], "scheme 'side' is not one of"),
    (["optim.no_decay=norm,weights"], "optim.no_decay has ['weights']"),
    (["model"], "is not of the form section.field=value"),
    (["model=3"], "model='3': expected field:value entries"),
    (["mesh.shape=fsdp:4,gpu:2"], "unknown config key 'mesh.shape.gpu'"),
    (["model.mlp=reglu"], "model.mlp='reglu' is not one of ['swiglu', 'geglu', 'gelu']"),
    (["model.sliding_window=4", "model.window_pattern=local,full"],
     "model.window_pattern has ['full']; every entry must be one of ['local', 'global']"),
    (["model.window_pattern=local,global"], "model.window_pattern=['local', 'global'] has no effect without a window"),
    (["model.sliding_window=-1"], "model.sliding_window=-1 must be >= 0"),
    (["model.attn_softcap=-5"], "model.attn_softcap=-5.0 must be >= 0"),
    (["model.bias_projections=q,gate"], "model.bias_projections has ['gate']; every entry must be one of ['q', 'k'"),
    (["model.bias_projections=q,q"], "model.bias_projections=['q', 'q'] names a projection twice"),
    (["model.qk_norm_scope=layer"], "model.qk_norm_scope='layer' is not one of ['head', 'full']"),
    (["model.rope_scaling=yarn"], "model.rope_scaling='yarn' is not one of ['none', 'linear', 'llama3']"),
    (["model.rope_scaling=llama3", "model.rope_low_freq_factor=4"], "needs 0 < model.rope_low_freq_factor (4.0) <"),
    (["model.rope_fraction=0.2"], "model.rope_fraction=0.2 rotates int(16 * 0.2) = 3 dims of each head; that must be"),
    (["model.rope_fraction=1.5"], "model.rope_fraction=1.5 must be in (0, 1]"),
    (["model.param_dtype=float16"], "model.param_dtype='float16' is not one of ['float32', 'bfloat16']"),
])
def test_bad_input_gets_clear_error(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("default", override)
    assert message in str(err.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"config preset 'nope' not found.*'default'"):
        load_config("nope")


def test_every_key_is_overridable():
    keys = all_keys()
    assert "model.num_layers" in keys and "data.depo.max_hops" in keys and len(keys) == len(set(keys))
    assert Config() == load_config(None)


def test_cli_errors_are_one_line_and_early(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "model.d_modle=64", f"train.run_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=pytest.importorskip("pathlib").Path(__file__).parents[1])
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "config error: unknown config key 'model.d_modle'; did you mean 'model.d_model'?")
    assert not (tmp_path / "config.toml").exists()  # nothing was started


def test_section_compact_form():
    cfg = load_config(None, ["mesh.shape=data:-1,tensor:2", "mesh.rules=fsdp_tp"])
    assert (cfg.mesh.shape.data, cfg.mesh.shape.fsdp, cfg.mesh.shape.tensor) == (-1, 0, 2)


def test_every_preset_in_configs_loads():
    import pathlib

    presets = sorted(pathlib.Path(__file__).resolve().parents[1].glob("configs/*.toml"))
    assert len(presets) >= 15
    for preset in presets:
        load_config(preset.stem)


# The GPU and TPU presets (README, "GPUs and TPUs: the plan"): devices they are laid out for, and
# the memory of one device.
ACCELERATOR_PRESETS = {"h100_125m": (8, 80e9), "h100_1b": (8, 80e9), "tpu_v5e_125m": (8, 16e9),
                       "tpu_v5e_1b": (32, 16e9)}


@pytest.mark.parametrize("name", sorted(ACCELERATOR_PRESETS))
def test_accelerator_presets_fit_their_devices_with_room_to_spare(name):
    import dataclasses

    from layerjax.train.memory import estimate_memory

    devices, device_bytes = ACCELERATOR_PRESETS[name]
    cfg = load_config(name)
    assert cfg.model.dtype == "bfloat16" and cfg.model.loss_chunk > 0
    assert cfg.data.batch_size % (devices * cfg.train.microbatches) == 0
    if name.startswith("h100"):  # what attention_impl=auto resolves to on the GPU
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="cudnn"))
    # The estimate errs low (about 2x against XLA's allocation on CPU): keep that margin.
    platform = "gpu" if name.startswith("h100") else "tpu"
    assert 2 * estimate_memory(cfg, devices, platform).per_device < device_bytes
