"""Hand-written kernels for what XLA compiles slowly (see each module)."""
