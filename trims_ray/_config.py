"""Settings read from the environment, in one place.

Every ``TRIMS_RAY_*`` variable trims_ray honours is read here and nowhere else, so that the list
of knobs is this file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._names import check_tenant

__all__ = ["check_budget", "default_store_uri", "env_store_uri", "caller_tenant_from_env", "protection_from_env", "gc_freeze_from_env", "ReadOptions", "CacheConfig", "GpuTierConfig"]

MiB = 1024 * 1024


def default_store_uri() -> str:
    """``$TRIMS_RAY_STORE``, else ``file://~/.cache/trims_ray/store`` (expanded)."""
    uri = env_store_uri()
    if uri:
        return uri
    return (Path.home() / ".cache" / "trims_ray" / "store").as_uri()


def protection_from_env() -> bool:
    """False when ``$TRIMS_RAY_PROTECT`` is 0/false/no/off (page protection of leased weights
    off, e.g. for debugging); read per call."""
    return _env_on("TRIMS_RAY_PROTECT")


def gc_freeze_from_env() -> bool:
    """False when ``$TRIMS_RAY_GC_FREEZE`` is 0/false/no/off: trims_ray's long-lived processes
    then leave every object to the garbage collector's full collections (``_gc``)."""
    return _env_on("TRIMS_RAY_GC_FREEZE")


def env_store_uri() -> str | None:
    """``$TRIMS_RAY_STORE`` when set, else None."""
    return os.environ.get("TRIMS_RAY_STORE", "").strip() or None


def caller_tenant_from_env() -> str | None:
    """``$TRIMS_RAY_TENANT`` (Ray's runtime_env carries it to tasks), or None when unset."""
    tenant = os.environ.get("TRIMS_RAY_TENANT", "").strip()
    return tenant or None


