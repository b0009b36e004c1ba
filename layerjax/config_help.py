"""The config reference: every field of the config tree with its type, default, allowed values and
meaning, as plain text (`train.py --help-config [SECTION]`) or Markdown (the README's reference).

The meaning of a field is the `#` comment written with it in layerjax/config.py: the comment lines
directly above it and the comment on its line. Those comments are parsed here rather than copied, so the
code, `--help-config` and the README say the same thing; `tests/test_config_help.py` fails when a
field has no comment or when the README section is stale (`python3 -m layerjax.config_help
--write-readme` regenerates it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import pathlib
import sys
import textwrap
import tokenize
import typing

from layerjax import config
from layerjax.config import CHOICES, Config, ConfigError

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
README_START = "<!-- config-reference:start -->"
README_END = "<!-- config-reference:end -->"
FORMATS = ("text", "markdown")
WIDTH = 100  # of the plain-text reference


@dataclasses.dataclass(frozen=True)
class FieldHelp:
    key: str  # dotted, as overrides spell it: model.adapter.rank
    type: str  # as the command line takes it: int, float, bool, str, list[str]
    default: str  # as TOML writes it, so a preset can copy it
    choices: tuple[str, ...]  # allowed values (of every entry, for a list); empty: any
    doc: str


@dataclasses.dataclass(frozen=True)
class Section:
    key: str  # dotted: model, model.adapter
    doc: str  # its class's docstring, or the comment on the field that holds it
    fields: tuple[FieldHelp, ...]  # its own fields, not those of its subsections


@functools.cache
def source_docs() -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """From config.py's source: (class name, field name) -> the field's comment (the comment lines
    directly above it, then the comment on its own line(s)), and class name -> its docstring."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    fields, classes = {}, {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        classes[node.name] = " ".join((ast.get_docstring(node) or "").split())
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above = []
            row = stmt.lineno - 1
            while row >= 1 and lines[row - 1].lstrip().startswith("#"):
                above.insert(0, comments[row])
                row -= 1
            beside = [comments[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments]
            fields[node.name, stmt.target.id] = " ".join(above + beside)
    return fields, classes


def _type_name(typ) -> str:
    if typing.get_origin(typ) is tuple:
        return "list[str]"  # tuples of strings; comma-separated on the command line
    if typing.get_args(typ):
        return " or ".join(t.__name__ for t in typing.get_args(typ))
    return typ.__name__


def _default(value) -> str:  # written as a preset would write it
    return config._toml_value(list(value) if isinstance(value, tuple) else value)


@functools.cache
def sections() -> tuple[Section, ...]:
    """Every section of the config tree, parents before their subsections, in declaration order."""
    field_docs, class_docs = source_docs()
    out: list[Section] = []

    def walk(cls, node, prefix: str, doc: str):
        own, subsections = [], []
        types = typing.get_type_hints(cls)  # resolved: config.py's annotations are strings
        for f in dataclasses.fields(cls):
            typ = types[f.name]
            key, value, field_doc = prefix + f.name, getattr(node, f.name), field_docs.get((cls.__name__, f.name), "")
            if dataclasses.is_dataclass(typ):
                # A section's doc is its class's docstring, or the comment on the field holding it.
                subsections.append((typ, value, key, class_docs.get(typ.__name__) or field_doc))
            else:
                own.append(FieldHelp(key, _type_name(typ), _default(value), CHOICES.get(key, ()), field_doc))
        if prefix:
            out.append(Section(prefix.rstrip("."), doc, tuple(own)))
        for typ, value, key, sub_doc in subsections:
            walk(typ, value, key + ".", sub_doc)

    walk(Config, Config(), "", "")
    return tuple(out)


def select(section: str = "") -> list[Section]:
    """The sections under `section` (itself and its subsections; all for ""), or the one field it
    names. Raises ConfigError naming the valid sections for anything else."""
    everything = sections()
    if not section:
        return list(everything)
    chosen = [s for s in everything if s.key == section or s.key.startswith(section + ".")]
    if chosen:
        return chosen
    for s in everything:
        named = [f for f in s.fields if f.key == section]
        if named:
            return [dataclasses.replace(s, fields=tuple(named))]
    raise ConfigError(f"unknown config section '{section}'; sections: {', '.join(s.key for s in everything)}")


def _allowed(f: FieldHelp, code: str = "") -> str:
    if not f.choices:
        return ""
    values = ", ".join(f"{code}{c}{code}" for c in f.choices)
    return f"each of: {values}" if f.type.startswith("list") else f"one of: {values}"


def format_text(chosen: list[Section]) -> str:
    out = []
    for s in chosen:
        out.extend(textwrap.wrap(f"[{s.key}]  {s.doc}", WIDTH, subsequent_indent=" " * 4))
        for f in s.fields:
            head = f"  {f.key}: {f.type} = {f.default}"
            allowed = _allowed(f)
            out.append(head + (f"  ({allowed})" if allowed else ""))
            out.extend(textwrap.wrap(f.doc, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def format_markdown(chosen: list[Section]) -> str:
    def cell(text: str) -> str:  # literal text in a table cell: no column breaks, emphasis or HTML tags
        return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")

    out = []
    for s in chosen:
        out += [f"**`{s.key}`**" + (f": {cell(s.doc)}" if s.doc else ""), ""]
        if s.fields:  # a section holding only subsections gets no empty table
            out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
            for f in s.fields:
                default = f.default.replace("|", "\\|")  # a code span: only the column break needs escaping
                out.append(f"| `{f.key}` | {f.type} | `{default}` | {_allowed(f, '`')} | {cell(f.doc)} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render(section: str = "", fmt: str = "text") -> str:
    chosen = select(section)
    return format_markdown(chosen) if fmt == "markdown" else format_text(chosen)


def readme_section(readme_text: str) -> str:
    """What stands between the README's config-reference markers."""
    start, end = readme_text.index(README_START) + len(README_START), readme_text.index(README_END)
    return readme_text[start:end]


def readme_expected() -> str:
    return "\n\n" + render(fmt="markdown") + "\n"


def write_readme(path: pathlib.Path = README) -> bool:
    """Regenerates the README's config reference in place; True when it changed."""
    text = path.read_text()
    old = readme_section(text)
    new = readme_expected()
    if old != new:
        path.write_text(text.replace(README_START + old + README_END, README_START + new + README_END))
    return old != new


def help_config_main(section: str, fmt: str = "text") -> None:
    """What `train.py --help-config` runs: print the reference, or exit with one line."""
    try:
        print(render(section, fmt), end="")
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def main(argv: typing.Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the config reference, or regenerate the README's copy of it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("section", nargs="?", default="",
                        help="a section (model, model.adapter, ...) or one dotted key; all when omitted")
    parser.add_argument("--format", choices=FORMATS, default="text", help="plain text or Markdown tables")
    parser.add_argument("--write-readme", action="store_true",
                        help=f"rewrite the part of {README.name} between the config-reference markers")
    args = parser.parse_args(argv)
    if args.write_readme:
        changed = write_readme()
        print(f"{README}: config reference {'updated' if changed else 'already up to date'}")
        return
    help_config_main(args.section, args.format)


if __name__ == "__main__":
    main()
