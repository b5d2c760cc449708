"""CUDA source templates of rope_jit (shipped in the wheel as rope_jit/kernels)."""
