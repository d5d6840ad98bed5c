"""The network: config, shared layers, vision grids, RoPE / M-RoPE, attention, vision tower, decoder, model
(wiring, init, packed forward), host-side input preparation, KV cache, HF I/O."""
