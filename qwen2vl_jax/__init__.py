"""qwen2vl_jax: Qwen2-VL pretraining in JAX/Flax.

The public API, importable from the package top (`import qwen2vl_jax as q`):

    q.load_pretrained(path) -> (ModelConfig, params)         a Hugging Face Qwen2-VL folder, a training run
                                                              (RUN, RUN/checkpoints/STEP) or a converted one
    q.save_pretrained(cfg, params, path)                      the same layout, loadable by transformers
    q.forward(cfg, params, input_ids, ...) -> logits          transformers-layout inputs
    q.get_rope_index(cfg, input_ids, image_grid_thw, ...)     M-RoPE position ids and deltas
    q.preprocess_images(images) / q.preprocess_video(frames)  == Qwen2VLImageProcessor
    q.load_tokenizer(name_or_path)                            "embedded", "qwen2" or a tokenizer.json
    q.generate(cfg, params, prompts, max_new_tokens=...)      greedy or sampled decoding with a KV cache

Layout (each floor imports only the floors below it):
    model/  the network: config, layers, rope, mrope, attention, vision tower, decoder, model, kv cache, hf
    data/   media preprocessing, tokenizer, sample formats, packing, the Grain pipeline
    train/  sharding, optimizer, train step, checkpoints, metrics, memory and FLOP accounting, trainer
    eval/   held-out evaluation, generation, scaling-law fits
The names resolve lazily, so `import qwen2vl_jax.data.synthetic` does not import jax.
"""
from __future__ import annotations

import importlib

_API = {
    "load_pretrained": "qwen2vl_jax.train.rundir",      # every checkpoint form (checkpoint.locate)
    "save_pretrained": "qwen2vl_jax.model.hf",
    "forward": "qwen2vl_jax.model.model",
    "get_rope_index": "qwen2vl_jax.model.mrope",
    "preprocess_images": "qwen2vl_jax.data.media",
    "preprocess_video": "qwen2vl_jax.data.media",
    "load_tokenizer": "qwen2vl_jax.data.tokenizer",
    "generate": "qwen2vl_jax.eval.generate",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qwen2vl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
