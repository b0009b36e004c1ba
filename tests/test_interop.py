"""Hugging Face interop: parity of imported models with transformers' own forward (logits and every
layer's hidden state, scanned and unrolled), export -> from_pretrained, bit-exact round trips,
KV-cache generation, the run directory an import writes, and the clear errors."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import VOCAB, make_hf_model, save_hf_model  # noqa: E402
from layerjax.config import MeshConfig, load_config, to_toml  # noqa: E402
from layerjax.interop import CheckpointFormatError, UnsupportedModelError, export_hf, import_hf  # noqa: E402
from layerjax.interop.families import FAMILIES  # noqa: E402
from layerjax.interop.hf_import import load_hf  # noqa: E402
from layerjax.interop.safetensors_io import INDEX_FILE, SafetensorsReader  # noqa: E402
from layerjax.train.state import build_setup  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
TOL = 1e-4
GQA_CASES = [(f, kv) for f in FAMILIES if f != "gpt2" for kv in (1, 2, 4)] + [("gpt2", 4)]


def tokens(batch: int = 2, length: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def hf_forward(model, ids: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def our_forward(cfg, params, ids: np.ndarray, scan: bool):
    """Logits and the residual stream entering each layer (and leaving the last)."""
    model_cfg = dataclasses.replace(cfg.model, scan_layers=scan)
    setup = build_setup(dataclasses.replace(cfg, model=model_cfg, mesh=MeshConfig(num_devices=1)))

    @jax.jit
    def forward(params, ids):
        model = nnx.merge(setup.graphdef, params)
        logits, _, hidden = model.forward(ids, probe="hidden")
        return logits, hidden, model.final_norm(hidden[-1])

    logits, hidden, normed = forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids))
    return np.asarray(logits), np.asarray(hidden), np.asarray(normed)


@pytest.mark.parametrize("family, kv_heads", GQA_CASES, ids=[f"{f}-kv{k}" for f, k in GQA_CASES])
def test_imported_model_matches_transformers(tmp_path, family, kv_heads):
    hf_model = save_hf_model(family, kv_heads, tmp_path / "hf")
    cfg, _, params = load_hf(tmp_path / "hf")
    ids = tokens()
    hf_logits, hf_hidden = hf_forward(hf_model, ids)
    num_layers = cfg.model.num_layers
    # Unrolled once per family (kv heads only change shapes, which the scanned runs cover).
    for scan in (True, False) if kv_heads == 2 or family == "gpt2" else (True,):
        logits, hidden, normed = our_forward(cfg, params, ids, scan)
        np.testing.assert_allclose(logits, hf_logits, atol=TOL, rtol=0, err_msg=f"logits, scan={scan}")
        # transformers reports the stream entering each layer, then the final norm's output.
        for layer in range(num_layers):
            np.testing.assert_allclose(hidden[layer], hf_hidden[layer], atol=TOL, rtol=0,
                                       err_msg=f"hidden state entering layer {layer}, scan={scan}")
        np.testing.assert_allclose(normed, hf_hidden[num_layers], atol=TOL, rtol=0, err_msg="final hidden state")


def read_all(directory: pathlib.Path) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(directory)
    try:
        return {name: reader.get(name) for name in reader.tensors}
    finally:
        reader.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, family):
    hf_model = save_hf_model(family, 2 if family != "gpt2" else 4, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run", progress=False)
    report = export_hf(tmp_path / "run", tmp_path / "out")
    assert report["family"] == family
    original, exported = read_all(tmp_path / "hf"), read_all(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and np.array_equal(exported[name].view(np.uint8), tensor.view(np.uint8)), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = tokens(seed=1)
    np.testing.assert_allclose(hf_forward(reloaded, ids)[0], hf_forward(hf_model, ids)[0], atol=TOL, rtol=0)


def test_sharded_checkpoints_import_and_export(tmp_path):
    model = make_hf_model("llama", 2)
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    import_hf(tmp_path / "hf", tmp_path / "run", progress=False)
    report = export_hf(tmp_path / "run", tmp_path / "out", max_shard_bytes=40_000)
    assert len(report["files"]) > 2 and (tmp_path / "out" / INDEX_FILE).is_file()
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(read_all(tmp_path / "hf"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = tokens(seed=2)
    np.testing.assert_allclose(hf_forward(reloaded, ids)[0], hf_forward(model, ids)[0], atol=TOL, rtol=0)


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
    model = make_hf_model("qwen3", 2).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run", dtype="bfloat16", progress=False)
    assert 'param_dtype = "bfloat16"' in (tmp_path / "run" / "config.toml").read_text()
    export_hf(tmp_path / "run", tmp_path / "out")
    original, exported = read_all(tmp_path / "hf"), read_all(tmp_path / "out")
    for name, tensor in original.items():
        assert str(exported[name].dtype) == "bfloat16" and np.array_equal(exported[name].view(np.uint16), tensor.view(np.uint16)), name


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    from layerjax.generate import generate

    hf_model = save_hf_model(family, 2, tmp_path / "hf")
    cfg, setup, params = load_hf(tmp_path / "hf")
    prompt = tokens(1, 12, seed=3)
    with torch.no_grad():
        expected = hf_model.generate(torch.from_numpy(prompt).long(), max_new_tokens=20, do_sample=False,
                                     min_new_tokens=20, eos_token_id=None, pad_token_id=0).numpy()
    ours, _ = generate(setup.graphdef, jax.tree.map(jnp.asarray, params), jnp.asarray(prompt), 20)
    np.testing.assert_array_equal(np.asarray(ours), expected)


# ---------------------------------------------------------------- the run directory an import writes


def write_tokenizer(directory: pathlib.Path) -> None:
    """A small word-level tokenizer.json whose ids stay below the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "[UNK]"] + [w for w in "the a to of and in is it that was for on with as by".split()]
    words += [f"w{i}" for i in range(60)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def test_import_writes_a_run_directory_that_samples_and_continues_training(tmp_path, capsys):
    from layerjax.cli import train_main
    from layerjax.train.checkpoint import load_run
    from layerjax.train.loop import train

    save_hf_model("llama", 2, tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    importlib.import_module("import_hf").main([str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--no-progress"])
    run = tmp_path / "run"
    assert {"config.toml", "tokenizer.json", "checkpoints", "hf"} <= {p.name for p in run.iterdir()}
    cfg, _, imported, step = load_run(run)
    assert step == 0 and cfg.data.tokenizer == str((run / "tokenizer.json").resolve())

    importlib.import_module("sample").main([str(run), "--prompt", "the cat", "--max-new-tokens", "5", "--temperature", "0"])
    assert "generated:" in capsys.readouterr().out

    corpus = tmp_path / "corpus.txt"
    words = "the a to of and in is it that was for on with as by".split()
    corpus.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(40)))
    # lr 0: two steps from the imported weights leave them unchanged, proving the run started from them.
    overrides = [f"train.run_dir={tmp_path / 'continued'}", f"data.paths={corpus}", "data.seq_len=32",
                 "data.batch_size=4", "train.steps=2", "optim.lr=0", "optim.warmup_steps=0", "train.eval_every=0",
                 "logging.progress=false", "logging.tensorboard=false", "checkpoint.async_save=false",
                 "mesh.num_devices=1"]
    summary = train(load_config(str(run / "config.toml"), overrides))
    assert summary["steps"] == 2 and np.isfinite(summary["train_loss"])
    _, _, continued, _ = load_run(tmp_path / "continued")
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(continued)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The continued run exports as the family it came from, with the tokenizer it trained with.
    train_main(["-c", str(run / "config.toml"), "--dry-run"])
    assert "no data.paths yet" in capsys.readouterr().out
    assert export_hf(tmp_path / "continued", tmp_path / "out")["family"] == "llama"
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 2


def test_native_model_exports_as_llama_and_loads_in_transformers(tmp_path):
    from layerjax.train.checkpoint import Checkpointer, load_run
    from layerjax.train.state import init_state

    cfg = load_config(None, ["model.vocab_size=96", "model.num_layers=2", "model.d_model=32", "model.num_heads=4",
                             "model.num_kv_heads=2", "model.init_std=0.2", f"train.run_dir={tmp_path / 'run'}"])
    setup = build_setup(cfg)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(to_toml(cfg))
    checkpointer = Checkpointer(tmp_path / "run", cfg.checkpoint)
    checkpointer.save(0, init_state(setup, 0), {})
    checkpointer.close()
    assert export_hf(tmp_path / "run", tmp_path / "out")["family"] == "llama"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    _, _, params, _ = load_run(tmp_path / "run")
    ids = tokens(seed=4) % 96
    ours = our_forward(cfg, params, ids, scan=True)[0]
    np.testing.assert_allclose(hf_forward(reloaded, ids)[0], ours, atol=TOL, rtol=0)


# ---------------------------------------------------------------- clear errors


def edit_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "bert"}, r"model_type 'bert' is not supported; layerjax imports \['llama', 'mistral'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"rope type 'yarn' is not supported; layerjax supports \['default', 'linear', 'llama3'\]"),
    ({"hidden_act": "gelu"}, r"llama: config.json has hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"intermediate_size": 80}, r"model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], the config implies \[80, 64\]"),
])
def test_unsupported_or_inconsistent_configs_are_refused_before_reading_weights(tmp_path, changes, message):
    save_hf_model("llama", 2, tmp_path / "hf")
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises((UnsupportedModelError, CheckpointFormatError), match=message):
        import_hf(tmp_path / "hf", tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.toml").exists()


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    from safetensors.numpy import save_file

    save_hf_model("qwen2", 2, tmp_path / "hf")
    tensors = read_all(tmp_path / "hf")
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError) as err:
        import_hf(tmp_path / "hf", tmp_path / "run", progress=False)
    assert "missing tensors: ['model.layers.1.mlp.up_proj.weight']" in str(err.value)
    assert "unexpected tensors: ['model.layers.0.self_attn.extra.weight']" in str(err.value)


