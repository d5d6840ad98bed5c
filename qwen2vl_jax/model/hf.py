"""Hugging Face <-> qwen2vl_jax weight conversion.

The parameter tree is the contract in docs/architecture.md ("Parameters"). Every HF tensor maps to exactly one
leaf (per layer for the stacked blocks) through one `_Spec` row of `_specs(cfg)`:

  HF name (on disk)                                  HF shape           ours                             our shape
  visual.patch_embed.proj.weight                     [E, C, T, p, p]    visual/patch_embed/kernel        [C*T*p*p, E]
  visual.blocks.{i}.norm{1,2}.{weight,bias}          [E]                visual/blocks/norm{1,2}/...      [L, E]
  visual.blocks.{i}.attn.qkv.weight                  [3E, E]            visual/blocks/attn/qkv/kernel    [L, E, 3, H, hd]
  visual.blocks.{i}.attn.qkv.bias                    [3E]               .../qkv/bias                     [L, 3, H, hd]
  visual.blocks.{i}.attn.proj.{weight,bias}          [E, E], [E]        .../proj/{kernel,bias}           [L, H, hd, E], [L, E]
  visual.blocks.{i}.mlp.fc1 / fc2                    [M, E] / [E, M]    .../mlp/fc1 / fc2 kernel         [L, E, M] / [L, M, E]
  visual.merger.ln_q.{weight,bias}                   [E]                visual/merger/ln_q               [E]
  visual.merger.mlp.0 / mlp.2                        [4E,4E] / [D,4E]   visual/merger/mlp_0 / mlp_2      [4E, 4E] / [4E, D]
  model.embed_tokens.weight                          [V, D]             decoder/embed_tokens/embedding   [V, D]
  model.layers.{i}.self_attn.{q,k,v}_proj.weight     [H*hd, D]          decoder/layers/self_attn/...     [L, D, H, hd]
  model.layers.{i}.self_attn.o_proj.weight           [D, Hq*hd]         .../o_proj/kernel                [L, Hq, hd, D]
  model.layers.{i}.mlp.{gate,up,down}_proj.weight    [I, D] / [D, I]    decoder/layers/mlp/...           [L, D, I] / [L, I, D]
  model.layers.{i}.{input,post_attention}_layernorm  [D]                decoder/layers/...               [L, D]
  model.norm.weight                                  [D]                decoder/norm/scale               [D]
  lm_head.weight                                     [V, D]             lm_head/kernel                   [D, V] (absent if tied)

Torch `Linear` weights are `[out, in]`; our kernels are `x @ kernel`, i.e. the transpose reshaped to
`(*in_dims, *out_dims)`. The patch-embed Conv3d has stride == kernel, so it is the matmul
`pixels[N, 1176] @ W.reshape(E, 1176).T`, flattened in the processor's (C, T, h, w) column order.

transformers 4.57 holds the model as `model.language_model.*` / `model.visual.*` in memory and maps them
back to `model.*` / `visual.*` when saving (`_checkpoint_conversion_mapping`); we read both and write the
on-disk form.

Orbax layout written by `save_jax_checkpoint` (what `launch/convert.py --hf_to_jax` produces and what
training can start from):

  DST/
    model_config.json   dataclasses.asdict(ModelConfig) (vision nested); `model_config_from_dict` rebuilds it
    params/             orbax StandardCheckpointer checkpoint of the params tree above
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from qwen2vl_jax.model.config import ModelConfig, VisionConfig, from_hf_config, matching_preset, to_hf_config

Progress = Callable[[str], None] | None

# ----------------------------------------------------------------------------------------------
# The name/shape table


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One HF tensor family <-> one leaf of our tree.

    hf:        on-disk name; contains "{i}" for per-layer tensors, which are stacked on our leading axis.
    path:      keys into our params tree.
    hf_shape:  shape of one HF tensor.
    our_shape: shape of our leaf for one layer (without the stacked L axis).
    transpose: HF tensor is a torch Linear/Conv weight [out, *in]: ours = W.reshape(out, -1).T reshaped.
    """
    hf: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]
    transpose: bool = False
    num_layers: int = 0  # > 0 for stacked per-layer tensors

    @property
    def group(self) -> str:
        return self.hf.replace(".{i}", ".*")

    def hf_names(self) -> list[str]:
        if self.num_layers:
            return [self.hf.format(i=i) for i in range(self.num_layers)]
        return [self.hf]

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        return ((self.num_layers,) if self.num_layers else ()) + self.our_shape

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        """One HF tensor (hf_shape) -> one layer of our leaf (our_shape)."""
        if self.transpose:
            w = w.reshape(self.hf_shape[0], -1).T
        return w.reshape(self.our_shape)

    def to_hf(self, k: np.ndarray) -> np.ndarray:
        """One layer of our leaf (our_shape) -> one HF tensor (hf_shape); exact inverse of to_ours."""
        if self.transpose:
            k = k.reshape(-1, self.hf_shape[0]).T
        return np.ascontiguousarray(k.reshape(self.hf_shape))


