"""The Grafana dashboard (JSON model) over the metrics the pools and Serve export.

``seedstory k8s`` (``cluster/kube.py``) writes it beside the KubeRay manifests as
``cluster/k8s/grafana-dashboard.json``; a test regenerates it and fails on drift, and checks that
every metric it queries exists.
"""

from __future__ import annotations

from cluster.serving import load_config

# Ray exports a ray.util.metrics metric "x" as ray_x: counters as ray_x_total (the only name under
# OpenTelemetry, Ray's default exporter; the deprecated ray_x gauge exists only under OpenCensus),
# histograms as ray_x_bucket/_sum/_count. Serve's own metrics are ray_serve_*.
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}  # chosen at import, not fixed to one Prometheus
Query = tuple[str, str]  # (PromQL, legend)
Panel = tuple[str, str, list[Query]]  # (title, Grafana unit, queries)


def _rate(metric: str, by: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({metric}[$__rate_interval]))"


def _quantile(q: float, histogram: str, by: str) -> str:
    return f"histogram_quantile({q}, {_rate(histogram + '_bucket', 'le, ' + by)})"


def _dashboard_rows(app: str) -> list[tuple[str, list[Panel]]]:
    """The rows and their panels. Per replica is ``by (instance)``: one scrape target is one pod,
    and a GPU pod holds one replica of its pool."""

    def by_pool(metric: str) -> str:
        return f'sum by (deployment) ({metric}{{application="{app}"}})'

    return [
        (
            "Stories (StoryIngress)",
            [
                (
                    "Stories by outcome",
                    "reqps",
                    [(_rate("ray_seedstory_stories_total", "outcome"), "{{outcome}}")],
                ),
                (
                    "Stage latency p50 / p95",
                    "s",
                    [
                        (
                            _quantile(q, "ray_seedstory_stage_seconds", "stage"),
                            f"p{round(q * 100)} {{{{stage}}}}",
                        )
                        for q in (0.5, 0.95)
                    ],
                ),
                ("Resumes by stage", "reqps", [(_rate("ray_seedstory_resumes_total", "stage"), "{{stage}}")]),
                (
                    "Stories in flight",
                    "short",
                    [
                        ("sum (ray_seedstory_stories_active)", "at the ingress"),
                        ("sum (ray_seedstory_mllm_stories)", "in the MLLM engines"),
                    ],
                ),
            ],
        ),
        (
            "MLLMPool",
            [
                (
                    "MLLM tokens/s",
                    "short",
                    [
                        (_rate("ray_seedstory_mllm_output_tokens_total", "instance"), "{{instance}}"),
                        (_rate("ray_seedstory_mllm_output_tokens_total"), "all replicas"),
                    ],
                ),
                (
                    "KV blocks in use",
                    "short",
                    [("sum by (instance) (ray_seedstory_kv_blocks_in_use)", "{{instance}}")],
                ),
            ],
        ),
        (
            "DetokenizerPool",
            [
                (
                    "Render queue",
                    "short",
                    [("sum (ray_seedstory_render_queue)", "pictures awaited by the ingress")],
                ),
                (
                    "Render call p95",
                    "s",
                    [(_quantile(0.95, "ray_seedstory_render_seconds", "instance"), "{{instance}}")],
                ),
                (
                    "Pictures per render call",
                    "short",
                    [
                        (
                            f"{_rate('ray_seedstory_render_batch_size_sum')} / "
                            f"{_rate('ray_seedstory_render_batch_size_count')}",
                            "mean",
                        )
                    ],
                ),
            ],
        ),
        (
            "Serve",
            [
                (
                    "Replicas per pool",
                    "short",
                    [
                        (by_pool("ray_serve_deployment_replica_healthy"), "{{deployment}} healthy"),
                        (by_pool("ray_serve_autoscaling_target_replicas"), "{{deployment}} target"),
                    ],
                ),
                (
                    "Requests at replicas",
                    "short",
                    [(by_pool("ray_serve_num_ongoing_requests_at_replicas"), "{{deployment}}")],
                ),
            ],
        ),
    ]


def _panel(pid: int, title: str, unit: str, queries: list[Query], grid: dict) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": _DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"datasource": _DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard(config: dict | None = None) -> dict:
    """The Grafana dashboard (JSON model): one row per part of the pipeline, its panels side by side."""
    config = config or load_config()
    panels, row_y = [], 0
    for row, row_panels in _dashboard_rows(config["applications"][0]["name"]):
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": row_y},
            }
        )
        width = 24 // len(row_panels)
        for i, (title, unit, queries) in enumerate(row_panels):
            grid = {"h": 8, "w": width, "x": i * width, "y": row_y + 1}
            panels.append(_panel(len(panels) + 1, title, unit, queries, grid))
        row_y += 9
    return {
        "title": "SEED-Story",
        "uid": "seedstory",
        "tags": ["seedstory", "ray-serve"],
        "description": "Generated by `seedstory k8s` from cluster/grafana.py: edit that, not this.",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                    "regex": "",
                }
            ]
        },
        "panels": panels,
    }
