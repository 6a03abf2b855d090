"""Run one check per item, each in a child process forked from the sweep's own process (torch, timm,
transformers and normswap already imported there, so a child starts at once), a few at a time, each
killed past its timeout: a crash or a hang is that item's result, not the sweep's end."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any


def _child(check: Callable[..., dict], item: Any, conn) -> None:
    result = check(item, lambda partial: conn.send(("partial", partial)))
    conn.send(("done", result))
    conn.close()


def run_forked(items: list, check: Callable[..., dict], failed: Callable[[Any, str, dict | None], dict], *,
               workers: int, timeout: float, done: Callable[[dict], None]) -> None:
    """``done(check(item, report))`` for every item, ``check`` running in a forked child; it may ``report`` a
    partial result as it goes (e.g. "built"). ``failed(item, why, last partial result)`` stands in for a child
    that died or ran past ``timeout`` seconds. Fork before any intra-op thread pool exists (set
    ``torch.set_num_threads(1)`` and run nothing heavy in the parent)."""
    ctx = multiprocessing.get_context("fork")
    pending, running = list(items), []
    while pending or running:
        while pending and len(running) < workers:
            item = pending.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(check, item, send), daemon=True)
            proc.start()
            send.close()
            running.append([item, proc, receive, time.time(), None])
        time.sleep(0.2)
        for entry in list(running):
            item, proc, receive, start, partial = entry
            result = None
            try:
                while result is None and receive.poll():
                    kind, value = receive.recv()
                    if kind == "partial":
                        entry[4] = partial = value
                    else:
                        result = value
            except EOFError:
                result = failed(item, f"the child died (exit {proc.exitcode})", partial)
            if result is None and not proc.is_alive() and not receive.poll():
                result = failed(item, f"the child died (exit {proc.exitcode})", partial)
            elif result is None and time.time() - start > timeout:
                proc.kill()
                result = failed(item, f"timed out after {timeout:.0f} s", partial)
            if result is not None:
                proc.join(5)
                receive.close()
                running.remove(entry)
                done(result)


class ResultLog:
    """A sweep's results, one JSON line each, appended as they come (``path`` may be ``None``: kept in memory
    only); ``key(result)`` names an item, and a rerun skips the items the file already holds."""

    def __init__(self, path: str | None, key: Callable[[dict], Any]) -> None:
        self.path, self.key = path, key
        self.earlier: dict[Any, dict] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.earlier = {key(r): r for r in map(json.loads, f) if r}
        self.new: list[dict] = []

    def add(self, result: dict) -> None:
        self.new.append(result)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(result) + "\n")

    @property
    def all(self) -> list[dict]:
        return [*self.earlier.values(), *self.new]
