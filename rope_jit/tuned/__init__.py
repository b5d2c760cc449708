"""Launch knobs measured per GPU model (``rope-jit tune``), shipped with rope_jit: one JSON
table per GPU model, arch and SM count, read by ``rope_jit.tuning``. No code."""
