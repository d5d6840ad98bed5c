"""Model configuration: frozen dataclasses for the Qwen2-VL vision tower and decoder.

Architecture fields mirror the released `config.json` files (see docs/architecture.md, "Model configs");
execution fields (dtype, attention backend, remat, scan) are ours and never written to HF configs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# The 14 Qwen2-VL added tokens, in id order starting at `ModelConfig.special_token_base`
# (151643 for the real tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

ATTENTION_IMPLS = ("xla", "cudnn", "splash", "block_sparse", "auto")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "dots_attention", "minimal")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    # HF `vision_config.hidden_size`: the merger's OUTPUT width (= the decoder's hidden size).
    out_hidden_size: int = 3584
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch row: C * T * p * p (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token (4)."""
        return self.spatial_merge_size**2

    @property
    def merger_hidden(self) -> int:
        return self.embed_dim * self.merge_unit


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Token ids. The 14 special tokens are consecutive from `special_token_base` in SPECIAL_TOKENS order.
    special_token_base: int = 151643
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    # ---- execution (not part of the HF config) ----
    dtype: str = "float32"          # activation / compute dtype
    param_dtype: str = "float32"    # master weights
    attention_impl: str = "xla"     # one of ATTENTION_IMPLS
    remat_policy: str = "none"      # one of REMAT_POLICIES
    scan_layers: bool = True
    # block sizes of the TPU attention kernels (square blocks), per layer kind; 0 = the kernels' default,
    # the largest of (512, 256, 128) dividing the length (block_sparse_attention.choose_block prices them)
    attention_block_vision: int = 0
    attention_block_decoder: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision.out_hidden_size {self.vision.out_hidden_size} != hidden_size {self.hidden_size}")
        if self.vision.head_dim % 4:
            raise ValueError(f"vision head_dim {self.vision.head_dim} must be divisible by 4 (2-D RoPE)")
        if self.special_token_base + len(SPECIAL_TOKENS) > self.vocab_size:
            raise ValueError(f"special tokens {self.special_token_base}..+{len(SPECIAL_TOKENS)} exceed vocab {self.vocab_size}")
        for field in ("attention_block_vision", "attention_block_decoder"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field}={getattr(self, field)}; valid: 0 (the kernels' default) or a block "
                                 f"size that divides the rows (multiples of 128 on TPU)")
        for field, allowed in (("attention_impl", ATTENTION_IMPLS), ("remat_policy", REMAT_POLICIES),
                               ("dtype", DTYPES), ("param_dtype", DTYPES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r}; valid: {', '.join(allowed)}")

    # ---- derived ----
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def token_id(self, token: str) -> int:
        return self.special_token_base + SPECIAL_TOKENS.index(token)

    @property
    def pad_token_id(self) -> int:
        return self.token_id("<|endoftext|>")

    @property
    def vision_start_token_id(self) -> int:
        return self.token_id("<|vision_start|>")

    @property
    def vision_end_token_id(self) -> int:
        return self.token_id("<|vision_end|>")

    @property
    def vision_token_id(self) -> int:
        return self.token_id("<|vision_pad|>")

    @property
    def image_token_id(self) -> int:
        return self.token_id("<|image_pad|>")

    @property
    def video_token_id(self) -> int:
        return self.token_id("<|video_pad|>")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Presets. Values from the released config.json files of Qwen/Qwen2-VL-{2B,7B,72B}.

def _vision(out: int, **kw) -> VisionConfig:
    return VisionConfig(out_hidden_size=out, **kw)


def qwen2vl_2b() -> ModelConfig:
    return ModelConfig(name="2b", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       tie_word_embeddings=True, vision=_vision(1536))


def qwen2vl_7b() -> ModelConfig:
    return ModelConfig(name="7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, vision=_vision(3584))


def qwen2vl_72b() -> ModelConfig:
    return ModelConfig(name="72b", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       tie_word_embeddings=False, vision=_vision(8192))


# The embedded tokenizer (qwen2vl_jax/assets/tokenizer.json) has TINY_TEXT_VOCAB byte-level BPE tokens
# followed by the 14 special tokens; the embedding is padded to TINY_VOCAB rows, as Qwen pads 151657 -> 151936.
TINY_TEXT_VOCAB = 2032
TINY_VOCAB = 2048


def test_config() -> ModelConfig:
    """Smallest config for unit tests (milliseconds per forward on CPU)."""
    return ModelConfig(name="test", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       mrope_section=(2, 3, 3), max_position_embeddings=4096, tie_word_embeddings=False,
                       special_token_base=TINY_TEXT_VOCAB, bos_token_id=TINY_TEXT_VOCAB,
                       eos_token_id=TINY_TEXT_VOCAB + 2,
                       vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, out_hidden_size=64))


def tiny_config() -> ModelConfig:
    """CPU-trainable model for the embedded-data demo and the three-stage pipeline (~7M params)."""
    return ModelConfig(name="tiny", vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=704,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       mrope_section=(8, 12, 12), max_position_embeddings=4096, tie_word_embeddings=True,
                       special_token_base=TINY_TEXT_VOCAB, bos_token_id=TINY_TEXT_VOCAB,
                       eos_token_id=TINY_TEXT_VOCAB + 2,
                       vision=VisionConfig(depth=4, embed_dim=128, num_heads=4, out_hidden_size=256))


PRESETS = {"test": test_config, "tiny": tiny_config, "2b": qwen2vl_2b, "7b": qwen2vl_7b, "72b": qwen2vl_72b}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


# Fields that say how a model runs, not what it is: two configs that differ only here hold the same parameters.
EXECUTION_FIELDS = ("name", "dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers",
                    "attention_block_vision", "attention_block_decoder")


# Generation settings: a base and an instruct checkpoint of one architecture differ here (which id ends a turn).
GENERATION_FIELDS = ("bos_token_id", "eos_token_id")


def architecture_diff(a: ModelConfig, b: ModelConfig) -> list[tuple[str, Any, Any]]:
    """[(field, a's value, b's value)] of the architecture fields (vision.* included; not the execution or
    generation fields) where a and b differ."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in EXECUTION_FIELDS + GENERATION_FIELDS:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name == "vision":
            out += [(f"vision.{g.name}", getattr(va, g.name), getattr(vb, g.name))
                    for g in dataclasses.fields(VisionConfig) if getattr(va, g.name) != getattr(vb, g.name)]
        elif va != vb:
            out.append((f.name, va, vb))
    return out


def matching_preset(cfg: ModelConfig) -> str | None:
    """The preset with `cfg`'s architecture (e.g. "2b" for Qwen2-VL-2B's config.json), else None."""
    return next((name for name, make in PRESETS.items() if not architecture_diff(cfg, make())), None)


# ----------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig

# Keys that appear in real Qwen2-VL config.json files (4.45 .. 5.x) and carry nothing we model.
_IGNORED_TOP = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "use_cache", "initializer_range", "attention_dropout", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "hidden_act", "vision_token_id", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
    "rope_scaling", "rope_parameters", "rope_theta", "text_config", "vision_config", "tie_word_embeddings",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "quantization_config",
    "_attn_implementation_autoset", "id2label", "label2id", "tokenizer_class", "chunk_size_feed_forward",
    "use_return_dict", "problem_type", "task_specific_params", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "add_cross_attention", "tf_legacy_loss", "pruned_heads", "torchscript",
    "cross_attention_hidden_size", "is_decoder", "tie_encoder_decoder", "base_config_key", "keys_to_ignore_at_inference",
    # generic PretrainedConfig generation defaults written by `to_dict()` / `save_pretrained`
    "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values",
    "repetition_penalty", "return_dict_in_generate", "suppress_tokens", "temperature", "top_k", "top_p",
    "typical_p", "use_bfloat16",
}
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")
_IGNORED_VISION = _IGNORED_TOP - {"hidden_act", "hidden_size"} | {"model_type", "initializer_range", "torch_dtype", "dtype", "_name_or_path", "in_chans",
                   "spatial_patch_size", "transformers_version", "architectures", "base_config_key"}
_VISION_FIELDS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "hidden_act", "in_channels", "patch_size",
                  "temporal_patch_size", "spatial_merge_size")


def _unknown(keys, known: set, where: str):
    bad = sorted(k for k in keys if k not in known)
    if bad:
        raise ValueError(f"unknown {where} config keys: {', '.join(bad)}")


def from_hf_config(hf: Mapping[str, Any], name: str = "hf", **execution) -> ModelConfig:
    """Builds a ModelConfig from a transformers Qwen2-VL `config.json` dict (flat 4.45 form,
    nested `text_config` 4.57 form, or 5.x `rope_parameters`). Unknown keys raise ValueError."""
    hf = dict(hf)
    if hf.get("model_type", "qwen2_vl") != "qwen2_vl":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not qwen2_vl")
    text = dict(hf.get("text_config") or {})
    merged = {**text, **{k: v for k, v in hf.items() if k != "text_config"}}
    _unknown(hf.keys(), _IGNORED_TOP | set(_TEXT_FIELDS), "top-level")
    _unknown(text.keys(), _IGNORED_TOP | set(_TEXT_FIELDS), "text_config")
    missing = [k for k in _TEXT_FIELDS if k not in merged]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    rope = merged.get("rope_scaling") or merged.get("rope_parameters") or {}
    section = tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24)))
    theta = float(merged.get("rope_theta", rope.get("rope_theta", 1_000_000.0)))
    act = merged.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"decoder hidden_act {act!r} unsupported (Qwen2-VL uses silu)")
    if merged.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (no Qwen2-VL checkpoint uses it)")
    vis = dict(hf.get("vision_config") or {})
    _unknown(vis.keys(), _IGNORED_VISION | set(_VISION_FIELDS) | {"hidden_size"}, "vision_config")
    vkw = {k: vis[k] for k in _VISION_FIELDS if k in vis}
    if "in_channels" not in vkw and "in_chans" in vis:
        vkw["in_channels"] = vis["in_chans"]
    if "patch_size" not in vkw and "spatial_patch_size" in vis:
        vkw["patch_size"] = vis["spatial_patch_size"]
    vision = VisionConfig(out_hidden_size=int(vis.get("hidden_size", 3584)), **vkw)
    base = int(merged.get("image_token_id", 151655)) - SPECIAL_TOKENS.index("<|image_pad|>")
    for key, tok in (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                     ("video_token_id", "<|video_pad|>"), ("vision_token_id", "<|vision_pad|>")):
        if key in merged and int(merged[key]) != base + SPECIAL_TOKENS.index(tok):
            raise ValueError(f"{key}={merged[key]} breaks the consecutive special-token layout (base {base})")
    eos = merged.get("eos_token_id", base + 2)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    return ModelConfig(
        name=name, **{k: (float if k == "rms_norm_eps" else int)(merged[k]) for k in _TEXT_FIELDS},
        rope_theta=theta, mrope_section=section,
        tie_word_embeddings=bool(merged.get("tie_word_embeddings", False)),
        special_token_base=base, bos_token_id=int(merged.get("bos_token_id", base)), eos_token_id=int(eos),
        vision=vision, **execution)


def to_hf_config(cfg: ModelConfig) -> dict:
    """The config.json dict that transformers' Qwen2VLConfig loads (flat text keys, nested vision)."""
    v = cfg.vision
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **{k: getattr(cfg, k) for k in _TEXT_FIELDS},
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": cfg.num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "vision_token_id": cfg.vision_token_id,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "torch_dtype": "float32" if cfg.param_dtype == "float32" else "bfloat16",
        "vision_config": {
            "depth": v.depth, "embed_dim": v.embed_dim, "hidden_size": v.out_hidden_size,
            "hidden_act": v.hidden_act, "mlp_ratio": v.mlp_ratio, "num_heads": v.num_heads,
            "in_channels": v.in_channels, "in_chans": v.in_channels, "patch_size": v.patch_size,
            "spatial_patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        },
    }
