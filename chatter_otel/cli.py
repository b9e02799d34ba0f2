"""``chatter-otel`` command line: ``demo`` runs the reference workflow and prints its trace."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from chatter_otel.demo import run_demo

    result = run_demo(args.question)
    u = result.usage
    print(result.tree)
    print()
    print(f"answer:          {result.answer}")
    print(f"trace_id:        {result.trace_id}")
    print(f"correlation_id:  {result.correlation_id}")
    print(
        f"usage:           prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens}"
        f" total_tokens={u.total_tokens} cost={u.cost} {u.cost_currency or ''}".rstrip()
    )
    print(
        f"                 provider={u.provider} model={u.model} llm_calls={u.llm_calls}"
        f" tool_calls={u.tool_calls} response_time_ms={u.response_time_ms}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatter-otel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the reference chat workflow and print its trace")
    demo.add_argument("--question", default="What is the weather in Paris?")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
