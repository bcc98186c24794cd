"""The run config documented from its pydantic models: `deltatune config show` (every key with its default and a
comment: description, allowed values, bounds) and `deltatune config schema` (a JSON schema editors validate YAML
files with). Both come from the Schema classes and the registry, so they cannot drift from what is validated."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from deltatune.config import RunConfig
from deltatune.delta import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.registry import get_method, methods
from deltatune.schema import Schema

COMMENT_COLUMN = 44
BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


# ---------------------------------------------------------------- commented YAML

def default_config_yaml(method: str = "lora") -> str:
    """A complete run config with `method` as its delta: every key at its default, commented. Required keys hold
    an example value; optional sections that are off by default are commented out (uncomment to use them)."""
    delta = _example_values(get_method(method).config_class)  # an unknown name: an error listing the methods
    values = RunConfig(**_example(RunConfig) | {"delta": [DeltaConfig()]}).to_dict() | {"delta": [delta]}
    header = [f"# deltatune run config with every key at its default (method: {method}); run it with",
              "# `deltatune train FILE`. Required keys hold an example value; commented-out sections are off",
              "# by default. Other methods: `deltatune config show METHOD` (`deltatune methods` lists them)."]
    return "\n".join(header + _lines(RunConfig, values, 0)) + "\n"


def _lines(cls: type[BaseModel], values: dict[str, Any], indent: int) -> list[str]:
    """The YAML lines of `values` (a dump of `cls`), each key with its field's comment."""
    lines = []
    for name, field in cls.model_fields.items():
        value, item = values.get(name), _section_class(field.annotation)  # to_dict() leaves out unset sections
        comment = _comment(field)
        if item is None or (value is not None and not isinstance(value, (dict, list))):
            lines.append(_line(indent, f"{name}: {_flow(value)}", comment))
        elif value is None:  # an optional section, off by default: a commented-out example to uncomment
            example = _example_values(item)
            block = _items(item, [example], indent + 2) if _is_list(field.annotation) else \
                _lines(item, example, indent + 2)
            lines.append(_line(indent, f"# {name}:", comment + " (optional, off by default)"))
            lines += [line[:indent] + "# " + line[indent:].replace("  # ", "# ", 1) for line in block]
        else:
            lines.append(_line(indent, f"{name}:", comment))
            lines += _items(item, value, indent + 2) if isinstance(value, list) else \
                _sub(item, value, indent + 2)
    return lines


def _sub(cls: type[BaseModel], value: dict[str, Any], indent: int) -> list[str]:
    """A nested section; a method config (`{method: NAME, ...}`) is documented by the method's own class."""
    if cls is DeltaConfig:
        method = get_method(value["method"])
        return [_line(indent, f"method: {method.name}", method.description)] + \
            _lines(method.config_class, value, indent)
    return _lines(cls, value, indent)


def _items(cls: type[BaseModel], items: list[dict[str, Any]], indent: int) -> list[str]:
    """A list of sections as a YAML block sequence (`- key: value` then the item's other keys)."""
    lines = []
    for item in items:
        block = _sub(cls, item, indent + 2)
        lines += [block[0][:indent] + "- " + block[0][indent + 2:], *block[1:]]
    return lines


def _line(indent: int, text: str, comment: str) -> str:
    text = " " * indent + text
    return f"{text:<{COMMENT_COLUMN}}  # {comment}" if comment else text


def _flow(value: Any) -> str:
    """`value` as one line of YAML (flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=False).strip() \
        .removesuffix("...").strip()


def _comment(field: FieldInfo) -> str:
    """Description, allowed values, bounds and "required" of a field."""
    parts = [field.description or ""]
    if allowed := _literal_values(field.annotation):
        parts.append("allowed: " + " | ".join(map(str, allowed)))
    bounds = [f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in BOUNDS if hasattr(m, key)]
    parts += [", ".join(bounds)] if bounds else []
    parts += ["required"] if field.is_required() else []
    return "; ".join(p for p in parts if p)


def _members(annotation: Any) -> list[Any]:
    """The types of a union (`X | None` -> [X, NoneType]), or the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _literal_values(annotation: Any) -> list[Any]:
    return [v for t in _members(annotation) if typing.get_origin(t) is Literal for v in typing.get_args(t)]


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(t) is list for t in _members(annotation))


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The Schema class a field holds (itself, in a list, or optional), if any."""
    for t in _members(annotation):
        inner = typing.get_args(t)[0] if typing.get_origin(t) is list else t
        if isinstance(inner, type) and issubclass(inner, Schema):
            return inner
    return None


def _example(cls: type[BaseModel]) -> dict[str, Any]:
    """Values for the required fields of `cls` and those with examples: each field's first example, or a nested
    section's example."""
    out = {}
    for name, field in cls.model_fields.items():
        if field.is_required() or field.examples:
            section = _section_class(field.annotation)
            out[name] = field.examples[0] if field.examples else _example(section)  # type: ignore[arg-type]
    return out


def _example_values(cls: type[BaseModel]) -> dict[str, Any]:
    """Every field of `cls` at its default, with example values for the required ones (as plain YAML data)."""
    example = _example(cls)
    try:
        config = cls(**example)
    except ConfigError:  # a check that needs the example's files to exist (e.g. fusion's adapter folders)
        config = cls.model_construct(**example)
    return config.to_dict() if isinstance(config, DeltaConfig) else config.model_dump(mode="json")


# ---------------------------------------------------------------- JSON schema

def json_schema() -> dict[str, Any]:
    """JSON schema of a run config file (draft 2020-12), with every registered method's keys under `delta`.

    A config gives `data` or `tasks`; a `deltatune compare` config may leave out `delta` and has a `compare`
    section."""
    from deltatune.runs.compare import CompareConfig

    schema = RunConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    choices = []
    for name, method in methods().items():
        sub = method.config_class.model_json_schema(ref_template="#/$defs/{model}")
        for key, value in sub.pop("$defs", {}).items():
            defs.setdefault(key, value)
        sub["properties"] = {"method": {"const": name, "description": method.description}, **sub["properties"]}
        sub["required"] = ["method", *sub.get("required", [])]
        defs[method.config_class.__name__] = sub
        choices.append({"$ref": f"#/$defs/{method.config_class.__name__}"})
    defs["DeltaConfig"] = {"oneOf": choices, "description": "a method: {method: NAME, ...its keys}"}
    compare = CompareConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs |= compare.pop("$defs", {})
    defs["CompareConfig"] = compare
    schema["properties"]["compare"] = {"$ref": "#/$defs/CompareConfig"}
    schema["required"] = ["model"]
    schema["allOf"] = [{"oneOf": [{"required": ["data"]}, {"required": ["tasks"]}]},
                       {"anyOf": [{"required": ["delta"]}, {"required": ["compare"]}]}]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "deltatune run config"}
