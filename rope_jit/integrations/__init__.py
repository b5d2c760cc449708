"""rope_jit inside other libraries' models: ``rope_jit.integrations.transformers`` puts its
kernels into HuggingFace transformers models. Nothing is imported until asked for."""
