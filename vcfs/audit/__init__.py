"""The audit trail: who read, wrote, renamed or deleted what, in a log an intruder cannot quietly edit.

Modules: ``config`` ([audit] and [alerts] tables), ``record`` (canonical JSON lines and their
hash chain), ``hsm`` (checkpoint HMACs and anchors in the HSM), ``log`` (the batching writer
thread: rotation, checkpoints, disk-full handling), ``forward`` (syslog RFC 5424 / journald),
``alerts`` (online anomaly rules), ``verify`` and ``query`` (offline: ``vcfs audit verify``,
``show``, ``report``). Format and guarantees: docs/AUDIT.md.
"""
