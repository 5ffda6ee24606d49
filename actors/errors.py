"""The errors that cross from the pools to the ingress: plain Python (no torch, no Ray), so that
every part can import them.

``InputError`` is the one error for bad input: whoever finds a field it cannot take (the
ingress's checks, the tokenizer, the bulk job) raises it with the field's name, and the client
gets ``INVALID_ARGUMENT`` with ``"field: message"``.

``PoolFailure`` says a pool replica can no longer do its work (its engine broke). The ingress
treats it like a replica that died: it resumes the story on another replica. ``refused`` marks a
replica that failed *before* it took the request; that one cost the story nothing, so the
ingress waits and tries again without counting it as a loss.
"""

from __future__ import annotations


class InputError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # crosses Ray as itself (the default would call __init__ with one arg)
        return type(self), (self.field, self.message)


class PoolFailure(RuntimeError):
    def __init__(self, stage: str, message: str, refused: bool = False, replica: str = ""):
        super().__init__(f"{stage}: {message}")
        # replica: the failing replica's actor id, so that one broken replica counts as one loss
        self.stage, self.message, self.refused, self.replica = stage, message, refused, replica

    def __reduce__(self):
        return type(self), (self.stage, self.message, self.refused, self.replica)
