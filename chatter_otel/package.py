"""What the instrumentor instruments (as contrib packages declare it): checked when it
instruments; the ``instruments`` extra installs them into a fresh environment."""

_instruments = ("langchain-core >= 1.4, < 2", "langgraph >= 1.2, < 2")
