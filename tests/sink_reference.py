"""The dense reference for the sink: the transformers MLLM run token by token, plain torch.

At every token it asks the sink policy which positions the token may see, rotates the
cached pre-RoPE keys by their rank in that kept set (StreamingLLM positions), and attends
with an explicit mask: exactly what "the transformers MLLM with the same policy" means in
the engine's design (docs/architecture.md). Greedy decoding under the same story grammar.

Its kept set is computed here, from the policy's definition, as a per-token mask
(``kept_mask``), not with ``actors.mllm.sink``: a bug in the policy module cannot then hide in
both the engine and its reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from actors.mllm.grammar import StoryRules, start_state
from actors.mllm.sink import SinkParams
from actors.mllm.vllm_logits import choice_masks, mask_for


def kept_mask(ids: list[int], p: SinkParams) -> list[bool]:
    """Which tokens of ``ids`` the policy keeps, straight from its definition: segments end at
    </img>; the last ``window_segments`` complete ones and the open one stay whole; of the older
    ones, the multimodal sink keeps the tokens near each <img> and </img> (never before the
    segment's first token), and the sink modes keep the first ``sink_tokens`` of the story and
    its first ``sink_segments`` complete segments."""
    n = len(ids)
    if p.mode == "dense":
        return [True] * n
    ends = [i for i, t in enumerate(ids) if t == p.eoi_id]
    old = max(0, len(ends) - p.window_segments)
    keep = [i > ends[old - 1] if old else True for i in range(n)]
    if p.mode in ("streaming", "multimodal"):
        keep[: p.sink_tokens] = [True] * min(p.sink_tokens, n)
        opening = ends[: p.sink_segments]
        end = opening[-1] + 1 if opening else 0
        keep[:end] = [True] * end
    for j in range(old if p.mode == "multimodal" else 0):
        start = ends[j - 1] + 1 if j else 0
        bois = [i for i in range(start, ends[j]) if ids[i] == p.boi_id]
        near = [(ends[j], p.eoi_before, p.eoi_after)] + [(bois[-1], p.boi_before, p.boi_after)] * bool(bois)
        for mark, before, after in near:
            for i in range(max(start, mark - before), min(n, mark + after + 1)):
                keep[i] = True
    return keep


class SinkReference:
    def __init__(self, model, policy: SinkParams, layout):
        self.m, self.policy, self.layout = model.eval(), policy, layout
        cfg = model.config
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.masks = choice_masks(layout)

    def _rope(self, x: torch.Tensor, pos: list[int]) -> torch.Tensor:
        """x (heads, n, hd) rotated to positions ``pos``."""
        cos, sin = self.m.model.rotary_emb(x, torch.tensor([pos]))
        return apply_rotary_pos_emb(x[None], x[None], cos, sin)[0][0]

    @torch.no_grad()
    def _token(self, ids: list[int], cache: list[tuple[list, list]]) -> torch.Tensor:
        """Run the newest token ids[-1]; returns its logits."""
        return self.m.lm_head(self._hidden(ids, cache))[0]

    @torch.no_grad()
    def _hidden(self, ids: list[int], cache: list[tuple[list, list]], embed=None) -> torch.Tensor:
        """Run the newest token ids[-1] (or ``embed`` (d,) in its place: a given picture's row);
        returns its final-norm hidden state (1, d)."""
        kept = [i for i, k in enumerate(kept_mask(ids, self.policy)) if k]
        ranks = list(range(len(kept)))
        x = self.m.model.embed_tokens(torch.tensor([ids[-1]])) if embed is None else embed[None]  # (1, d)
        for layer, (ks, vs) in zip(self.m.model.layers, cache):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(self.h, 1, self.hd)
            ks.append(a.k_proj(h).view(self.kvh, self.hd))  # before RoPE
            vs.append(a.v_proj(h).view(self.kvh, self.hd))
            k = torch.stack([ks[i] for i in kept], 1)  # (kv_heads, n, hd)
            v = torch.stack([vs[i] for i in kept], 1)
            k = self._rope(k, ranks).repeat_interleave(self.h // self.kvh, 0)
            v = v.repeat_interleave(self.h // self.kvh, 0)
            q = self._rope(q, ranks[-1:])
            o = F.scaled_dot_product_attention(q, k, v, scale=a.scaling)  # (heads, 1, hd)
            x = x + a.o_proj(o.transpose(0, 1).reshape(1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.m.model.norm(x)

    def generate(self, prompt: list[int], rules: StoryRules, embeds: dict | None = None) -> list[int]:
        return self.generate_rows(prompt, rules, embeds)[0]

    @torch.no_grad()
    def generate_rows(
        self, prompt: list[int], rules: StoryRules, embeds: dict | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """The greedy output, and the final-norm hidden state of every token run (n, d): row i is
        position i of prompt + output (the closing </s> is never run). ``embeds``: prompt
        positions whose input is an embedding row (d,) instead of their id's."""
        cache = [([], []) for _ in self.m.model.layers]
        ids: list[int] = []
        rows = []
        for position, t in enumerate(prompt):
            ids.append(t)
            rows.append(self._hidden(ids, cache, (embeds or {}).get(position)))
        state, out = start_state(rules, self.layout, prompt), []
        while True:
            choice = state.allowed()
            logits = self.m.lm_head(rows[-1])[0]
            nxt = int(logits.masked_fill(~mask_for(self.masks, choice), float("-inf")).argmax())
            out.append(nxt)
            if nxt == self.layout.eos:
                return out, torch.cat(rows)
            state.advance(nxt)
            ids.append(nxt)
            rows.append(self._hidden(ids, cache))
