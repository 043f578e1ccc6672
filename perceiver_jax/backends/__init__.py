"""Optional platform backends of `perceiver_jax.ops` (imported by ops only)."""
