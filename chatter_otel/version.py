"""Package version, the semantic-conventions schema its telemetry follows, and the meter every
metric of the package is recorded on (one name, version and schema, wherever it records)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry.semconv.schemas import Schemas

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter, MeterProvider

__version__ = "0.1.0"
SCHEMA_URL = Schemas.V1_41_0.value  # the GenAI names DESIGN.md fixes are those of v1.41


def our_meter(meter_provider: MeterProvider | None = None) -> Meter:
    """The package's meter on ``meter_provider`` (the global one when None)."""
    from opentelemetry import metrics  # here: the CLI's --version imports this module

    return metrics.get_meter("chatter_otel", __version__, meter_provider, schema_url=SCHEMA_URL)
