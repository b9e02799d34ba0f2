"""The ``chatter-otel`` command.

The public import path; the code lives in ``chatter_otel.traces.cli``.
"""

from chatter_otel.traces.cli import (
    main,
)

__all__ = [
    "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
