"""Training: mesh and sharding, optimizer, train step, checkpoints, metrics, memory and FLOP accounting."""