def _env_on(name: str) -> bool:
    """A switch that is on unless ``$name`` is 0/false/no/off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None


def _env_float(name: str) -> float:
    raw = os.environ[name].strip()
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"${name} must be a number, got {raw!r}") from None


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How the store reader splits a blob into parallel ranged reads.

    Args:
        chunk_bytes: size of one ranged read. Large enough that per-request overhead (an HTTP
            round trip for S3) is small, small enough that several are in flight per blob.
        concurrency: ranged reads in flight at once.
        retries: how many times a ranged read from an object store is tried again after a
            failure that may pass (the endpoint refused or dropped the connection, a timeout,
            throttling, a 5xx answer); 0 never retries. Local files are never retried.
        retry_backoff_s: the wait before the first retry; it doubles before each next one (with
            jitter, a random 50-100% of it), so the defaults give up after at most
            0.5 + 1 + 2 = 3.5 s of waiting.
    """

    chunk_bytes: int = 16 * 1024 * 1024
    concurrency: int = 8
    retries: int = 3
    retry_backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if type(self.chunk_bytes) is not int or self.chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be an int >= 4096, got {self.chunk_bytes!r}")
        if type(self.concurrency) is not int or not 1 <= self.concurrency <= 256:
            raise ValueError(f"concurrency must be an int in 1..256, got {self.concurrency!r}")
        if type(self.retries) is not int or not 0 <= self.retries <= 10:
            raise ValueError(f"retries must be an int in 0..10, got {self.retries!r}")
        backoff = self.retry_backoff_s
        if type(backoff) not in (int, float) or not 0 <= backoff <= 60:
            raise ValueError(f"retry_backoff_s must be a number of seconds in [0, 60], got {backoff!r}")

    @classmethod
    def from_env(cls) -> ReadOptions:
        """Defaults overridden by ``$TRIMS_RAY_READ_CHUNK_BYTES``, ``$TRIMS_RAY_READ_CONCURRENCY``,
        ``$TRIMS_RAY_READ_RETRIES`` and ``$TRIMS_RAY_READ_BACKOFF_S``."""
        base = cls()
        backoff = base.retry_backoff_s
        if os.environ.get("TRIMS_RAY_READ_BACKOFF_S", "").strip():
            backoff = _env_float("TRIMS_RAY_READ_BACKOFF_S")
        return cls(
            chunk_bytes=_env_int("TRIMS_RAY_READ_CHUNK_BYTES", base.chunk_bytes),
            concurrency=_env_int("TRIMS_RAY_READ_CONCURRENCY", base.concurrency),
            retries=_env_int("TRIMS_RAY_READ_RETRIES", base.retries),
            retry_backoff_s=backoff,
        )


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """How a node cache sizes and manages its tiers.

    Args:
        host_bytes: byte budget of the host tier (models in the node's object store); None means
            ``host_fraction`` of the node's object store.
        host_fraction: share of the node's object store the host tier may use when
            ``host_bytes`` is None. The rest stays for tasks' own objects.
        disk_bytes: byte budget of the disk tier.
        disk_dir: directory of the disk tier; None means ``~/.cache/trims_ray/disk``. Each node
            uses a subdirectory named by its node id.
        policy: eviction policy name (see ``trims_ray.policy.online_policies()``).
        manifest_ttl_s: how long a node trusts a manifest it resolved before asking the store
            again (a re-registered model is seen after at most this long).
        lease_check_s: how often leases of dead processes are reclaimed.
        peer_fetch: whether a node that misses may copy a model from another node's host tier
            (over Ray's object transfer) when that is expected to be faster than the store.
        report_s: how often a node cache reports to placement when nothing changed (changes are
            reported at once); placement also checks cluster membership at this interval.
        caller_timeout_s: a process that submitted tasks (and holds their leases until their
            results exist) is taken for dead when placement has not heard from it for this long;
            its leases are then reclaimed. Callers poll every 2 s.
        tenant_share: the fraction of each tier's budget (host, disk) that any one tenant may
            hold on a node; 1.0 means no limit but the budget. Public models count as tenant
            "public". A load that would put a tenant over its share evicts that tenant's own
            models, or fails with CapacityError; it never evicts another tenant's.
        tenant_quotas: per-tenant quotas in bytes that override ``tenant_share``:
            ``{"alice": {"host": 2 << 30, "disk": 10 << 30}}``; a tier left out falls back to
            ``tenant_share``.
        scrub_s: how often each node cache re-hashes its resident host copies against their
            manifests (dropping and reloading a corrupt one); 0 turns the periodic scrub off
            (``trims_ray.scrub()`` still runs one on demand).
        gpu_bytes: byte budget of the GPU tier on each GPU; None means ``gpu_fraction`` of the
            GPU's total memory (NVML). The GPU tier is on only on nodes where Ray manages GPUs.
        gpu_fraction: share of each GPU's memory for cached models when ``gpu_bytes`` is None;
            the rest stays for the tasks' activations and workspaces.
        metrics_per_model: whether the load, routing and invocation metrics carry a ``model``
            label. Off by default, as in Ray Serve: a label per model multiplies each
            histogram's series (a dozen buckets per node and tenant) by the number of models.
            Turn it on where models are few; the tier metrics never carry one.
    """

    host_bytes: int | None = None
    host_fraction: float = 0.5
    disk_bytes: int = 20 * 1024**3
    disk_dir: str | None = None
    policy: str = "gdsf"
    manifest_ttl_s: float = 2.0
    lease_check_s: float = 1.0
    peer_fetch: bool = True
    report_s: float = 0.5
    caller_timeout_s: float = 15.0
    tenant_share: float = 1.0
    tenant_quotas: dict[str, dict[str, int]] = field(default_factory=dict)
    scrub_s: float = 0.0
    gpu_bytes: int | None = None
    gpu_fraction: float = 0.5
    metrics_per_model: bool = False

    def __post_init__(self) -> None:
        if self.host_bytes is not None:
            check_budget(self.host_bytes, "host_bytes (or None)")
        if not 0 < self.host_fraction <= 1:
            raise ValueError(f"host_fraction must be in (0, 1], got {self.host_fraction!r}")
        check_budget(self.disk_bytes, "disk_bytes")
        if self.disk_dir is not None and not isinstance(self.disk_dir, str):
            raise TypeError(f"disk_dir must be a str or None, got {type(self.disk_dir).__name__}")
        if self.disk_dir:
            try:  # "~nobody/x" would otherwise fail later, in disk_path, with RuntimeError
                Path(self.disk_dir).expanduser()
            except RuntimeError as exc:
                raise ValueError(f"disk_dir {self.disk_dir!r}: {exc}; give an absolute path") from None
        if not isinstance(self.policy, str):
            raise TypeError(f"policy must be a policy name, got {type(self.policy).__name__}")
        from .policy import available_policies, online_policies

        if self.policy not in online_policies():
            why = "is offline (it must be told the future): simulation only" if self.policy in available_policies() else "is unknown"
            raise ValueError(f"policy {self.policy!r} {why}; a node cache can use: {', '.join(online_policies())}")
        if self.manifest_ttl_s < 0 or self.lease_check_s <= 0:
            raise ValueError("manifest_ttl_s must be >= 0 and lease_check_s > 0")
        if not isinstance(self.peer_fetch, bool):
            raise TypeError(f"peer_fetch must be a bool, got {type(self.peer_fetch).__name__}")
        if not isinstance(self.metrics_per_model, bool):
            raise TypeError(f"metrics_per_model must be a bool, got {type(self.metrics_per_model).__name__}")
        if not 0 < self.report_s <= 60:
            raise ValueError(f"report_s must be in (0, 60] seconds, got {self.report_s!r}")
        if not self.caller_timeout_s >= 3:
            raise ValueError(f"caller_timeout_s must be >= 3 s (callers poll every 2 s), got {self.caller_timeout_s!r}")
        self._check_tenant_limits()
        _check_gpu_budget(self.gpu_bytes, self.gpu_fraction, "gpu_bytes", "gpu_fraction")

    def _check_tenant_limits(self) -> None:
        share = self.tenant_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"tenant_share must be a fraction in (0, 1], got {share!r}")
        if not isinstance(self.tenant_quotas, Mapping):
            raise TypeError(
                f"tenant_quotas must be a dict of tenant -> {{tier: bytes}}, got {type(self.tenant_quotas).__name__}"
            )
        quotas: dict[str, dict[str, int]] = {}
        for tenant, tiers in self.tenant_quotas.items():
            check_tenant(tenant)
            if not isinstance(tiers, Mapping):
                raise TypeError(
                    f"tenant_quotas[{tenant!r}] must be a dict of tier -> bytes, got {type(tiers).__name__}"
                )
            for tier, nbytes in tiers.items():
                if tier not in ("host", "disk"):
                    raise ValueError(
                        f"tenant_quotas[{tenant!r}]: tier must be 'host' or 'disk' (the GPU tier has no "
                        f"per-tenant quota yet), got {tier!r}"
                    )
                if type(nbytes) is not int or nbytes < 0:
                    raise ValueError(
                        f"tenant_quotas[{tenant!r}][{tier!r}] must be a non-negative int of bytes, got {nbytes!r}"
                    )
            quotas[tenant] = dict(tiers)
        object.__setattr__(self, "tenant_quotas", quotas)  # a private copy: the caller's dict may change
        scrub = self.scrub_s
        if isinstance(scrub, bool) or not isinstance(scrub, (int, float)) or not 0 <= scrub < float("inf"):
            raise ValueError(f"scrub_s must be a number of seconds >= 0 (0: no periodic scrub), got {scrub!r}")

    def gpu_tier_config(self) -> GpuTierConfig:
        """The settings each GPU holder of a node gets (same policy and lease checks as the host)."""
        return GpuTierConfig(
            budget_bytes=self.gpu_bytes,
            budget_fraction=self.gpu_fraction,
            policy=self.policy,
            lease_check_s=self.lease_check_s,
            manifest_ttl_s=self.manifest_ttl_s,
        )

    @classmethod
    def from_env(cls, **overrides) -> CacheConfig:
        """Defaults, then ``$TRIMS_RAY_HOST_BYTES``, ``$TRIMS_RAY_DISK_BYTES``,
        ``$TRIMS_RAY_DISK_DIR``, ``$TRIMS_RAY_POLICY``, ``$TRIMS_RAY_GPU_BYTES``,
        ``$TRIMS_RAY_GPU_FRACTION``, ``$TRIMS_RAY_TENANT_SHARE`` and ``$TRIMS_RAY_SCRUB_S``, then
        ``overrides``."""
        env: dict[str, object] = {}
        if os.environ.get("TRIMS_RAY_HOST_BYTES", "").strip():
            env["host_bytes"] = _env_int("TRIMS_RAY_HOST_BYTES", 0)
        if os.environ.get("TRIMS_RAY_DISK_BYTES", "").strip():
            env["disk_bytes"] = _env_int("TRIMS_RAY_DISK_BYTES", 0)
        if os.environ.get("TRIMS_RAY_DISK_DIR", "").strip():
            env["disk_dir"] = os.environ["TRIMS_RAY_DISK_DIR"].strip()
        if os.environ.get("TRIMS_RAY_POLICY", "").strip():
            env["policy"] = os.environ["TRIMS_RAY_POLICY"].strip()
        if os.environ.get("TRIMS_RAY_GPU_BYTES", "").strip():
            env["gpu_bytes"] = _env_int("TRIMS_RAY_GPU_BYTES", 0)
        if os.environ.get("TRIMS_RAY_GPU_FRACTION", "").strip():
            env["gpu_fraction"] = _env_float("TRIMS_RAY_GPU_FRACTION")
        # Per-tenant limits: a share for every tenant and the scrub period (quotas per tenant
        # are structured: CacheConfig(tenant_quotas=...) only).
        if os.environ.get("TRIMS_RAY_TENANT_SHARE", "").strip():
            env["tenant_share"] = _env_float("TRIMS_RAY_TENANT_SHARE")
        if os.environ.get("TRIMS_RAY_SCRUB_S", "").strip():
            env["scrub_s"] = _env_float("TRIMS_RAY_SCRUB_S")
        return cls(**{**env, **overrides})

    def disk_path(self, node_id: str) -> Path:
        base = Path(self.disk_dir).expanduser() if self.disk_dir else Path.home() / ".cache" / "trims_ray" / "disk"
        return base / node_id


