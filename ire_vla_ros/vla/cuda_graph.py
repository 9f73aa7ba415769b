"""The frozen backbone's inference forward replayed from a CUDA graph.

Why: measured on one H100 (bench/results/act_profile_blip2-opt-2.7b_cuda.json), one policy step of
the BLIP-2 OPT-2.7B backbone launches ~2,700 kernels from ~14,000 Python-side operator calls; the GPU
is busy 10.9 ms of an 89 ms step (4 %). The step is bound by the CPU launching kernels, not by the
GPU. A CUDA graph records the launches once and replays them with one call.

How: one graph per input signature (names, shapes, dtypes). The policy's inputs have a fixed shape
for a given batch size (images resized to the preset's size, instruction tokens padded to
max_text_tokens), so the policy loader captures one graph right after loading (VLAPolicy.warm_up). New inputs are
copied into the graph's static input tensors, the graph replays, and the outputs are cloned (the
static outputs are overwritten by the next replay; callers keep latents). The graph reads the
parameters where they live: weights changed in place (load_state_dict) are seen by the next replay;
replacing modules (new LoRA layers, a different model) needs `reset()`. Inference only: callers use it
under torch.no_grad() with the backbone in eval mode; gradients and training take the eager path.
If capture fails (an operator that synchronises with the host, say), the error is kept in
`failure` and every later call runs eagerly.
"""
from __future__ import annotations

from typing import Callable

import torch

Signature = tuple


def signature(inputs: dict) -> Signature:
    return tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in sorted(inputs.items()))


class GraphedForward:
    """`forward(inputs) -> tuple of tensors`, replayed from CUDA graphs keyed by input signature."""

    def __init__(self, forward: Callable[[dict], tuple], max_graphs: int = 4, warmup_calls: int = 3):
        self.forward = forward
        self.max_graphs = max_graphs  # rare shapes beyond this run eagerly (each graph holds memory)
        self.warmup_calls = warmup_calls
        self._graphs: dict[Signature, tuple[torch.cuda.CUDAGraph, dict, tuple]] = {}
        self.failure: str | None = None
        self.replays = 0
        self.eager_calls = 0

    def reset(self) -> None:
        """Drop every graph (after the module structure changed); the next call captures again."""
        self._graphs.clear()
        self.failure = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, inputs: dict) -> tuple:
        if self.failure is not None or any(not v.is_cuda for v in inputs.values()):
            self.eager_calls += 1
            return self.forward(inputs)
        key = signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self.eager_calls += 1
                return self.forward(inputs)
            try:
                entry = self._capture(inputs)
            except Exception as exc:  # noqa: BLE001 - any capture error means: run eagerly from now on
                self.failure = f"{type(exc).__name__}: {exc}"
                torch.cuda.synchronize()
                self.eager_calls += 1
                return self.forward(inputs)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        for name, tensor in inputs.items():
            static_in[name].copy_(tensor, non_blocking=True)
        graph.replay()
        self.replays += 1
        return tuple(t.clone() for t in static_out)

    def _capture(self, inputs: dict) -> tuple:
        static_in = {k: v.clone() for k, v in inputs.items()}
        # Warm-up on a side stream, as torch.cuda.graphs documents (lazy init, cuBLAS workspaces).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                self.forward(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the policy node captures in its control thread while the executor thread may
        # touch CUDA (e.g. a head swap): that must not invalidate this capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = tuple(self.forward(static_in))
        return graph, static_in, static_out
