"""One module per training stage; each has init / batches / loss / export (see training/loop.py)."""
