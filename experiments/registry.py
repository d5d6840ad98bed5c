"""Registry of named experiments, and the one `--set key=value` override parser.

    get_experiment("stage1", model="tiny", overrides=["optim.peak_lr=1e-3", "mesh.fsdp=2"])
    get_experiment("stage3", overrides=["init_from=/ckpt/Qwen2-VL-2B-Instruct"], data="/data/prepared")
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
import math
import os
from typing import Any, Callable, Iterable, TypeVar

import jax

from experiments import stages
from qwen2vl_jax.data.tokenizer import tokenizer_json
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import EXECUTION_FIELDS, ModelConfig, architecture_diff, get_config, matching_preset
from qwen2vl_jax.train import checkpoint, rundir

T = TypeVar("T")
DEFAULT_MODEL = "tiny"

EXPERIMENTS: dict[str, Callable[[str], stages.Experiment]] = {
    "stage1": lambda model: stages.stage_experiment(1, model),
    "stage2": lambda model: stages.stage_experiment(2, model),
    "stage3": lambda model: stages.stage_experiment(3, model),
}


def list_experiments(model: str = "tiny") -> list[tuple[str, str]]:
    return [(name, fn(model).description) for name, fn in EXPERIMENTS.items()]


def get_experiment(name: str, model: str | None = None, overrides: Iterable[str] = (),
                   data: str | None = None) -> stages.Experiment:
    """The experiment `name` at the size preset `model` with `overrides` applied; `data` (--data) replaces its
    training data (stages.data_source).

    When `init_from` names a checkpoint that carries a model config (a Hugging Face folder's config.json, a
    run's or a converted checkpoint's model_config.json), the model is that config (with the preset's
    execution settings: dtype, remat, attention) and the tokenizer that folder's tokenizer.json (unless
    `tokenizer` is set). `model` None then picks the preset of the same architecture (e.g. "2b" for
    Qwen2-VL-2B), else the one nearest in parameter count, for the recipe's sizes (sequence length, batch,
    mesh); a given `model`, or a `model.<field>` override, that disagrees with the checkpoint is a ValueError
    naming the differing fields. Without init_from, `model` None is DEFAULT_MODEL."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    overrides = list(overrides)
    exp = apply_overrides(EXPERIMENTS[name](model or DEFAULT_MODEL), overrides)
    if exp.init_from:
        exp = _from_checkpoint(name, model, overrides, exp)
    if data is not None:
        if "data.mixture" in _keys(overrides):
            raise ValueError("--data and --set data.mixture both choose the training data; pass one of them")
        exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, mixture=((stages.data_source(data), 1.0),)))
    return exp


def _keys(overrides: Iterable[str]) -> list[str]:
    return [_split_item(item)[0] for item in overrides]


def _param_count(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(hf.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))


def _preset_for(cfg: ModelConfig) -> str:
    """The preset with `cfg`'s architecture, else the one nearest in parameter count (log scale)."""
    n = _param_count(cfg)
    return matching_preset(cfg) or min(stages.MODELS, key=lambda m: abs(math.log(_param_count(get_config(m)) / n)))


def _from_checkpoint(name: str, model: str | None, overrides: list[str], exp: stages.Experiment) -> stages.Experiment:
    """`exp` with init_from's model config and tokenizer (see get_experiment)."""
    saved = rundir.read_model_config(exp.init_from)
    if saved is None:                  # params without a config: their shapes are checked when they load
        return exp
    keys = _keys(overrides)
    if model is None:
        exp = apply_overrides(EXPERIMENTS[name](_preset_for(saved)), overrides)
    chosen = [k for k in keys if k.startswith("model.") and k.split(".")[1] not in EXECUTION_FIELDS]
    diff = architecture_diff(saved, exp.model)
    if diff and (model is not None or chosen):
        given = ", ".join(([f"--model={model}"] if model else []) + [f"--set {k}" for k in chosen])
        raise ValueError(f"init_from {exp.init_from} holds another model than {given} (checkpoint vs requested): "
                         + ", ".join(f"{k} {a} vs {b}" for k, a, b in diff))
    execution = {f: getattr(exp.model, f) for f in EXECUTION_FIELDS}
    if diff:                           # no preset has this architecture: keep the checkpoint's name
        execution["name"] = saved.name
    exp = dataclasses.replace(exp, model=saved.replace(**execution))
    if "tokenizer" not in keys:
        exp = dataclasses.replace(exp, tokenizer=_checkpoint_tokenizer(exp.init_from, exp.tokenizer))
    return exp


def _checkpoint_tokenizer(path: str, current: str) -> str:
    """The tokenizer of a run that starts from the checkpoint at `path`: a Hugging Face folder's tokenizer.json
    (ValueError when it has none); the tokenizer.json a run or converted checkpoint kept, when it is not
    `current`'s (a chain of runs from one tokenizer keeps naming it as before, so a resume finds the same data
    fingerprint whether or not the previous run had finished when the chain was configured); else `current`."""
    folder = rundir.processor_dir(path)
    if folder is None:
        return current
    from_hf = checkpoint.locate(path).kind == "hf"
    kept = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(kept):
        if not from_hf:
            return current
        raise ValueError(f"init_from {path} has no tokenizer.json (found {sorted(os.listdir(folder))}): save the "
                         f"tokenizer there with transformers (AutoProcessor.from_pretrained(...).save_pretrained), "
                         f"or --set tokenizer=PATH")
    if from_hf:
        return folder
    with open(kept, encoding="utf-8") as f:
        return current if f.read() == tokenizer_json(current) else folder


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
            value = float(text)
            if not math.isfinite(value):       # nan / inf would pass every range check downstream
                raise ValueError("not a finite number")
            return value
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
