"""``RedisEventBridge``: one event stream across worker processes.

The public import path; the code lives in ``chatter_otel.sinks.redis``.
"""

from chatter_otel.sinks.redis import (
    RedisEventBridge,
)

__all__ = [
    "RedisEventBridge",
]
