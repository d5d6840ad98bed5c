"""The network: config, shared layers, RoPE / M-RoPE, attention, vision tower, decoder, model, HF I/O."""
