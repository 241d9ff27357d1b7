"""Run a frozen convolutional encoder through ONNX Runtime: the same fp32 function, cheaper on CPUs.

On CPUs ONNX Runtime runs EfficientNet-Lite0 in a fraction of the time of torch's eager kernels
(benchmarks/precision.py; figures in RESULTS.md), with outputs within 1e-5 of torch's. The network is
exported once per set of weights and kept in ``$GEOINDEX_CACHE_DIR/onnx`` (default
``~/.cache/geoindex/onnx``), so a later process only opens a session; ``encoders.CachedGraph`` lets it
do so without building the torch network at all.

``$GEOINDEX_RUNTIME=torch`` turns it off; without the ``onnxruntime`` and ``onnx`` packages, or
for networks that do not export (open_clip's ViT uses a fused attention kernel with no ONNX form),
encoders run in torch as before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from geoindex.errors import ConfigError
from geoindex.files import atomic_write_bytes, default_cache_dir

__all__ = ["RUNTIME_ENV", "RUNTIMES", "OnnxNetwork", "available", "cached_graph", "onnx_cache_dir", "wanted"]

log = logging.getLogger(__name__)

RUNTIME_ENV = "GEOINDEX_RUNTIME"
RUNTIMES = ("auto", "torch", "onnxruntime")
_OPSET = 17


def wanted() -> str:
    """The runtime ``$GEOINDEX_RUNTIME`` asks for: auto (the default), torch or onnxruntime."""
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if value not in RUNTIMES:
        raise ConfigError(f"{RUNTIME_ENV}={value!r} is not one of {', '.join(RUNTIMES)}; unset it for auto")
    return value


def available() -> bool:
    """True when onnxruntime (to run) and onnx (which torch's exporter needs) are installed."""
    # Found, not imported: importing onnx takes about a second, and only an export needs it.
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def _export(network: torch.nn.Module, sample: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices: it is what handles timm
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (sample,), buffer, dynamo=False, opset_version=_OPSET,  # type: ignore[arg-type]
                          input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}})
    return buffer.getvalue()


def cached_graph(weights: str, shape: tuple[int, ...], cache: Path | None) -> Path | None:
    """Where the graph of the network with fingerprint ``weights`` for inputs (n, *shape) is kept: named by
    the weights' fingerprint, the input shape and the exporter's version (the file may not exist yet)."""
    if cache is None:
        return None
    key = hashlib.sha256(f"{torch.__version__};{_OPSET};{tuple(shape)};{weights}".encode()).hexdigest()
    return cache / f"{key[:32]}.onnx"


def _export_and_cache(network: torch.nn.Module, sample: torch.Tensor, path: Path | None) -> bytes:
    model = _export(network, sample)
    if path is not None:
        try:
            atomic_write_bytes(path, model, durable=False)  # a lost file is exported again
        except OSError as e:
            log.debug("not caching the ONNX graph at %s: %s", path, e)
    return model


class OnnxNetwork:
    """A torch-like callable, pixels (n, 3, S, S) float32 -> features (n, d) float32, run by ONNX Runtime.

    The graph is exported (or read from ``cache``) on the first call, for that call's image size.

    Args:
        network: a frozen network on the CPU (eval mode, no weight being trained); not modified. Or a
            function that builds it, called only when the graph must be exported (not found in ``cache``).
        weights: a fingerprint of ``network``'s tensors (``encoders.state_fingerprint``): names the cached graph.
        threads: ONNX Runtime's intra-op threads (the caller passes torch's, so one knob sets both).
        cache: folder for exported graphs; None exports in memory every time.
    """

    def __init__(self, network: torch.nn.Module | Callable[[], torch.nn.Module], *, weights: str, threads: int,
                 cache: Path | None = None) -> None:
        self.network, self.weights, self.threads, self.cache = network, weights, max(1, threads), cache
        self.session: Any = None

    def _open(self, sample: torch.Tensor) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Idle pool threads that spin steal the cores of loader threads and of other queries.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")

        def session(model: bytes) -> Any:
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

        path = cached_graph(self.weights, tuple(sample.shape[1:]), self.cache)
        if path is not None and path.is_file():
            try:
                return session(path.read_bytes())
            except Exception as e:  # unreadable or damaged: export again and replace it
                log.warning("cached ONNX graph %s is unusable (%s); exporting it again", path, e)
        network = self.network if isinstance(self.network, torch.nn.Module) else self.network()
        return session(_export_and_cache(network, sample, path))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).contiguous()
        if self.session is None:
            self.session = self._open(torch.zeros_like(x[:1]))
        (features,) = self.session.run(None, {"pixels": x.numpy()})
        return torch.from_numpy(features)


def onnx_cache_dir() -> Path:
    """``$GEOINDEX_CACHE_DIR/onnx``: where exported graphs are kept."""
    return default_cache_dir() / "onnx"
