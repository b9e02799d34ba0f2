"""``LangGraphInstrumentor``: LangGraph and LangChain runs become GenAI spans, no app change.

Four hooks, each undone by ``uninstrument()``:

* LangChain's own ``register_configure_hook``: every callback manager LangChain configures gets
  our inline handler, so every run (chains, chat models, tools) is seen, however the app builds
  its config. (Cheaper than wrapping ``BaseCallbackManager.__init__``: it runs once per
  configured runnable, not once per child manager.)
* ``Pregel.stream`` / ``Pregel.astream`` (which ``invoke``, ``ainvoke``, ``batch`` and
  ``astream_events`` all go through): the graph run is announced by run id, so its chain start
  becomes an ``invoke_workflow`` span and not just another chain.
* ``RunnableCallable.invoke`` / ``ainvoke`` (where a node's function runs): the node's span is
  made current for the call, attached and detached in that one frame, so spans the app's own code
  starts inside a node are children of the node span.
* ``BaseChatModel._generate_with_cache`` / ``_agenerate_with_cache`` / ``stream`` / ``astream``:
  the chat span is current while the model calls its provider, marked so that a provider
  instrumentation beside ours records the call only once (``provider_calls``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.trace import get_tracer

from chatter_otel.instrumentation.active import set_active_handler
from chatter_otel.instrumentation.cost import Pricer, warm_up
from chatter_otel.instrumentation.embeddings import wrap_openai_embeddings
from chatter_otel.instrumentation.sampling import always_record
from chatter_otel.instrumentation.settings import Settings
from chatter_otel.package import _instruments
from chatter_otel.propagation import throttle_hostile_header_logs
from chatter_otel.version import SCHEMA_URL, __version__

if TYPE_CHECKING:
    from collections.abc import Collection

    from chatter_otel.instrumentation.callbacks import OtelCallbackHandler

__all__ = ["LangGraphInstrumentor"]


class LangGraphInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instrument LangGraph and LangChain with OpenTelemetry GenAI spans.

    ``LangGraphInstrumentor().instrument(tracer_provider=..., logger_provider=...,
    capture_content=..., prices=..., redact=..., max_content_length=..., max_runs=...,
    max_run_age_s=..., stream_usage=..., estimate_usage=..., semconv_opt_in=...)``; each option
    falls back to its environment variable (see the configuration reference), then to the
    default. Idempotent.
    ``logger_provider``: where content events go (the global one when not given);
    ``budgets``: a ``BudgetOptions`` (``meter_provider``: where its counter goes).
    """

    _handler: OtelCallbackHandler | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    @property
    def handler(self) -> OtelCallbackHandler | None:
        """The callback handler while instrumented (for diagnostics and tests)."""
        return self._handler

    def _instrument(self, **kwargs: Any) -> None:
        settings = Settings.resolve(
            capture_content=kwargs.get("capture_content"),
            capture_exception_text=kwargs.get("capture_exception_text"),
            max_content_length=kwargs.get("max_content_length"),
            redact=kwargs.get("redact"),
            max_runs=kwargs.get("max_runs"),
            max_run_age_s=kwargs.get("max_run_age_s"),
            prices=kwargs.get("prices"),
            stream_usage=kwargs.get("stream_usage"),
            estimate_usage=kwargs.get("estimate_usage"),
            semconv_opt_in=kwargs.get("semconv_opt_in"),
        )
        # Recorded whatever the sampler says (at least RECORD_ONLY): the processors see every
        # run of ours; only sampled spans are exported (instrumentation/sampling.py).
        tracer = always_record(
            get_tracer(
                "chatter_otel", __version__, kwargs.get("tracer_provider"), schema_url=SCHEMA_URL
            )
        )
        from chatter_otel.instrumentation import checkpoint_links, hooks, provider_calls
        from chatter_otel.instrumentation.callbacks import OtelCallbackHandler

        events = None
        if settings.emit_events:  # util-genai's content events, on the Logs API
            from opentelemetry._logs import get_logger

            events = get_logger("chatter_otel", __version__, kwargs.get("logger_provider"),
                                schema_url=SCHEMA_URL)  # fmt: skip
        from chatter_otel.instrumentation.budgets import tracker

        budget = tracker(kwargs.get("budgets"), settings.max_runs, kwargs.get("meter_provider"))
        handler = OtelCallbackHandler(tracer, settings, Pricer(settings.prices), events=events,
                                      budget=budget)  # fmt: skip
        throttle_hostile_header_logs()
        warm_up()
        hooks.install(handler, stream_usage=settings.stream_usage)
        provider_calls.install()
        checkpoint_links.install()
        self._unwrap_embeddings = wrap_openai_embeddings(tracer, handler.pricer)
        self._handler = handler
        set_active_handler(handler)
        if kwargs.get("tracer_provider") is None:
            # Instrumented on its own (`opentelemetry-instrument` loads it from its entry point,
            # after the distro set up the SDK): the rest of configure() too, on that provider.
            from chatter_otel.telemetry import configure_for_zero_code

            self._telemetry = configure_for_zero_code()

    _telemetry: Any = None
    _unwrap_embeddings: Any = None

    def _uninstrument(self, **kwargs: Any) -> None:
        from chatter_otel.instrumentation import checkpoint_links, hooks, provider_calls

        hooks.remove()
        provider_calls.remove()
        checkpoint_links.remove()
        if self._unwrap_embeddings is not None:
            self._unwrap_embeddings()
            self._unwrap_embeddings = None
        handler = self._handler
        if handler is not None:
            # Managers built before this point still hold the handler: make it inert, and end
            # what it had open so no span is left dangling.
            handler.enabled = False
            handler.close_all()
        self._handler = None
        set_active_handler(None)
        telemetry, self._telemetry = self._telemetry, None
        if telemetry is not None:
            telemetry.shutdown()
