"""torch.compile(fullgraph=True) of a function, the graph recorded and never run: the
rope_jit op nodes Dynamo put in it. Shared by the torch-op tests (no GPU needed)."""

from __future__ import annotations

import pytest
import torch


class _Traced(Exception):
    pass


def _trace(fn, *args):
    """torch.compile(fullgraph=True) with a backend that records the graph and never runs
    it. fullgraph=True turns any graph break into an error."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*a):
            raise _Traced
        return run

    torch._dynamo.reset()
    with pytest.raises(_Traced):
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "rope_jit" in str(n.target)]
