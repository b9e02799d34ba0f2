# The reference app (chatter-otel serve), as the compose stack runs it.
FROM python:3.11-slim
WORKDIR /srv
COPY pyproject.toml constraints.txt README.md LICENSE MANIFEST.in ./
COPY chatter_otel ./chatter_otel
RUN pip install --no-cache-dir -c constraints.txt '.[reference]' \
    && useradd --system --uid 10001 chatter
USER chatter
EXPOSE 8000
CMD ["chatter-otel", "serve", "--host", "0.0.0.0", "--port", "8000"]
