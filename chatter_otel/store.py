"""The local SQLite trace store (the embedded default exporter).

The public import path; the code lives in ``chatter_otel.export.store``.
"""

from chatter_otel.export.store import (
    LocalStoreExporter,
    LocalTraceStore,
    TraceSummary,
    default_store_path,
)

__all__ = [
    "LocalStoreExporter",
    "LocalTraceStore",
    "TraceSummary",
    "default_store_path",
]