def _specs(cfg: ModelConfig) -> list[_Spec]:
    v = cfg.vision
    E, H, hd, M, P = v.embed_dim, v.num_heads, v.head_dim, v.mlp_dim, v.patch_dim
    ME = v.merger_hidden
    D, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    Hq, Hkv, dh, L, Lv = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.num_hidden_layers, v.depth)

    def vis(name, path, hf_shape, our_shape, transpose=False):
        return _Spec(f"visual.blocks.{{i}}.{name}", ("visual", "blocks", *path), hf_shape, our_shape,
                     transpose, Lv)

    def dec(name, path, hf_shape, our_shape, transpose=False):
        return _Spec(f"model.layers.{{i}}.{name}", ("decoder", "layers", *path), hf_shape, our_shape,
                     transpose, L)

    specs = [
        _Spec("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"),
              (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), (P, E), True),
        vis("norm1.weight", ("norm1", "scale"), (E,), (E,)),
        vis("norm1.bias", ("norm1", "bias"), (E,), (E,)),
        vis("norm2.weight", ("norm2", "scale"), (E,), (E,)),
        vis("norm2.bias", ("norm2", "bias"), (E,), (E,)),
        vis("attn.qkv.weight", ("attn", "qkv", "kernel"), (3 * E, E), (E, 3, H, hd), True),
        vis("attn.qkv.bias", ("attn", "qkv", "bias"), (3 * E,), (3, H, hd)),
        vis("attn.proj.weight", ("attn", "proj", "kernel"), (E, E), (H, hd, E), True),
        vis("attn.proj.bias", ("attn", "proj", "bias"), (E,), (E,)),
        vis("mlp.fc1.weight", ("mlp", "fc1", "kernel"), (M, E), (E, M), True),
        vis("mlp.fc1.bias", ("mlp", "fc1", "bias"), (M,), (M,)),
        vis("mlp.fc2.weight", ("mlp", "fc2", "kernel"), (E, M), (M, E), True),
        vis("mlp.fc2.bias", ("mlp", "fc2", "bias"), (E,), (E,)),
        _Spec("visual.merger.ln_q.weight", ("visual", "merger", "ln_q", "scale"), (E,), (E,)),
        _Spec("visual.merger.ln_q.bias", ("visual", "merger", "ln_q", "bias"), (E,), (E,)),
        _Spec("visual.merger.mlp.0.weight", ("visual", "merger", "mlp_0", "kernel"), (ME, ME), (ME, ME), True),
        _Spec("visual.merger.mlp.0.bias", ("visual", "merger", "mlp_0", "bias"), (ME,), (ME,)),
        _Spec("visual.merger.mlp.2.weight", ("visual", "merger", "mlp_2", "kernel"), (D, ME), (ME, D), True),
        _Spec("visual.merger.mlp.2.bias", ("visual", "merger", "mlp_2", "bias"), (D,), (D,)),
        _Spec("model.embed_tokens.weight", ("decoder", "embed_tokens", "embedding"), (V, D), (V, D)),
        dec("input_layernorm.weight", ("input_layernorm", "scale"), (D,), (D,)),
        dec("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (D,), (D,)),
        dec("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (Hq * dh, D), (D, Hq, dh), True),
        dec("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), (Hq * dh,), (Hq, dh)),
        dec("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (Hkv * dh, D), (D, Hkv, dh), True),
        dec("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), (Hkv * dh,), (Hkv, dh)),
        dec("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (Hkv * dh, D), (D, Hkv, dh), True),
        dec("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), (Hkv * dh,), (Hkv, dh)),
        dec("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (D, Hq * dh), (Hq, dh, D), True),
        dec("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (I, D), (D, I), True),
        dec("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (I, D), (D, I), True),
        dec("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (D, I), (I, D), True),
        _Spec("model.norm.weight", ("decoder", "norm", "scale"), (D,), (D,)),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(_Spec("lm_head.weight", ("lm_head", "kernel"), (V, D), (D, V), True))
    return specs


LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def param_shapes(cfg: ModelConfig) -> dict:
    """The contract tree with each leaf's shape (tuple) instead of an array."""
    tree: dict = {}
    for s in _specs(cfg):
        _set(tree, s.path, s.leaf_shape)
    return tree


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """On-disk HF tensor name -> shape, in save order (what `save_pretrained` writes for `cfg`)."""
    return {n: s.hf_shape for s in _specs(cfg) for n in s.hf_names()}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            raise ValueError(f"params lack {'/'.join(path)}")
        tree = tree[k]
    return tree


def _leaf_paths(tree: Mapping, prefix=()) -> Iterator[tuple[str, ...]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaf_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


# ----------------------------------------------------------------------------------------------
# dtypes

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}

_NP_NAMES = {v: k for k, v in _NP_DTYPES.items()}


def np_dtype(name: str | np.dtype) -> np.dtype:
    if isinstance(name, str):
        if name not in _NP_DTYPES:
            raise ValueError(f"dtype {name!r} unsupported; valid: {', '.join(_NP_DTYPES)}")
        return _NP_DTYPES[name]
    return np.dtype(name)


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return x if x.dtype == dtype else x.astype(dtype)


# ----------------------------------------------------------------------------------------------
# HF state dict <-> params

_IN_MEMORY = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))


def on_disk_name(name: str) -> str:
    """4.57 in-memory name (`model.language_model.x`, `model.visual.x`) -> on-disk name (`model.x`, `visual.x`)."""
    for pat, repl in _IN_MEMORY:
        if pat.match(name):
            return pat.sub(repl, name, count=1)
    return name


def _normalize_names(names) -> dict[str, str]:
    """on-disk name -> the key actually present in the state dict."""
    out: dict[str, str] = {}
    for key in names:
        disk = on_disk_name(key)
        if disk in out:
            raise ValueError(f"state dict holds {disk!r} twice: as {out[disk]!r} and {key!r}")
        out[disk] = key
    return out


def to_numpy(x) -> np.ndarray:
    """numpy / jax arrays as they are; torch tensors (bf16 included, which `.numpy()` refuses) without a copy
    where possible. torch is not imported here."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import torch

            return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def params_from_hf_state_dict(cfg: ModelConfig, sd: Mapping[str, Any], progress: Progress = None) -> dict:
    """HF Qwen2-VL tensors (on-disk or 4.57 in-memory names; numpy, jax or torch tensors)
    -> the contract params tree as numpy arrays in `cfg.param_dtype`.

    `sd` may be lazy (a Mapping that reads on `__getitem__`): each tensor is read once, converted and
    written into the preallocated stacked leaf, so peak memory is the output plus one tensor.
    Raises ValueError listing unexpected / missing tensors, or naming a tensor with a wrong shape.
    """
    dtype = np_dtype(cfg.param_dtype)
    names = _normalize_names(sd.keys())
    specs = _specs(cfg)
    expected = {n for s in specs for n in s.hf_names()}
    extra = sorted(set(names) - expected - ({LM_HEAD} if cfg.tie_word_embeddings else set()))
    missing = sorted(expected - set(names))
    if extra or missing:
        raise ValueError(f"HF state dict does not match config {cfg.name!r}: "
                         f"unexpected tensors {extra or 'none'}; missing tensors {missing or 'none'}")

    def read(name: str, spec: _Spec) -> np.ndarray:
        w = to_numpy(sd[names[name]])
        if tuple(w.shape) != spec.hf_shape:
            raise ValueError(f"tensor {names[name]!r} has shape {tuple(w.shape)}, expected {spec.hf_shape} "
                             f"for config {cfg.name!r}")
        return w

    params: dict = {}
    for spec in specs:
        if progress:
            progress(f"hf->jax {spec.group} {spec.hf_shape} -> {'/'.join(spec.path)} {spec.leaf_shape}")
        if spec.num_layers:
            leaf = np.empty(spec.leaf_shape, dtype)
            for i, name in enumerate(spec.hf_names()):
                leaf[i] = spec.to_ours(read(name, spec))
        else:
            # always a fresh array: never a view of the caller's (e.g. torch-owned) memory
            leaf = np.array(spec.to_ours(read(spec.hf, spec)), dtype=dtype, order="C")
        _set(params, spec.path, leaf)
    if cfg.tie_word_embeddings and LM_HEAD in names:
        head = to_numpy(sd[names[LM_HEAD]])
        emb = to_numpy(sd[names[EMBED]])
        if head.shape != emb.shape or not np.array_equal(head, emb):
            raise ValueError(f"config {cfg.name!r} ties word embeddings but {names[LM_HEAD]!r} "
                             f"{tuple(head.shape)} differs from {names[EMBED]!r} {tuple(emb.shape)}")
    return params


def _check_params(cfg: ModelConfig, params: Mapping) -> list[_Spec]:
    specs = _specs(cfg)
    want = {s.path: s.leaf_shape for s in specs}
    have = set(_leaf_paths(params))
    extra = sorted("/".join(p) for p in have - set(want))
    missing = sorted("/".join(p) for p in set(want) - have)
    if extra or missing:
        raise ValueError(f"params do not match config {cfg.name!r}: unexpected leaves {extra or 'none'}; "
                         f"missing leaves {missing or 'none'}")
    for s in specs:
        shape = tuple(_get(params, s.path).shape)
        if shape != s.leaf_shape:
            raise ValueError(f"param {'/'.join(s.path)} has shape {shape}, expected {s.leaf_shape}")
    return specs


def iter_hf_tensors(cfg: ModelConfig, params: Mapping, dtype=None,
                    progress: Progress = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (on-disk HF name, numpy tensor) one at a time, in `hf_tensor_shapes` order.
    dtype None keeps each leaf's dtype. Stacked leaves are sliced per layer (jax arrays included),
    so only one HF tensor is materialized on the host at a time."""
    target = None if dtype is None else np_dtype(dtype)
    for spec in _check_params(cfg, params):
        leaf = _get(params, spec.path)
        if progress:
            progress(f"jax->hf {'/'.join(spec.path)} {spec.leaf_shape} -> {spec.group} {spec.hf_shape}")
        parts = (leaf[i] for i in range(spec.num_layers)) if spec.num_layers else iter([leaf])
        for name, part in zip(spec.hf_names(), parts):
            w = spec.to_hf(np.asarray(part))
            yield name, (w if target is None else _cast(w, target))


def params_to_hf_state_dict(cfg: ModelConfig, params: Mapping, dtype=None,
                            progress: Progress = None) -> dict[str, np.ndarray]:
    """Exact inverse of `params_from_hf_state_dict`, with on-disk names (no lm_head when tied).
    Every tensor is a fresh array (no view of `params`)."""
    return {name: np.array(w) for name, w in iter_hf_tensors(cfg, params, dtype, progress)}


# ----------------------------------------------------------------------------------------------
# safetensors files, read and written tensor by tensor (no torch; bf16 through ml_dtypes)

_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
              "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
              "BOOL": np.dtype(np.bool_)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    """-> ({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} > file size {size})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsReader(Mapping):
    """Lazy read-only view of one or more safetensors files: `reader[name]` reads that tensor (a copy)."""

    def __init__(self, files: list[str]):
        self._where: dict[str, tuple[str, dict, int]] = {}
        for path in files:
            header, start = _read_safetensors_header(path)
            for name, info in header.items():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} is in both {self._where[name][0]} and {path}")
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {info['dtype']}")
                self._where[name] = (path, info, start)

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, start = self._where[name]
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} in {path}: {end - begin} bytes for shape {shape} {info['dtype']}")
        with open(path, "rb") as f:
            f.seek(start + begin)
            buf = f.read(end - begin)
        return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def dtype_of(self, name: str) -> np.dtype:
        return _ST_DTYPES[self._where[name][1]["dtype"]]


def _write_safetensors(path: str, plan: list[tuple[str, tuple[int, ...], np.dtype]],
                       tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    """Writes the planned tensors (name, shape, dtype), pulling each from `tensors` in plan order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in plan:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in plan:
            got, w = next(tensors)
            if got != name or tuple(w.shape) != shape or w.dtype != dtype:
                raise AssertionError(f"planned {name} {shape} {dtype}, got {got} {w.shape} {w.dtype}")
            f.write(np.ascontiguousarray(w).tobytes())


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '100KB', 4096 (bytes) ... (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size).upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"max_shard_size {size!r}; expected an int or e.g. '5GB', '500MB', '2GiB'")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(m.group(1)) * units[m.group(2)])


# ----------------------------------------------------------------------------------------------
# transformers folders

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {absent}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                            f"(found: {sorted(os.listdir(path))}); only safetensors checkpoints are supported")


def read_hf_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} has no {CONFIG_FILE}")
    with open(cfg_path) as f:
        hf = json.load(f)
    if hf.get("model_type") != "qwen2_vl":
        raise ValueError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not 'qwen2_vl'")
    return hf


def is_hf_folder(path: str) -> bool:
    """A folder as transformers' save_pretrained writes it (config.json, no qwen2vl_jax model_config.json)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and not os.path.exists(os.path.join(path, MODEL_CONFIG_FILE))


def read_model_config(path: str, **execution_overrides) -> ModelConfig:
    """The ModelConfig of a transformers Qwen2-VL folder's config.json, named by its content (the preset with
    its architecture, e.g. "2b", else "custom"; never the folder's name, which a copy or a rename changes)."""
    cfg = from_hf_config(read_hf_config(path), **execution_overrides)
    return cfg.replace(name=matching_preset(cfg) or "custom")


def load_pretrained(path: str, progress: Progress = None, **execution_overrides) -> tuple[ModelConfig, dict]:
    """A transformers Qwen2-VL folder (config.json + model.safetensors, or sharded shards + index;
    f32/bf16/f16) -> (cfg, numpy params in cfg.param_dtype). Execution fields (dtype, param_dtype,
    attention_impl, ...) come from `execution_overrides`, else the ModelConfig defaults.
    Tensors are read one at a time."""
    cfg = read_model_config(path, **execution_overrides)
    reader = SafetensorsReader(_weight_files(path))
    return cfg, params_from_hf_state_dict(cfg, reader, progress=progress)


# What a Qwen2-VL folder holds besides the model (tokenizer, image/video processor, chat template): carried
# from a fine-tune's starting folder through the run to the converted result, so that folder loads with
# AutoProcessor as the original did.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


# transformers' AutoProcessor builds Qwen2-VL's video processor too, which imports torchvision (AutoTokenizer and
# AutoImageProcessor do not): the torchvision release built for requirements-test.txt's torch==2.13.0
TORCHVISION_PIN = "torchvision==0.28.0"


def copy_processor_files(src: str, dst: str) -> list[str]:
    """Copies the PROCESSOR_FILES present in `src` into `dst` (created); returns their names."""
    names = [n for n in PROCESSOR_FILES if os.path.isfile(os.path.join(src, n))]
    if names:
        os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
    return names


def _generation_config(cfg: ModelConfig) -> dict:
    eos = [cfg.eos_token_id] + ([cfg.pad_token_id] if cfg.pad_token_id != cfg.eos_token_id else [])
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
            "do_sample": False}


def save_pretrained(cfg: ModelConfig, params: Mapping, path: str, max_shard_size: int | str = "5GB",
                    dtype: str | None = None, progress: Progress = None) -> list[str]:
    """Writes a folder that `Qwen2VLForConditionalGeneration.from_pretrained(path)` loads: config.json,
    generation_config.json and model.safetensors, or model-0000i-of-0000n.safetensors + index when the
    tensors exceed `max_shard_size` (a shard holds at least one tensor). dtype None keeps each leaf's dtype.
    Previous weight files in `path` are removed. Returns the weight file names written."""
    specs = _check_params(cfg, params)
    target = None if dtype is None else np_dtype(dtype)
    plan: list[tuple[str, tuple[int, ...], np.dtype]] = []
    for s in specs:
        leaf_dtype = target or np.dtype(_get(params, s.path).dtype)
        if leaf_dtype not in _ST_NAMES:
            raise ValueError(f"param {'/'.join(s.path)} has dtype {leaf_dtype}, not storable in safetensors")
        plan += [(n, s.hf_shape, leaf_dtype) for n in s.hf_names()]
    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):
        if old == INDEX_FILE or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old):
            os.remove(os.path.join(path, old))
    dtype_names = {_NP_NAMES.get(d, "float32") for _, _, d in plan}
    hf_cfg = dict(to_hf_config(cfg), torch_dtype=dtype_names.pop() if len(dtype_names) == 1 else "float32")
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    with open(os.path.join(path, GENERATION_CONFIG_FILE), "w") as f:
        json.dump(_generation_config(cfg), f, indent=2)
    tensors = iter_hf_tensors(cfg, params, dtype, progress)
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(files, shards):
        _write_safetensors(os.path.join(path, file), shard, tensors)
    if n > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * d.itemsize for _, s, d in plan)},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name, _, _ in shard}}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return files