def check_budget(nbytes: object, what: str) -> int:
    """``nbytes`` if it is a tier's byte budget (a non-negative int, not a bool), for the
    configs' fields and for budgets changed at run time alike.

    Raises:
        ValueError: it is not; the message names ``what``.
    """
    if type(nbytes) is not int or nbytes < 0:
        raise ValueError(f"{what} must be a non-negative int (bytes), got {nbytes!r}")
    return nbytes


def _check_gpu_budget(nbytes: object, fraction: object, bytes_name: str, fraction_name: str) -> None:
    """The GPU budget's checks, for CacheConfig and GpuTierConfig alike, naming each field as
    its class calls it."""
    if nbytes is not None:
        check_budget(nbytes, f"{bytes_name} (or None)")
    if not 0 < fraction <= 1:
        raise ValueError(f"{fraction_name} must be in (0, 1], got {fraction!r}")


@dataclass(frozen=True, kw_only=True)
class GpuTierConfig:
    """How a GPU tier sizes and manages one GPU.

    Args:
        budget_bytes: bytes of device memory the tier may hold; None means ``budget_fraction``
            of the GPU's total memory (from NVML or the device).
        budget_fraction: share of the GPU's memory for cached models when ``budget_bytes`` is
            None; the rest stays for the tasks' activations and workspaces.
        policy: eviction policy name (see ``trims_ray.policy.online_policies()``).
        unclaimed_ttl_s: a lease nobody claimed is ended after this long.
        lease_check_s: how often the holder reaps leases of dead processes.
        min_layer_bytes: swap-in copies are grouped into layers of at least this many bytes,
            each followed by an event that a pipelined task waits on.
        swap_workers: swap-ins that may run at once (they share one host-to-device link).
        manifest_ttl_s: how long the GPU's holder trusts a manifest it resolved (the node's
            ``CacheConfig.manifest_ttl_s``).
    """

    budget_bytes: int | None = None
    budget_fraction: float = 0.5
    policy: str = "gdsf"
    unclaimed_ttl_s: float = 600.0
    lease_check_s: float = 1.0
    min_layer_bytes: int = 4 * MiB
    swap_workers: int = 2
    manifest_ttl_s: float = 2.0

    def __post_init__(self) -> None:
        _check_gpu_budget(self.budget_bytes, self.budget_fraction, "budget_bytes", "budget_fraction")
        if not self.manifest_ttl_s >= 0:
            raise ValueError(f"manifest_ttl_s must be >= 0, got {self.manifest_ttl_s!r}")
        if not isinstance(self.policy, str):
            raise TypeError(f"policy must be a policy name, got {type(self.policy).__name__}")
        if self.unclaimed_ttl_s <= 0 or self.lease_check_s <= 0:
            raise ValueError("unclaimed_ttl_s and lease_check_s must be > 0")
        if type(self.min_layer_bytes) is not int or self.min_layer_bytes < 0:
            raise ValueError(f"min_layer_bytes must be an int >= 0, got {self.min_layer_bytes!r}")
        if type(self.swap_workers) is not int or not 1 <= self.swap_workers <= 16:
            raise ValueError(f"swap_workers must be an int in 1..16, got {self.swap_workers!r}")
