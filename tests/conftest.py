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
    from training.storyworld_writer import write_storyworld

    out = tmp_path_factory.mktemp("storyworld")
    write_storyworld(out, stories=6, segments=30, seed=7, size=64)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (ray.init takes about 7 s)."""
    import os

    import ray

    os.environ["SEEDSTORY_TEST_FAULTS"] = "1"  # replicas inherit it: tests may arm actors/health.py's Faults
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


TOKEN = "test-token"


@pytest.fixture(scope="session")
def story_service(ray_cluster, tiny_ckpt):
    """The real Serve app from ray_config.yaml on the tiny checkpoint, with auth on, one ingress
    replica, an admission limit of 2 stories (so that the admission test is deterministic), one
    resume per story and pool (so that tests/test_faults.py can exhaust it with two kills), and
    renders in fixed-shape batches of 4 (the path where a picture could depend on its companions;
    the CPU default, one picture per call, cannot)."""
    from types import SimpleNamespace

    from ray import serve

    from cluster.serving import deploy, grpc_target, load_config, with_args, with_deployment

    config = with_args(
        load_config(),
        checkpoint=str(tiny_ckpt),
        auth_token=TOKEN,
        max_stories_per_replica=2,
        max_resumes=1,
        render_slots=4,
    )
    config = with_deployment(config, "StoryIngress", num_replicas=1)
    deploy(config)
    yield SimpleNamespace(target=grpc_target(config), token=TOKEN, config=config)
    serve.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where torch sees a CUDA device; elsewhere they are skipped,
    saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
