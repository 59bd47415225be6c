"""Prometheus metrics of a running mount, on a loopback port or in a node_exporter textfile.

The exposition format is prometheus_client's (a maintained library, not ours): a custom
collector turns one ``MountState.snapshot()`` into metric families at scrape time, so the
hot path keeps counting plain integers (vcfs/counters.py) and pays nothing for metrics.
Every series carries a ``mountpoint`` label, so several mounts can share one textfile
directory or one Prometheus job.

- ``listen``: ``prometheus_client.start_http_server`` on a loopback address (its own thread).
- ``textfile``: rewritten every ``interval`` seconds and once more at shutdown; the library
  writes a temporary file and renames it, so node_exporter never reads half a file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from vcfs import counters
from vcfs.errors import MountError
from vcfs.mountconfig import MetricsSection
from vcfs.mountstate import MountState

log = logging.getLogger("vcfs.exporter")


class MountCollector(Collector):
    def __init__(self, state: MountState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        snap = self.state.snapshot()
        mp = snap["mountpoint"]
        yield from _counters(snap, mp)
        yield from _hsm(snap, mp)
        g = GaugeMetricFamily("vcfs_open_files", "Files open in the mount now.", labels=["mountpoint"])
        g.add_metric([mp], snap["open_files"])
        yield g
        g = GaugeMetricFamily(
            "vcfs_mounted_since_seconds", "When the mount went live, in seconds since the epoch.", labels=["mountpoint"]
        )
        g.add_metric([mp], snap["mounted_since_epoch"] or 0.0)
        yield g
        info = GaugeMetricFamily(
            "vcfs_mount_info",
            "The store and vcfs version behind the mount (value 1).",
            labels=["mountpoint", "backing"],
        )
        info.add_metric([mp, snap["backing"]], 1)
        yield info
        cur = GaugeMetricFamily(
            "vcfs_kek_current_version",
            "KEK version new files of a domain are wrapped under.",
            labels=["mountpoint", "domain"],
        )
        for d in snap["keys"]["domains"]:
            cur.add_metric([mp, d["name"]], int(d["current"].rsplit("/v", 1)[1]))
        yield cur


def _counters(snap: dict[str, Any], mp: str) -> Iterator[Metric]:
    docs = {
        "bytes_encrypted": "Plaintext bytes sealed into blocks (AES-256-GCM).",
        "bytes_decrypted": "Plaintext bytes of blocks authenticated and decrypted.",
        "blocks_encrypted": "Blocks sealed.",
        "blocks_decrypted": "Blocks authenticated and decrypted.",
        "auth_failures": "Reads refused because ciphertext failed authentication (tampered or damaged).",
    }
    for name in counters.NAMES:
        c = CounterMetricFamily(f"vcfs_{name}", docs[name], labels=["mountpoint"])
        c.add_metric([mp], snap[name])
        yield c
    c = CounterMetricFamily(
        "vcfs_audit_alerts", "Audit trail alerts (events of kind audit.alert).", labels=["mountpoint"]
    )
    c.add_metric([mp], snap["audit_alerts"])
    yield c
    c = CounterMetricFamily("vcfs_events", "Events seen on the event bus, by kind.", labels=["mountpoint", "kind"])
    for kind, n in sorted(snap["events"].items()):
        c.add_metric([mp, kind], n)
    yield c


def _hsm(snap: dict[str, Any], mp: str) -> Iterator[Metric]:
    hsm = snap["hsm"]
    ops = CounterMetricFamily("vcfs_hsm_operations", "HSM wrap and unwrap calls.", labels=["mountpoint", "op"])
    errs = CounterMetricFamily("vcfs_hsm_errors", "HSM calls that failed in the HSM.", labels=["mountpoint", "op"])
    for op in ("wrap", "unwrap"):
        ops.add_metric([mp, op], hsm["calls"].get(op, 0))
        errs.add_metric([mp, op], hsm["errors"].get(op, 0))
    yield ops
    yield errs
    cumulative, buckets = 0, []
    for bound, n in hsm["buckets"].items():
        cumulative += n
        buckets.append((bound, cumulative))
    h = HistogramMetricFamily("vcfs_hsm_latency_seconds", "Latency of HSM calls.", labels=["mountpoint"])
    h.add_metric([mp], buckets, hsm["seconds_total"])
    yield h
    up = GaugeMetricFamily(
        "vcfs_hsm_up", "1 if the HSM answers normally, 0 if failing, stalled or unavailable.", labels=["mountpoint"]
    )
    up.add_metric([mp], 1 if hsm["state"] == "ok" else 0)
    yield up
    use = CounterMetricFamily(
        "vcfs_kek_operations", "Successful HSM calls by KEK version.", labels=["mountpoint", "kek", "op"]
    )
    for kek, by_op in sorted(snap["keys"]["in_use"].items()):
        for op, n in sorted(by_op.items()):
            use.add_metric([mp, kek, op], n)
    yield use


@dataclass
class Exporter:
    settings: MetricsSection
    registry: CollectorRegistry
    server: Any = None  # the WSGI server of start_http_server
    thread: Any = None

    def write_textfile(self) -> None:
        if self.settings.textfile is not None:
            write_to_textfile(str(self.settings.textfile), self.registry)

    async def run(self) -> None:
        """Rewrite the textfile every interval until cancelled (nothing to do for ``listen``)."""
        if self.settings.textfile is None:
            await trio.sleep_forever()
        while True:
            try:
                await trio.to_thread.run_sync(self.write_textfile)
            except OSError as exc:
                log.error("cannot write metrics to %s: %s", self.settings.textfile, exc.strerror or exc)
            await trio.sleep(self.settings.interval)

    def close(self) -> None:
        """Stop the HTTP server; write the textfile a last time (final counts of this mount)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        try:
            self.write_textfile()
        except OSError as exc:
            log.error("cannot write metrics to %s: %s", self.settings.textfile, exc.strerror or exc)


def start_exporter(settings: MetricsSection, state: MountState) -> Exporter:
    """Register the collector and open the HTTP port (if configured); MountError if it cannot."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MountCollector(state))
    exporter = Exporter(settings, registry)
    if settings.listen is not None:
        host, port = settings.listen
        try:
            exporter.server, exporter.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MountError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                hint="another process holds the port; change [metrics] listen in the mount config",
            ) from None
        state.exports["listen"] = f"{host}:{port}"
    if settings.textfile is not None:
        if not settings.textfile.parent.is_dir():
            raise MountError(
                f"metrics textfile directory {settings.textfile.parent} does not exist",
                hint="create it, or point [metrics] textfile at node_exporter's --collector.textfile.directory",
            )
        state.exports["textfile"] = str(settings.textfile)
    return exporter
