"""Replaying a function as a CUDA graph. At 64x64 the GPU runs a decoder forward faster than Python launches its
few hundred kernels; a CUDA graph records the launches once and replays them with one call (PyTorch's notes on
CUDA semantics: "CUDA Graphs")."""

import torch

def graphed(call):
    """Run call(x, t, **condition) as a CUDA graph, captured at the first step and replayed after with x and t
    copied into its input buffers; a new shape or condition (by identity) means a new capture."""
    state = {}
    def run(x, t, **condition):
        key = (tuple(x.shape), tuple((name, id(v)) for name, v in condition.items()))
        if state.get("key") != key:
            inputs = {"x": x.clone(), "t": t.clone()}
            # Warm up on a side stream first (Triton autotuning, cuBLAS workspaces), as capture requires.
            stream = torch.cuda.Stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                call(inputs["x"], inputs["t"], **condition)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = call(inputs["x"], inputs["t"], **condition)
            state.update(key=key, graph=graph, inputs=inputs, output=output)
        state["inputs"]["x"].copy_(x)
        state["inputs"]["t"].copy_(t)
        state["graph"].replay()
        return state["output"].clone()  # the next replay overwrites the graph's output buffer
    return run
