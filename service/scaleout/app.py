"""The Ray Serve application: catalog + replica deployment (multiplexed by adapter) + FastAPI ingress."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..settings import Settings

__all__ = ["Scale", "app_builder", "build_application", "replica_options"]


@dataclass(frozen=True)
class Scale:
    """How many replicas, and autoscaling when `min_replicas` or `max_replicas` is given."""

    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    @classmethod
    def for_settings(cls, settings: Settings, **given: Any) -> Scale:
        """GPU replicas when `--device cuda`; `given` None values fall back to the defaults."""
        given = {k: v for k, v in given.items() if v is not None}
        given.setdefault("replica_gpus", 1.0 if settings.device == "cuda" else 0.0)
        return cls(**given)


def replica_options(settings: Settings, scale: Scale) -> dict[str, Any]:
    """Serve options of the replica deployment: autoscaling passes through as Serve's own config."""
    options: dict[str, Any] = {
        # Serve queues beyond this at the router; the engine batches what it is given.
        "max_ongoing_requests": max(2 * settings.max_batch_size, 4),
        "ray_actor_options": {"num_cpus": scale.replica_cpus, "num_gpus": scale.replica_gpus},
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s,
    }
    if scale.min_replicas is None and scale.max_replicas is None:
        options["num_replicas"] = scale.num_replicas
        return options
    low = scale.min_replicas if scale.min_replicas is not None else 1
    high = scale.max_replicas if scale.max_replicas is not None else max(low, scale.num_replicas)
    if not 0 <= low <= high:
        raise ValueError(f"--min-replicas {low} must be between 0 and --max-replicas {high}")
    options["autoscaling_config"] = {
        "min_replicas": low,
        "max_replicas": high,
        "initial_replicas": min(max(scale.num_replicas, low), high),
        "target_ongoing_requests": scale.target_ongoing_requests or float(settings.max_batch_size),
    }
    return options


def build_application(settings: Settings, scale: Scale) -> Any:
    """The bound application (`serve.run` it, or point a Serve config's `import_path` at `app_builder`)."""
    from ray import serve

    from .catalog import Catalog
    from .ingress import LokrIngress
    from .replica import LokrReplica

    config = settings.model_dump(mode="json")
    light = {"num_cpus": 0}
    catalog = serve.deployment(
        name="LokrCatalog", num_replicas=1, max_ongoing_requests=10_000, ray_actor_options=light
    )(Catalog).bind()
    replicas = serve.deployment(name="LokrReplica", **replica_options(settings, scale))(LokrReplica).bind(
        config, catalog
    )
    ingress = serve.deployment(name="LokrIngress", max_ongoing_requests=10_000, ray_actor_options=light)(
        serve.ingress()(LokrIngress)
    )
    return ingress.bind(config, replicas, catalog)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point (`import_path: service.scaleout.app:app_builder`): `args` are the
    `serve` settings (`model`, `adapter`, `max_resident_adapters`, ...) plus the `Scale` fields."""
    scale_keys = {f.name for f in fields(Scale)}
    settings = Settings(**{k: v for k, v in args.items() if k not in scale_keys})
    return build_application(settings, Scale.for_settings(settings, **{k: args[k] for k in scale_keys & set(args)}))
