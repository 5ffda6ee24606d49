"""``seedstory eval``: long stories under each sink mode, judged against StoryWorld's ground truth.

For each mode (dense, window, streaming, multimodal) the same held-out openings are written to
``segments`` pictures by the vLLM story engine, with the same sampling seeds, and every picture is
rendered by the de-tokenizer with the same seed. Each segment is judged against what StoryWorld
says it shows; the Fréchet distance compares the generated pictures with the real held-out ones;
the ceilings judge the real pictures' own features (``VisualTokenizer.encode``), rendered by the
de-tokenizer as the eval renders and drawn by the visual tokenizer's own decoder.
Outputs: ``results.json``, ``table.md`` (the shape of the paper's Table 2), ``metrics.png`` (each
metric against the segment index, per mode) and ``stories.jsonl`` (every caption written).

The modules, one job each:

- ``settings``: ``EvalSettings``, what one run is asked for;
- ``judge``: the per-segment checks, pictures and captions against StoryWorld's truth;
- ``heldout``: reading the held-out stories and their truth;
- ``run``: writing the stories under each mode, rendering and judging them (``run_eval``);
- ``report``: statistics, the Markdown tables, the plot and the results files;
- ``command``: the ``seedstory eval`` command line.
"""
