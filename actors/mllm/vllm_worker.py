"""The engine's route into vLLM's worker: ``SinkWorkerExtension``, mixed into the worker
(``worker_extension_cls``) so that ``StoryEngine`` reaches our model through ``collective_rpc``,
vLLM's public route for it. Answers are plain data (bytes, not tensors), so they would survive a
multiprocess engine core's serialisation too.
"""

from __future__ import annotations

import torch


class SinkWorkerExtension:
    """The model's per-story state, seen from the engine."""

    def seedstory_bind(self) -> None:
        """Give the model the runner's input-id buffer (it holds the real ids, query ids at
        embedding positions included, when forward is given embeddings only)."""
        self.model_runner.get_model().input_id_buffer = self.model_runner.input_ids.gpu

    def seedstory_retain(self, first_blocks: list[int]) -> int:
        return self.model_runner.get_model().retain(set(first_blocks))

    def seedstory_states(self) -> int:
        return len(self.model_runner.get_model().requests)

    def seedstory_picture_rows(
        self, starts: dict[int, int]
    ) -> dict[int, tuple[list[int], bytes, tuple[int, ...], str]]:
        """Hand out, per request (first block -> start position), its query rows at positions
        >= start, as (positions, raw bytes, shape, dtype): bytes, because a multiprocess engine
        core would serialise the answer. The request forgets every row it held: those below start
        were handed out already (a recompute captures them again)."""
        requests, out = self.model_runner.get_model().requests, {}
        for first_block, start in starts.items():
            state, held = requests.get(first_block), []
            if state is not None:
                held, state.picture_rows = state.picture_rows, []
            kept = [(pos, row) for pos, row in held if pos >= start]
            if not kept:
                out[first_block] = ([], b"", (0,), "")
                continue
            rows = torch.stack([row for _, row in kept]).cpu()  # (n, hidden)
            raw = rows.view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
            dtype = str(rows.dtype).removeprefix("torch.")
            out[first_block] = ([pos for pos, _ in kept], raw, tuple(rows.shape), dtype)
        return out
