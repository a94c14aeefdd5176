"""Prometheus metrics: the upstream-compatible ``controller_*`` names plus our own.

The reconciler, the storage layer (through its ``observe`` hook) and the leader elector count
here and nowhere else. The registry is injectable so tests read fresh counters. Labels are bounded
sets: StorageClass names, filesystem operations, outcomes, object kinds, Event reasons.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# prometheus.DefBuckets, as the upstream library uses, so existing dashboards keep working.
_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_FS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.provision_total = Counter(
            "controller_persistentvolumeclaim_provision_total",
            "Number of persistent volumes successfully provisioned",
            ["class"],
            registry=r,
        )
        self.provision_failed_total = Counter(
            "controller_persistentvolumeclaim_provision_failed_total",
            "Failed provisioning attempts: a refusal when first posted for a claim (or when its "
            "reason changes), and each attempt that failed on the export or saving the PV",
            ["class"],
            registry=r,
        )
        self.provision_duration = Histogram(
            "controller_persistentvolumeclaim_provision_duration_seconds",
            "Latency of successful provisioning, from the start of the attempt",
            ["class"],
            buckets=_DEFAULT_BUCKETS,
            registry=r,
        )
        self.delete_total = Counter(
            "controller_persistentvolume_delete_total",
            "Number of persistent volumes successfully released (directory handled, PV deleted)",
            ["class"],
            registry=r,
        )
        self.delete_failed_total = Counter(
            "controller_persistentvolume_delete_failed_total",
            "Number of failed release attempts",
            ["class"],
            registry=r,
        )
        self.delete_duration = Histogram(
            "controller_persistentvolume_delete_duration_seconds",
            "Latency of successful releases",
            ["class"],
            buckets=_DEFAULT_BUCKETS,
            registry=r,
        )
        self.retries_total = Counter(
            "nfs_provisioner_retries_total",
            "Reconcile attempts that failed and were scheduled again with backoff",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "nfs_provisioner_operations_in_flight",
            "Reconciles running right now",
            registry=r,
        )
        self.queue_depth = Gauge(
            "nfs_provisioner_queue_depth", "Objects waiting to be reconciled", registry=r
        )
        self.watched = Gauge(
            "nfs_provisioner_watched_objects",
            "Claims and volumes in the provisioner's cache",
            ["kind"],
            registry=r,
        )
        self.fs_duration = Histogram(
            "nfs_provisioner_filesystem_call_duration_seconds",
            "Latency of filesystem calls on the export",
            ["operation", "outcome"],
            buckets=_FS_BUCKETS,
            registry=r,
        )
        self.fs_timeouts = Counter(
            "nfs_provisioner_filesystem_call_timeouts_total",
            "Filesystem calls that exceeded the timeout (a hung mount)",
            ["operation"],
            registry=r,
        )
        self.events_dropped_total = Counter(
            "nfs_provisioner_events_dropped_total",
            "Events not sent: cause spam when their object was over the spam limit (a burst "
            "of 25 per object, then 1 per 5 minutes, as client-go), queue-full when 1000 "
            "Events already waited for the Event budget (EVENTS_QPS/EVENTS_BURST)",
            ["reason", "cause"],
            registry=r,
        )
        self.leader = Gauge(
            "nfs_provisioner_leader",
            "1 while this process holds the leader lock (or runs without election), else 0",
            registry=r,
        )

    def event_dropped(self, reason: str, cause: str) -> None:
        """The Event sink's hook: one call per Event not sent."""
        self.events_dropped_total.labels(reason, cause).inc()

    def observe_fs(self, operation: str, seconds: float, outcome: str) -> None:
        """The storage layer's hook: one call per filesystem call."""
        self.fs_duration.labels(operation, outcome).observe(seconds)
        if outcome == "timeout":
            self.fs_timeouts.labels(operation).inc()
