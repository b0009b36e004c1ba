"""The config reference (`train.py --help-config`): every field documented, types and defaults as
the dataclasses have them, section filters, and the README's copy in sync. No JAX is compiled."""

import dataclasses
import re
import tomllib
import typing

import pytest

from layerjax import config_help
from layerjax.cli import train_main
from layerjax.config import CHOICES, AdapterConfig, Config, all_keys

TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str", tuple[str, ...]: "list[str]", int | str: "int or str"}


def listed_keys(text: str) -> list[str]:
    """Field keys in the plain-text reference: the lines `  key: type = default`."""
    return re.findall(r"^  (\S+): ", text, re.MULTILINE)


def dataclass_value(key: str):
    node = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def all_fields() -> list[config_help.FieldHelp]:
    return [f for s in config_help.sections() for f in s.fields]


def test_every_field_and_section_is_documented():
    fields = all_fields()
    assert sorted(f.key for f in fields) == sorted(all_keys())  # each field exactly once
    undocumented = [f.key for f in fields if not f.doc.strip()]
    assert not undocumented, f"add a # comment beside these fields in layerjax/config.py: {undocumented}"
    assert all(s.doc.strip() for s in config_help.sections())


def test_comments_above_and_beside_a_field_both_count():
    doc = {f.key: f.doc for f in all_fields()}
    assert doc["model.canon"].startswith("Canon layers (Physics of LMs 4.1)")  # the lines above
    assert doc["model.canon"].endswith('"" or "none": no canon layers')  # the comment on its line
    assert doc["optim.lr"] == "peak learning rate of AdamW, reached after warmup"


def test_types_defaults_and_choices_match_the_dataclasses():
    for f in all_fields():
        parent, name = f.key.rsplit(".", 1)
        typ = typing.get_type_hints(type(dataclass_value(parent)))[name]
        assert f.type == TYPE_NAMES[typ], f.key
        default = dataclass_value(f.key)
        shown = tomllib.loads(f"value = {f.default}")["value"]  # defaults are written as TOML values
        assert shown == (list(default) if isinstance(default, tuple) else default), f.key
        assert type(shown) in ((list,) if typ == tuple[str, ...] else typing.get_args(typ) or (typ,)), f.key
        assert f.choices == CHOICES.get(f.key, ()), f.key
    text = config_help.render("model")
    assert '  model.norm: str = "pre"  (one of: pre, post, mix, peri, reordered, lns, deepnorm, none)' in text
    assert "  model.window_pattern: list[str] = []  (each of: local, global)" in text


def test_section_filter_lists_exactly_that_section():
    adapter = listed_keys(config_help.render("model.adapter"))
    assert adapter == [f"model.adapter.{f.name}" for f in dataclasses.fields(AdapterConfig)]
    model = listed_keys(config_help.render("model"))  # a section includes its subsections
    assert set(adapter) < set(model) and all(k.startswith("model.") for k in model)
    assert listed_keys(config_help.render("optim.lr")) == ["optim.lr"]  # one dotted key
    assert listed_keys(config_help.render()) == [f.key for f in all_fields()]


def test_unknown_section_exits_with_one_line_naming_the_sections():
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help-config", "modle"])
    message = str(exit_info.value.code)
    assert "\n" not in message and "unknown config section 'modle'" in message
    assert "model, model.adapter, model.recursion, data" in message and "mesh.shape" in message


def test_train_main_help_config(capsys):
    assert train_main(["--help-config", "optim"]) is None
    out = capsys.readouterr().out
    assert "optim.lr: float = 0.003" in out and "model." not in out
    train_main(["--help-config", "data.sft", "--help-config-format", "markdown"])
    out = capsys.readouterr().out
    assert out.startswith("**`data.sft`**") and out.count("| key | type | default | allowed | meaning |") == 1
    assert '| `data.sft.template` | str | `"simple"` | one of: `simple`, `jinja` |' in out
    assert r"&lt;\|user\|>" in out  # pipes and tags in a doc stay literal text in a table


def test_markdown_has_one_table_per_section():
    text = config_help.render(fmt="markdown")
    headings = re.findall(r"^\*\*`([^`]+)`\*\*", text, re.MULTILINE)
    assert headings == [s.key for s in config_help.sections()]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(all_keys()) and all(row.count(" | ") == 4 for row in rows)


def test_readme_reference_is_in_sync():
    readme = config_help.README.read_text()
    assert config_help.readme_section(readme) == config_help.readme_expected(), (
        "README.md's config reference is stale: run python3 -m layerjax.config_help --write-readme")


def test_write_readme_replaces_only_the_marked_section(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# before\n\n{config_help.README_START}\nold\n{config_help.README_END}\n\nafter\n")
    assert config_help.write_readme(path)
    text = path.read_text()
    assert text.startswith("# before\n\n") and text.endswith(f"{config_help.README_END}\n\nafter\n")
    assert config_help.readme_section(text) == config_help.readme_expected()
    assert not config_help.write_readme(path)  # already up to date