def test_checkpoints_without_the_model_prefix_and_with_buffers_import(tmp_path):
    # The original GPT-2 checkpoints name tensors "h.0.attn.c_attn.weight" (no "transformer.") and
    # carry the causal-mask buffers "h.N.attn.bias"; both must import to the same weights.
    from safetensors.numpy import save_file

    save_hf_model("gpt2", 4, tmp_path / "hf")
    _, _, expected = load_hf(tmp_path / "hf")
    tensors = {name.removeprefix("transformer."): t for name, t in read_all(tmp_path / "hf").items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    _, _, imported = load_hf(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(imported)):
        np.testing.assert_array_equal(a, b)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        import_hf(tmp_path, tmp_path / "run")
    save_hf_model("llama", 2, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="no model.safetensors or model.safetensors.index.json"):
        import_hf(tmp_path / "hf", tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    (["model.norm=mix"], "model.norm='mix' has no Hugging Face equivalent; exportable schemes: pre"),
    (["model.norm=lns"], "model.norm='lns' has no Hugging Face equivalent"),
    (["model.norm=deepnorm"], "model.norm='deepnorm' has no Hugging Face equivalent"),
    (["model.canon=AC"], "model.canon='AC': canon layers have no Hugging Face equivalent"),
    (["model.layer_norms=0:post"], r"model.layer_norms=\['0:post'\] \(per-layer norm schemes\)"),
    (["model.norm=peri"], r"Hugging Face 'gemma2' cannot represent: .*model.embed_scale=False"),
    (["model.rope_fraction=0.5"], r"model.rope_fraction=0.5 \(would come back as 1.0\)"),
    (["model.adapter.kind=mola", "model.adapter.experts=2"], "a mixture of LoRA experts routes by input"),
])
def test_export_refuses_models_without_a_hugging_face_equivalent(tmp_path, overrides, message):
    cfg = load_config(None, ["model.vocab_size=64", "model.num_layers=2", "model.d_model=32", *overrides])
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    with pytest.raises(UnsupportedModelError, match=message):
        export_hf(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
