"""A server process for the restart tests: it logs every echo it runs, and serves
until SIGTERM, sharing its TCP port (``python -m tests._restart_server ADDRESS NAME LOG``).

The log is written a line at a time, unbuffered, so a SIGKILL loses none of it:
it is the server's own count of what it processed.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from timer_sdk import EchoEvent, Timer, TimerConfig


async def main(address: str, name: str, log: TextIO) -> None:
    timer = Timer(TimerConfig(name=name))

    def ran(event: EchoEvent) -> None:
        log.write(event.message + "\n")

    timer.add_echo_listener(ran)
    server = await timer.serve(address, reuse_port=True)
    print(server.address, flush=True)
    await server.serve_until_signal(shutdown_timeout=30, report=lambda _: None)


if __name__ == "__main__":
    with open(sys.argv[3], "a", buffering=1) as log:
        asyncio.run(main(sys.argv[1], sys.argv[2], log))