# ----------------------------------------------------------------------------------------------
# Our orbax checkpoint: DST/model_config.json + DST/params/ (see the module docstring)

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of `model_config_to_dict` (JSON lists back to tuples); unknown keys raise ValueError."""
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    vfields = {f.name for f in dataclasses.fields(VisionConfig)}
    vision = dict(d.pop("vision", {}))
    bad = sorted(set(d) - fields) + [f"vision.{k}" for k in sorted(set(vision) - vfields)]
    if bad:
        raise ValueError(f"unknown model config keys: {', '.join(bad)}")
    if "mrope_section" in d:
        d["mrope_section"] = tuple(d["mrope_section"])
    return ModelConfig(**d, vision=VisionConfig(**vision))


def save_jax_checkpoint(cfg: ModelConfig, params: Mapping, path: str, overwrite: bool = False) -> None:
    """Writes DST/model_config.json and DST/params (orbax StandardCheckpointer). Leaves may be numpy or
    (sharded) jax arrays."""
    import orbax.checkpoint as ocp

    _check_params(cfg, params)
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, PARAMS_DIR)):
        if not overwrite:
            raise FileExistsError(f"{path}/{PARAMS_DIR} exists; pass overwrite=True to replace it")
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), params, force=overwrite)
        ckptr.wait_until_finished()
    with open(os.path.join(path, MODEL_CONFIG_FILE), "w") as f:
        json.dump(model_config_to_dict(cfg), f, indent=2)


def load_jax_checkpoint(path: str, shardings: Any = None) -> tuple[ModelConfig, dict]:
    """Reads a `save_jax_checkpoint` folder -> (cfg, params). Without `shardings` the leaves are host
    numpy arrays; with a tree of `jax.sharding.Sharding` (params' structure) they are jax arrays placed so."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    cfg_file = os.path.join(path, MODEL_CONFIG_FILE)
    if not os.path.exists(cfg_file) or not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        raise FileNotFoundError(f"{path!r} is not a qwen2vl_jax checkpoint "
                                f"(needs {MODEL_CONFIG_FILE} and {PARAMS_DIR}/)")
    with open(cfg_file) as f:
        cfg = model_config_from_dict(json.load(f))
    dtype = np_dtype(cfg.param_dtype)
    shapes = param_shapes(cfg)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    if shardings is None:
        target = jax.tree.map(lambda s: np.zeros(s, dtype), shapes, is_leaf=is_shape)
    else:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh), shapes, shardings,
                              is_leaf=is_shape)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_DIR), target)
    _check_params(cfg, params)
    return cfg, params
