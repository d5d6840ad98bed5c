"""qwen2vl_jax: Qwen2-VL pretraining in JAX/Flax."""
