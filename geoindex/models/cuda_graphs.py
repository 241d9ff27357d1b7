"""One photo fast on CUDA: the encoder's small-batch forward pass captured once per input shape in a CUDA graph.

A batch-1 forward pass of a small network on a fast GPU is bound by its hundreds of kernel
launches, not by arithmetic; replaying a captured graph launches them as one. Each input
shape (batch, channels, size, dtype, strides) is captured on first use with its own static input
and output buffers; a call copies its pixels into the input, replays, and returns a copy of the output.
Anything else (a CPU, batches above ``max_batch``, ``GEOINDEX_CUDA_GRAPHS=0``, or a capture that
fails) runs the network as it is: the graph is an optimisation, never a requirement.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["GRAPHS_ENV", "GraphedNetwork"]

log = logging.getLogger(__name__)

GRAPHS_ENV = "GEOINDEX_CUDA_GRAPHS"  # 0: never capture


class GraphedNetwork:
    """``network`` (pixels -> features), replayed from a CUDA graph for inputs of at most ``max_batch`` images.

    Args:
        network: an inference network whose weights no longer change (``ImageEncoder`` rebuilds
            this wrapper when they do).
        max_batch: largest batch captured; bigger batches keep the GPU busy without a graph.
        warmup: eager calls on a side stream before capture (cuDNN picks its algorithms there).
    """

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 8, warmup: int = 3) -> None:
        self.network = network
        self.max_batch = max_batch
        self.warmup = warmup
        self.enabled = torch.cuda.is_available() and os.environ.get(GRAPHS_ENV, "1") != "0"
        self._graphs: dict[tuple[Any, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._failed: set[tuple[Any, ...]] = set()

    def _key(self, x: torch.Tensor) -> tuple[Any, ...]:
        return (tuple(x.shape), x.dtype, x.stride(), x.device, torch.is_autocast_enabled(x.device.type),
                torch.get_autocast_dtype(x.device.type))

    def captures(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is replayed from a graph: a small batch on a GPU, graphs not turned off."""
        return self.enabled and x.is_cuda and x.shape[0] <= self.max_batch

    @property
    def captured(self) -> int:
        """Input shapes captured so far."""
        return len(self._graphs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.captures(x):
            return self.network(x)
        key = self._key(x)
        if key in self._failed:
            return self.network(x)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(x)
            except Exception as e:  # noqa: BLE001 - capture fails in many ways (ops that sync, old drivers); all mean eager
                log.info("CUDA graph capture failed for input %s (%s); running this shape eagerly", key[:2], e)
                self._failed.add(key)
                return self.network(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        static_in = x.clone(memory_format=torch.preserve_format)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.network(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.network(static_in)
        return graph, static_in, static_out
