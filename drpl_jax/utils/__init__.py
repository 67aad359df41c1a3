"""Small helpers shared across the package (workdir I/O on any filesystem)."""
