"""The optional CPU backend of `perceiver_jax.ops` (docs/cpu_backend.md).

  backend.py    the ops for the 'cpu' platform; registers them on import
  gradients.py  custom VJPs that XLA:CPU compiles into faster programs
  matmul.py     batched float32 products through OpenBLAS (FFI)
  attention.py  fused softmax attention (FFI), dense or on split byte arrays
  native.py     builds, caches and loads the kernels' shared library
  csrc/         the FFI handlers (C++)

Importing this package loads nothing; `backend` builds the library.
"""
