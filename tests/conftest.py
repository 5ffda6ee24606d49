"""Session-wide fixtures: one tiny checkpoint, one small StoryWorld, one local Ray cluster."""

from __future__ import annotations

import pytest

from actors.config import TINY


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from training.init_checkpoint import init_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint(TINY, path, seed=0)
    return path


@pytest.fixture(scope="session")
def storyworld(tmp_path_factory):
    """Six 30-segment stories at 64 px in the official layout; tests copy it before changing it."""
    from training.storyworld import write_storyworld

    out = tmp_path_factory.mktemp("storyworld")
    write_storyworld(out, stories=6, segments=30, seed=7, size=64)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (DESIGN.md §4: ray.init takes ~7 s)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
