"""`python -m tandem.config.reference`: docs/config.md, generated from the schema.

Every field of `TandemConfig` (schema.py, cluster.py) with its type, default, range, the paper
preset's value and its docstring, so the reference cannot drift from the code: `--check` exits 1
when docs/config.md is stale, and tests/test_config_reference.py runs it, and fails on a field
without a docstring. Hand-written prose about configuring runs lives in docs/configuring.md.

Docstrings are the string literal under each field (read from the source with `ast`). Ranges are
read from the `check_*` calls in each section's `__post_init__` (`checks.py`): their name
argument is the field's key, expanded over the `for` loops around them; a bare
`check(ok, "<key> must be ...")` contributes its message up to ", got". Cross-field checks
(budgets against a model's context, the KV cache) are prose in docs/configuring.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from tandem.config import cluster, evaluation, export, learner, model, schema
from tandem.config.compose import compose

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"
PAPER_PRESET = "experiment=paper_trl"
MODULES = (schema, model, cluster, evaluation, export, learner)
_UNKNOWN = "\0"  # a loop variable whose values are not constants (enumerate): key stays open


@dataclasses.dataclass
class Field:
    """One leaf of the config: `algorithm.handoff_p` and what the reference says about it."""

    key: str
    type: str
    default: Any
    doc: str
    section: str


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it in the class body (PEP 257 attribute docstrings)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def fields(config: Any = None, prefix: str = "", section: str = "") -> Iterator[Field]:
    """Every leaf field, depth first in declaration order, with its default: the schema's
    default instances are walked (so `model.junior` shows its interpolations of
    `model.senior`); the root `TandemConfig` is never built (its checks need a model)."""
    cls = type(config) if config is not None else schema.TandemConfig
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        default = getattr(config, field.name) if config is not None else _default(field)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(default):
            yield from fields(default, f"{key}.", section or field.name)
            continue
        yield Field(key, str(field.type), default, docs.get(field.name, ""), section)


# ----------------------------------------------------------------------------- ranges


def _values(node: ast.expr, env: dict[str, list[str]]) -> list[str]:
    """The strings an f-string (or constant, or loop variable) takes over the loops around it."""
    if isinstance(node, ast.Constant):
        return [str(node.value)]
    if isinstance(node, ast.Name):
        return env.get(node.id, [_UNKNOWN])
    if isinstance(node, ast.JoinedStr):
        pieces = []
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                pieces.append(_values(part.value, env))
            else:
                pieces.append([str(part.value)])
        return ["".join(combo) for combo in itertools.product(*pieces)]
    return [_UNKNOWN]


def _constant(node: ast.expr, module: Any) -> Any:
    if isinstance(node, ast.Name):
        return getattr(module, node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_constant(node.operand, module)
    return ast.literal_eval(node)


def _describe(call: ast.Call, module: Any) -> str | None:
    """What a check_* call asks of its value, in the words of its error message."""
    name = call.func.id if isinstance(call.func, ast.Name) else ""
    args = call.args
    if name == "check_min":
        return f">= {_constant(args[1], module):g}"
    if name == "check_positive":
        return "> 0"
    if name == "check_choice":
        return "one of " + ", ".join(_constant(args[1], module))
    if name == "check_range":
        opts = {kw.arg: _constant(kw.value, module) for kw in call.keywords}
        low, high = _constant(args[1], module), _constant(args[2], module)
        return (f"{'(' if opts.get('open_low') else '['}{low:g}, {high:g}"
                f"{')' if opts.get('open_high') else ']'}")
    return None


NAME_ARG = {"check_min": 2, "check_positive": 1, "check_choice": 2, "check_range": 3}
"""Position of the key argument of each check helper (checks.py)."""


def _walk(statements: list[ast.stmt], env: dict[str, list[str]], module: Any,
          found: dict[str, list[str]]) -> None:
    """Record the checks in `statements`; `env`: the values of the loop variables around them."""
    for statement in statements:
        if isinstance(statement, ast.For):
            names = [t.id for t in ast.walk(statement.target) if isinstance(t, ast.Name)]
            inner = {**env, **dict.fromkeys(names, [_UNKNOWN])}
            if isinstance(statement.target, ast.Name):
                try:  # for name in ("kl_coef", ...) / for role in ("senior", "junior")
                    inner[names[0]] = [str(v) for v in _constant(statement.iter, module)]
                except (ValueError, TypeError, AttributeError):
                    pass  # for x in self.something: keys stay open
            _walk(statement.body, inner, module, found)
            continue
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):  # name = f"model.{role}"
            env = {**env, statement.targets[0].id: _values(statement.value, env)}
        for child in ast.iter_child_nodes(statement):
            if isinstance(child, ast.expr):
                for node in ast.walk(child):
                    if isinstance(node, ast.Call):
                        _record(node, env, module, found)
        for body in ("body", "orelse", "finalbody"):
            _walk(getattr(statement, body, []), env, module, found)


def _record(call: ast.Call, env: dict[str, list[str]], module: Any,
            found: dict[str, list[str]]) -> None:
    name = call.func.id if isinstance(call.func, ast.Name) else ""
    pairs: list[tuple[str, str | None]] = []
    if name in NAME_ARG and len(call.args) > NAME_ARG[name]:
        text = _describe(call, module)
        pairs = [(key, text) for key in _values(call.args[NAME_ARG[name]], env)]
    elif name == "check" and len(call.args) == 2:
        for message in _values(call.args[1], env):
            # "<key> must be ...", "<key>=<value> must divide ...", "<key> values must be ..."
            match = re.match(r"([a-z0-9_.\[\]]+)(?:=\0)?(?: values)? (must .*?)(?:, got|$)",
                             message)
            if match:
                text = match.group(2).replace("=\0", "").replace(_UNKNOWN, "...")
                pairs.append((match.group(1), text))
    for key, text in pairs:
        key = re.sub(r"\[[^\]]*\]$", "", key)  # optim.betas[0] -> optim.betas (each value)
        if _UNKNOWN not in key and text and text not in found.setdefault(key, []):
            found[key].append(text)


def ranges() -> dict[str, list[str]]:
    """Field key -> what its `__post_init__` checks ask of it."""
    found: dict[str, list[str]] = {}
    for module in MODULES:
        for _, cls in inspect.getmembers(module, dataclasses.is_dataclass):
            method = cls.__dict__.get("__post_init__")
            if method is None or cls.__module__ != module.__name__:
                continue
            tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
            _walk(tree.body[0].body, {}, module, found)
    return found


# ----------------------------------------------------------------------------- rendering


def render_value(value: Any) -> str:
    """A default as it would be written in YAML or on the command line."""
    if value is MISSING or value == MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and len(value) > 40:
        return value[:37] + "..."
    return str(value) if value != "" else '""'


def _cell(text: str) -> str:
    # one line; GitHub splits a table cell at any unescaped "|", code spans included
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def paper_values() -> dict[str, Any]:
    """Field key -> its value in the paper preset, composed as `python -m tandem.train` does."""
    config = compose([PAPER_PRESET])
    values = {}
    for field in fields():
        node: Any = config
        for part in field.key.split("."):
            node = getattr(node, part)
        values[field.key] = node
    return values


def render() -> str:
    """The whole of docs/config.md."""
    all_fields = list(fields())
    checked = ranges()
    paper = paper_values()
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m tandem.config.reference` from tandem/config/schema.py and",
        "     cluster.py; edit the docstrings there, then run it again. A test fails when this",
        "     file is stale or a field has no docstring. -->",
        "",
        "Every key of a run's config: its type, its default (the schema's, before any preset),",
        "what the checks in `__post_init__` require of it (a run with another value exits 2",
        f"naming the key), and its value in the paper's preset (`{PAPER_PRESET}`; blank when it",
        "is the default). How to set keys, the config groups, model paths and the cross-field",
        "checks: [configuring.md](configuring.md).",
        "",
    ]
    doc = inspect.cleandoc(schema.TandemConfig.__doc__ or "")
    sections: dict[str, list[Field]] = {}
    for field in all_fields:
        sections.setdefault(field.section, []).append(field)
    for section, members in sections.items():
        title = section or "top level"
        out += [f"## `{title}`" if section else f"## {title}", ""]
        owner = _section_class(section)
        if owner is not None and owner.__doc__:
            out += [" ".join(inspect.cleandoc(owner.__doc__).split()), ""]
        elif not section:
            out += [doc, ""]
        out += ["| key | type | default | range | `paper_trl` | meaning |",
                "|---|---|---|---|---|---|"]
        for field in members:
            default, value = render_value(field.default), render_value(paper[field.key])
            shown = "" if value == default or default.startswith("${") else _code(value)
            cells = [f"`{field.key}`", _code(field.type), _code(default),
                     "; ".join(checked.get(field.key, [])), shown, field.doc]
            out.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
        out.append("")
    return "\n".join(out)


def _section_class(section: str) -> type | None:
    for field in dataclasses.fields(schema.TandemConfig):
        if field.name == section:
            return type(_default(field))
    return None


def undocumented() -> list[str]:
    """Keys of fields without a docstring."""
    return [field.key for field in fields() if not field.doc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.config.reference",
                                     description="Write docs/config.md from the config schema.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if docs/config.md is stale or a field has "
                        "no docstring")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="default: docs/config.md")
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        print(f"tandem.config.reference: fields without a docstring: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"tandem.config.reference: {args.out} is stale; run "
                  "`python -m tandem.config.reference`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
