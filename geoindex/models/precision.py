"""The encoder arithmetics a level can be built and a photo encoded at, named without importing torch.

``auto`` resolves to one of the others (``geoindex.models.encoders.resolve_precision``). The names
live here, apart from the encoders, so that the command line can offer them and ``geoindex --help``
stays fast.
"""

from __future__ import annotations

__all__ = ["PRECISIONS", "PRECISION_HELP"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")

# What --precision means, for every command that takes it.
PRECISION_HELP = ("auto (fp16 on CUDA; on a CPU fp32: no encoder has yet been measured to keep its answers in bf16), "
                  "fp32, bf16, fp16 (CUDA), int8 (ViT Linear layers)")
