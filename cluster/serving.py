"""Start the story cluster from ``ray_config.yaml``: the same config ``serve run`` takes.

``deploy`` does what ``serve run ray_config.yaml`` does (start Serve with the config's HTTP and
gRPC options, then apply the config) on the Ray the caller is connected to, and waits until the
application is RUNNING.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import yaml

from cluster.settings import ROOT

CONFIG = ROOT / "ray_config.yaml"


def load_config(path: str | Path = CONFIG) -> dict:
    return yaml.safe_load(Path(path).read_text())


def with_args(config: dict, **args) -> dict:
    """A copy of the config whose (single) application takes these args on top of its own."""
    config = copy.deepcopy(config)
    config["applications"][0]["args"].update(args)
    return config


def with_ports(config: dict, grpc: int | None = None, http: int | None = None) -> dict:
    """A copy of the config on other gRPC/HTTP ports (None keeps the config's)."""
    config = copy.deepcopy(config)
    config["grpc_options"]["port"] = grpc or config["grpc_options"]["port"]
    config["http_options"]["port"] = http or config["http_options"]["port"]
    return config


def with_deployment(config: dict, name: str, **options) -> dict:
    """A copy of the config with these options on one deployment (e.g. num_replicas=1)."""
    config = copy.deepcopy(config)
    for dep in config["applications"][0]["deployments"]:
        if dep["name"] == name:
            if "num_replicas" in options:
                dep.pop("autoscaling_config", None)  # fixed replicas and autoscaling exclude each other
            dep.update(options)
            return config
    raise KeyError(f"no deployment {name!r} in the config")


def grpc_target(config: dict, host: str = "localhost") -> str:
    return f"{host}:{config['grpc_options']['port']}"


def deploy(config: dict, timeout_s: float = 300) -> None:
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema, _blocking=False)
    wait_running([app.name for app in schema.applications], timeout_s)


def wait_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps[name] if name in apps else None for name in names}
        failed = {
            n: app.message for n, app in states.items() if app is not None and app.status == "DEPLOY_FAILED"
        }
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        if all(app is not None and app.status == "RUNNING" for app in states.values()):
            return
        if time.time() > deadline:
            raise TimeoutError(
                f"applications not RUNNING after {timeout_s}s: "
                f"{ {n: (app.status if app else 'absent') for n, app in states.items()} } "
                "(do the replicas' num_cpus/num_gpus fit the cluster? see `ray status`)"
            )
        time.sleep(0.5)


# -- the command: `seedstory serve` ------------------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory serve``, registered on the ``seedstory`` parser's subcommands."""
    serve_parser = commands.add_parser(
        "serve", help="start Ray (or join --address) and deploy the story cluster"
    )
    serve_parser.add_argument("--config", default=str(CONFIG))
    serve_parser.add_argument("--ckpt", help="checkpoint folder (default: the config's)")
    serve_parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    serve_parser.set_defaults(func=run_command)
    return serve_parser


def run_command(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    config = load_config(args.config)
    if args.ckpt:
        config = with_args(config, checkpoint=str(Path(args.ckpt).resolve()))
    ray.init(address=args.address, include_dashboard=False)
    started = time.time()
    deploy(config)
    print(
        f"serving {args.config} in {time.time() - started:.1f}s: gRPC {grpc_target(config)}, "
        f"HTTP :{config['http_options']['port']} (Ctrl-C stops)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
