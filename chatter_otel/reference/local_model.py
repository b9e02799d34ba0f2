"""A deterministic local chat model that reports usage like a real provider, with no network.

It backs the demo and the reference app on embedded defaults. Rules, so runs are reproducible:

* with tools bound and a user message last, it calls the first tool, filling each string
  argument with the last word of the message (``"weather in Paris"`` -> ``{"city": "Paris"}``);
* after tool results, it answers with them; otherwise it answers ``"You said: ..."``;
* usage: one token per whitespace-separated word of the input and of the output; streamed runs
  carry the usage on the last chunk, like OpenAI's ``stream_options.include_usage``.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.runnables import Runnable

__all__ = ["LOCAL_MODEL_PRICES", "LocalChatModel"]

LOCAL_MODEL_PRICES = {"chatter-local-1": {"input_mtok": "0.50", "output_mtok": "1.50"}}
"""An override-table entry pricing the local model (USD per million tokens), for the demo."""


def _words(text: str) -> int:
    return len(text.split())


def _text(message: BaseMessage) -> str:
    content = message.content
    return content if isinstance(content, str) else " ".join(map(str, content))


class LocalChatModel(BaseChatModel):
    """Deterministic chat model; see the module docstring for its rules."""

    model_name: str = "chatter-local-1"

    @property
    def _llm_type(self) -> str:
        return "chatter-local"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "chatter.local"
        params["ls_model_name"] = self.model_name
        return params

    def bind_tools(
        self, tools: Sequence[Any], **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _reply(self, messages: list[BaseMessage], tools: list[dict[str, Any]] | None) -> AIMessage:
        last = messages[-1] if messages else None
        prompt_tokens = sum(_words(_text(m)) for m in messages)
        digest = hashlib.sha1(repr([_text(m) for m in messages]).encode()).hexdigest()[:12]
        if tools and last is not None and last.type == "human":
            fn = tools[0]["function"]
            word = (_text(last).split() or [""])[-1].strip("?.!,")
            props = fn.get("parameters", {}).get("properties", {})
            args = {k: word for k, v in props.items() if v.get("type", "string") == "string"}
            content, calls = "", [{"name": fn["name"], "args": args, "id": f"call_{digest}"}]
            finish = "tool_calls"
        else:
            results = [_text(m) for m in messages if isinstance(m, ToolMessage)]
            content = (
                "Here is what I found: " + "; ".join(results)
                if results
                else "You said: " + (_text(last) if last is not None else "")
            )
            calls, finish = [], "stop"
        completion_tokens = _words(content) + sum(1 + len(c["args"]) for c in calls)
        return AIMessage(
            content=content,
            tool_calls=calls,
            id=f"local-{digest}",
            usage_metadata=UsageMetadata(
                input_tokens=prompt_tokens,
                output_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
            response_metadata={
                "model_name": self.model_name,
                "finish_reason": finish,
                "id": f"local-{digest}",
            },
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        reply = self._reply(messages, kwargs.get("tools"))
        return ChatResult(generations=[ChatGeneration(message=reply)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        reply = self._reply(messages, kwargs.get("tools"))
        text = reply.content if isinstance(reply.content, str) else ""
        words = text.split(" ") if text else []
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece, id=reply.id))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                id=reply.id,
                tool_call_chunks=[
                    {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                    for i, c in enumerate(reply.tool_calls)
                ],
                usage_metadata=reply.usage_metadata,
                response_metadata=reply.response_metadata,
                chunk_position="last",
            )
        )
