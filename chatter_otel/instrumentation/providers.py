"""Which provider served a call: ``ls_provider`` or class name -> ``gen_ai.provider.name``.

Known providers map to the semantic conventions' well-known values; anything else is kept as the
lower-cased name LangChain reports (the conventions allow custom values), so it is never lost.
"""

from __future__ import annotations

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GenAiProviderNameValues as P,
)

_BY_LS_PROVIDER: dict[str, str] = {
    "openai": P.OPENAI.value,
    "azure": P.AZURE_AI_OPENAI.value,
    "azure_openai": P.AZURE_AI_OPENAI.value,
    "azure-openai": P.AZURE_AI_OPENAI.value,
    "azure_ai": P.AZURE_AI_INFERENCE.value,
    "anthropic": P.ANTHROPIC.value,
    "bedrock": P.AWS_BEDROCK.value,
    "amazon_bedrock": P.AWS_BEDROCK.value,
    "aws": P.AWS_BEDROCK.value,
    "google_genai": P.GCP_GEMINI.value,
    "google": P.GCP_GEMINI.value,
    "gemini": P.GCP_GEMINI.value,
    "google_vertexai": P.GCP_VERTEX_AI.value,
    "vertexai": P.GCP_VERTEX_AI.value,
    "cohere": P.COHERE.value,
    "groq": P.GROQ.value,
    "mistral": P.MISTRAL_AI.value,
    "mistralai": P.MISTRAL_AI.value,
    "deepseek": P.DEEPSEEK.value,
    "xai": P.X_AI.value,
    "perplexity": P.PERPLEXITY.value,
    "watsonx": P.IBM_WATSONX_AI.value,
    "ibm": P.IBM_WATSONX_AI.value,
}

# Class-name prefixes for models that do not report ls_provider.
_BY_CLASS: tuple[tuple[str, str], ...] = (
    ("AzureChatOpenAI", P.AZURE_AI_OPENAI.value),
    ("ChatOpenAI", P.OPENAI.value),
    ("ChatAnthropic", P.ANTHROPIC.value),
    ("ChatBedrock", P.AWS_BEDROCK.value),
    ("ChatGoogleGenerativeAI", P.GCP_GEMINI.value),
    ("ChatVertexAI", P.GCP_VERTEX_AI.value),
    ("ChatGroq", P.GROQ.value),
    ("ChatMistralAI", P.MISTRAL_AI.value),
    ("ChatDeepSeek", P.DEEPSEEK.value),
    ("ChatXAI", P.X_AI.value),
    ("ChatCohere", P.COHERE.value),
)

# gen_ai.provider.name -> the provider id genai-prices uses.
PRICE_PROVIDER_IDS: dict[str, str] = {
    P.OPENAI.value: "openai",
    P.AZURE_AI_OPENAI.value: "azure",
    P.ANTHROPIC.value: "anthropic",
    P.AWS_BEDROCK.value: "aws",
    P.GCP_GEMINI.value: "google",
    P.GCP_GEN_AI.value: "google",
    P.GCP_VERTEX_AI.value: "google",
    P.COHERE.value: "cohere",
    P.GROQ.value: "groq",
    P.MISTRAL_AI.value: "mistral",
    P.DEEPSEEK.value: "deepseek",
    P.X_AI.value: "x-ai",
    P.PERPLEXITY.value: "perplexity",
}


def provider_name(ls_provider: object, class_name: str | None) -> str | None:
    """The ``gen_ai.provider.name`` for a call, or None when nothing names a provider."""
    if isinstance(ls_provider, str) and ls_provider:
        key = ls_provider.strip().lower()
        return _BY_LS_PROVIDER.get(key, key[:64])
    if class_name:
        for prefix, value in _BY_CLASS:
            if class_name.startswith(prefix):
                return value
    return None
