"""The `seedstory` command line, built per command, and the MLLM settings bulk and eval take from
a Serve config (cluster/mllm_config.py). Parsing only: nothing runs."""

import argparse
from pathlib import Path

import pytest
import yaml

from actors.mllm.sink import SinkSettings
from cluster import mllm_config
from cluster.cli import eval_settings, parser
from cluster.serving import CONFIG, load_config
from cluster.settings import AppSettings
from training.evaluation.settings import EvalSettings

SINK_FLAGS = ["--config", "--sink-tokens", "--sink-segments", "--window-segments", "--neighbourhoods"]
# Every command and its options, in order: the README documents them, scripts use them.
OPTIONS = {
    "data convert": ["--jsonl", "--images", "--out", "--window", "--image-size", "--subset"],
    "data storyworld": ["--stories", "--segments", "--seed", "--size", "--world", "--out"],
    "init": ["--preset", "--out", "--seed", "--dtype"],
    "serve": ["--config", "--ckpt", "--address"],
    "generate": [
        "--prompt",
        "--continue",
        "--image",
        "--segments",
        "--out",
        "--target",
        "--token",
        "--seed",
        "--steps",
        "--temperature",
        "--resume",
        "--no-resume",
    ],
    "bulk": [
        "--prompts",
        "--out",
        "--ckpt",
        "--segments",
        "--steps",
        "--guidance",
        "--stories-per-batch",
        "--mllm-actors",
        "--render-actors",
        "--gallery",
        "--config",
        "--sink-mode",
        *SINK_FLAGS[1:],
    ],
    "k8s": ["--out"],
    "demo": ["--segments", "--out", "--prompt", "--ckpt", "--seed", "--grpc-port", "--http-port"],
    "train": [
        "--preset",
        "--data",
        "--out",
        "--stages",
        "--workers",
        "--gpu",
        "--cpus-per-worker",
        "--threads",
        "--steps",
        "--batch-size",
        "--lr",
        "--dense-share",
        "--seed",
        "--address",
        "--config",
        "--sink-mode",
        *SINK_FLAGS[1:],
    ],
    "eval": [
        "--ckpt",
        "--heldout",
        "--out",
        "--stories",
        "--segments",
        "--modes",
        "--steps",
        "--guidance",
        "--sampler",
        "--guidance-until",
        "--seed",
        "--captions",
        "--card",
        "--no-ceiling",
        *SINK_FLAGS,
    ],
}


def subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(p: argparse.ArgumentParser) -> list[str]:
    return [o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


def test_every_command_keeps_its_name_and_options():
    commands = subcommands(parser())
    assert list(commands) == ["data", "init", "serve", "generate", "bulk", "k8s", "demo", "train", "eval"]
    got = {f"data {n}": options(c) for n, c in subcommands(commands.pop("data")).items()}
    got |= {name: options(c) for name, c in commands.items()}
    assert got == OPTIONS


def test_python_m_cluster_bulk_takes_the_same_options_as_seedstory_bulk():
    from cluster.bulk import parser as bulk_parser

    argv = ["--prompts", "p.parquet", "--out", "o", "--segments", "3", "--sink-mode", "window"]
    ours = vars(parser().parse_args(["bulk", *argv]))
    assert ours.pop("func") and ours.pop("command") == "bulk"
    assert ours == vars(bulk_parser().parse_args(argv))


def a_config(tmp_path: Path, **sink) -> Path:
    config = load_config()
    args = config["applications"][0]["args"]
    args["sink"], args["checkpoint"] = sink, "/somewhere/ckpt"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_bulk_takes_the_sink_and_the_checkpoint_from_the_config(tmp_path):
    config = a_config(
        tmp_path,
        mode="window",
        sink_tokens=2,
        window_segments=3,
        boi_before=1,
        boi_after=1,
        eoi_before=1,
        eoi_after=1,
    )
    base = ["bulk", "--prompts", "p", "--out", "o", "--config", str(config)]
    ckpt, sink = mllm_config.resolve(parser().parse_args(base))
    assert ckpt == Path("/somewhere/ckpt")
    assert sink == SinkSettings(
        mode="window", sink_tokens=2, window_segments=3, boi_before=1, boi_after=1, eoi_before=1, eoi_after=1
    )
    # Each flag overrides one setting; 'scaled' unsets the neighbourhoods (resolved against Q).
    ckpt, sink = mllm_config.resolve(
        parser().parse_args(
            base
            + [
                "--ckpt",
                "mine",
                "--sink-mode",
                "multimodal",
                "--window-segments",
                "5",
                "--neighbourhoods",
                "scaled",
            ]
        )
    )
    assert ckpt == Path("mine")
    assert sink == SinkSettings(mode="multimodal", sink_tokens=2, window_segments=5)
    _, sink = mllm_config.resolve(parser().parse_args(base + ["--neighbourhoods", "4,7,8,3"]))
    assert sink.neighbourhoods() == [4, 7, 8, 3]
    _, sink = mllm_config.resolve(parser().parse_args(base + ["--sink-segments", "1"]))
    assert (sink.sink_segments, sink.sink_tokens) == (1, 2)


def test_eval_takes_every_sink_setting_but_the_mode_from_the_config(tmp_path):
    config = a_config(tmp_path, mode="dense", sink_tokens=1, window_segments=2)
    base = ["eval", "--heldout", "h", "--out", "o", "--config", str(config)]
    s = eval_settings(parser().parse_args(base + ["--sink-tokens", "6"]))
    assert (
        s.sink == SinkSettings(mode="dense", sink_tokens=6, window_segments=2)
        and s.modes == EvalSettings().modes
    )
    assert mllm_config.resolve(parser().parse_args(base))[0] == Path("/somewhere/ckpt")
    with pytest.raises(SystemExit):  # the eval picks its modes with --modes
        parser().parse_args(base + ["--sink-mode", "window"])


def test_by_default_bulk_and_eval_run_what_serve_deploys():
    served = AppSettings.from_args(load_config(CONFIG)["applications"][0]["args"])
    for argv in (["bulk", "--prompts", "p", "--out", "o"], ["eval", "--heldout", "h", "--out", "o"]):
        assert mllm_config.resolve(parser().parse_args(argv)) == (Path(served.checkpoint), served.sink)


@pytest.mark.parametrize("bad", ["4,7,8", "4,7,8,x", "-1,2,2,1", "released"])
def test_neighbourhoods_are_four_counts_or_scaled(bad):
    with pytest.raises(SystemExit):
        parser().parse_args(["bulk", "--prompts", "p", "--out", "o", "--neighbourhoods", bad])
