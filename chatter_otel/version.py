"""Package version and the semantic-conventions schema its spans follow."""

from __future__ import annotations

from opentelemetry.semconv.schemas import Schemas

__version__ = "0.1.0"
SCHEMA_URL = Schemas.V1_41_0.value  # the GenAI names DESIGN.md fixes are those of v1.41
