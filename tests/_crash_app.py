"""The host app of the crash test, run as a subprocess: ``python -m tests._crash_app MODE URL
SPOOL CONVERSATIONS...``. ``chat`` runs chats and streamed runs until it is killed, printing
``C <message id>`` once a message's commit has returned; ``drain`` writes what the spool holds
and applies the runs no message took, then exits."""

from __future__ import annotations

import asyncio
import sys

from opentelemetry.sdk.trace import TracerProvider

from chatter_otel import configure
from chatter_otel.persistence import UsagePersistence
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from tests.test_persistence import Host


async def main(mode: str, url: str, spool: str, cids: list[str]) -> None:
    host = Host(url)
    p = UsagePersistence(url, spool_path=spool, grace_s=0.0 if mode == "drain" else 30.0)
    tel = configure(tracer_provider=TracerProvider(), persistence=p, prices=LOCAL_MODEL_PRICES)
    if mode == "drain":
        for _ in range(100):
            assert await asyncio.to_thread(p.flush, 20)
            await asyncio.sleep(0.1)
            if not p.stats["spooled"]:
                break
        await asyncio.sleep(1.5)  # one more sweep of the runs no message took
        assert await asyncio.to_thread(p.flush, 20)
        tel.shutdown()
        print("drained", flush=True)
        return
    print("ready", flush=True)
    i = 0
    while True:
        cid = cids[i % len(cids)]
        if i % 3 == 2:
            await host.stream(cid, "What is the weather in Paris?")
        else:
            mid = await host.chat(cid, "What is the weather in Paris?")
            print(f"C {mid}", flush=True)
        i += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
