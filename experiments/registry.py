"""Registry of named experiments, and the one `--set key=value` override parser.

    get_experiment("stage1", model="tiny", overrides=["optim.peak_lr=1e-3", "mesh.fsdp=2"])
    apply_overrides(model_config, ["attention_impl=xla", "vision.depth=2"])

An override is a dotted path into a (nested) frozen dataclass: for an `experiments.stages.Experiment`
e.g. `batch_size`, `data.seq_len`, `model.remat_policy`, `optim.warmup_steps`, `mesh.tensor`,
`checkpoint.every`; any other frozen config (a ModelConfig for launch.evaluate) works the same way. The value
is parsed by the type of the field's current value: int, float, bool (true/false/1/0/yes/no), str, or a
Python literal for tuples (`trainable="('merger','llm')"`, `mrope_section=16,24,24`).
Unknown keys and unparsable or invalid values raise ValueError naming the valid choices.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Iterable, TypeVar

from experiments import stages

T = TypeVar("T")

EXPERIMENTS: dict[str, Callable[[str], stages.Experiment]] = {
    "stage1": lambda model: stages.stage_experiment(1, model),
    "stage2": lambda model: stages.stage_experiment(2, model),
    "stage3": lambda model: stages.stage_experiment(3, model),
}


def list_experiments(model: str = "tiny") -> list[tuple[str, str]]:
    return [(name, fn(model).description) for name, fn in EXPERIMENTS.items()]


def get_experiment(name: str, model: str = "tiny", overrides: Iterable[str] = ()) -> stages.Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    return apply_overrides(EXPERIMENTS[name](model), overrides)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _tupleize(x):
    return tuple(_tupleize(v) for v in x) if isinstance(x, (list, tuple)) else x


def parse_value(text: str, current: Any, key: str) -> Any:
    """`text` parsed to the type of `current` (the field's present value)."""
    try:
        if isinstance(current, bool):
            t = text.strip().lower()
            if t not in _TRUE + _FALSE:
                raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")
            return t in _TRUE
        if isinstance(current, int):
            return int(text.replace("_", ""))
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, tuple):
            value = ast.literal_eval(text)
            if not isinstance(value, (list, tuple)):
                value = (value,)
            return _tupleize(value)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"--set {key}={text!r}: cannot parse as {type(current).__name__} "
                         f"(current value {current!r}): {e}") from None
    raise ValueError(f"--set {key}: field of type {type(current).__name__} cannot be set from the command line")


def _fields(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _parse_at(obj, path: list[str], text: str, full_key: str):
    """The parsed value of `text` for the field at `path` under `obj` (checks every step of the path)."""
    name = path[0]
    if not dataclasses.is_dataclass(obj) or name not in _fields(obj):
        where = full_key[: len(full_key) - len(".".join(path))].rstrip(".") or type(obj).__name__
        raise ValueError(f"unknown key {full_key!r}: {where} has no field {name!r}; valid: "
                         f"{', '.join(_fields(obj))}")
    current = getattr(obj, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"unknown key {full_key!r}: {name!r} is a {type(current).__name__}, not a config")
        return _parse_at(current, path[1:], text, full_key)
    if dataclasses.is_dataclass(current):
        raise ValueError(f"--set {full_key}: {name!r} is a config; set one of its fields: "
                         f"{', '.join(f'{full_key}.{f}' for f in _fields(current))}")
    return parse_value(text, current, full_key)


def _rebuild(obj, changes: dict, prefix: str):
    """dataclasses.replace of `obj` with every change below it at once (nested configs first), so fields that
    must agree (model.hidden_size with model.vision.out_hidden_size, ...) can be changed together."""
    kw = {name: _rebuild(getattr(obj, name), ch, f"{prefix}{name}.") if isinstance(ch, dict) else ch[0]
          for name, ch in changes.items()}
    try:
        return dataclasses.replace(obj, **kw)
    except (ValueError, TypeError) as e:
        given = ", ".join(f"{k}={t!r}" for k, t in _leaf_texts(changes, prefix))
        raise ValueError(f"--set {given} is invalid: {e}") from None


def _leaf_texts(changes: dict, prefix: str):
    for name, ch in changes.items():
        if isinstance(ch, dict):
            yield from _leaf_texts(ch, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", ch[1]


def _split_item(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. optim.peak_lr=1e-4")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ValueError(f"--set {item!r}: empty key")
    return key, text


def apply_overrides(config: T, items: Iterable[str]) -> T:
    """`config` (a frozen dataclass) with `key=value` overrides (dotted keys), applied together: each nested
    config is rebuilt once with all of its changes, so its validation sees the final combination (a later
    value of the same key wins)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"apply_overrides needs a dataclass; got {type(config).__name__}")
    changes: dict = {}
    for item in items:
        key, text = _split_item(item)
        path = key.split(".")
        value = _parse_at(config, path, text, key)
        node = changes
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = (value, text)
    return _rebuild(config, changes, "") if changes else config


def describe(config) -> str:
    """A flat `key = value` listing of every field of a (nested) dataclass config (what --set can change);
    for an Experiment also its derived step count."""
    lines = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                lines.append(f"{prefix}{f.name} = {v!r}")
    walk(config, "")
    if isinstance(config, stages.Experiment):
        lines.append(f"(derived) num_steps = {config.num_steps}, tokens_per_step = {config.tokens_per_step}")
    return "\n".join(lines)
