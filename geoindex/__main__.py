"""``python -m geoindex`` and the ``geoindex`` console script: see :mod:`geoindex.interfaces.cli`."""

from __future__ import annotations

from geoindex.interfaces.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
