"""The pattern ceiling alone (development aid): the in-place touch of each rope shape's
rotated bytes (benchmarks/ceilings.py), as a percent of the copy bandwidth, at the token
counts given (default 8192 and 32768). benchmarks/run.py measures the same kernel on every
row of its sweep, as its `pattern_ceiling` column.

    python benchmarks/pattern_ceiling.py [tokens ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ceilings import pattern_calls  # noqa: E402
from impls import FAMILIES  # noqa: E402
from timing import buffer_sets, copy_bandwidth, time_calls  # noqa: E402

tokens = [int(a) for a in sys.argv[1:]] or [8192, 32768]
bw = copy_bandwidth()
print(f"copy {bw / 1e12:.3f} TB/s")
rope = FAMILIES["rope"]
for shape in rope.shapes.values():
    for T in tokens:
        pattern = rope.touch_pattern(shape, T)
        t = time_calls(pattern_calls(pattern, buffer_sets(pattern.buffer_bytes), torch.device("cuda")))
        print(f"{shape.name:10s} T={T:6d} rotated prefix {shape.rotary_dim}/{shape.head_size}: "
              f"{t * 1e6:8.2f} us  {pattern.moved_bytes / t / bw * 100:5.1f}% of copy", flush=True)
