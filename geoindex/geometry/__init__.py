"""Web-Mercator tile math, coverages and great-circle distances: pure functions, no I/O."""
