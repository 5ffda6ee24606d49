"""A picture's features on the wire: Q rows of D float32 values, little-endian, row-major.

Inside a process a picture's features are a numpy float32 array (Q, D). Where they leave it (the
gRPC API's ``ImageEvent.features``, a client's saved story, the bulk job's tables) they are these
bytes. One place, so every reader and writer agrees on the layout. No torch here: the API and
the client import it.
"""

from __future__ import annotations

import numpy as np

WIRE_DTYPE = np.dtype("<f4")  # little-endian float32


def to_bytes(features: np.ndarray) -> bytes:
    """(Q, D) -> Q * D * 4 bytes, little-endian float32, row-major."""
    return np.ascontiguousarray(features, dtype=WIRE_DTYPE).tobytes()


def from_bytes(data: bytes, num_queries: int, feature_dim: int) -> np.ndarray:
    """The inverse of ``to_bytes``, checked: a (Q, D) float32 array, or ValueError saying what is wrong."""
    want = num_queries * feature_dim * WIRE_DTYPE.itemsize
    if len(data) != want:
        raise ValueError(
            f"has {len(data)} bytes; a picture's features are {num_queries} x {feature_dim} "
            f"little-endian float32 values, {want} bytes"
        )
    features = np.frombuffer(data, dtype=WIRE_DTYPE).reshape(num_queries, feature_dim)
    if not np.isfinite(features).all():
        raise ValueError("holds values that are not finite")
    return features.astype(np.float32)
