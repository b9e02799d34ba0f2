"""``python -m chatter_otel``: the ``chatter-otel`` command, exit code included."""

from chatter_otel.traces.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
