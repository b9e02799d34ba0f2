"""The reference chat app (``chatter-otel serve``).

The public import path; the code lives in ``chatter_otel.reference.app``.
"""

from chatter_otel.reference.app import (
    Base,
    Conversation,
    Message,
    MessageRole,
    create_app,
)

__all__ = [
    "Base",
    "Conversation",
    "Message",
    "MessageRole",
    "create_app",
]
