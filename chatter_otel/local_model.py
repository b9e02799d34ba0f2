"""``LocalChatModel``: a deterministic chat model with no network.

The public import path; the code lives in ``chatter_otel.reference.local_model``.
"""

from chatter_otel.reference.local_model import (
    LOCAL_MODEL_PRICES,
    LocalChatModel,
)

__all__ = [
    "LOCAL_MODEL_PRICES",
    "LocalChatModel",
]
