"""Progress of a corpus run: a tqdm bar on a terminal, plain log lines otherwise, nothing with --quiet."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """A tqdm bar on a terminal; plain log lines every `every` seconds otherwise; nothing with quiet.

    `every` defaults to $EXTRACTOR_PROGRESS_SECONDS, else 10 seconds.
    """

    def __init__(self, total: int | None, quiet: bool, every: float | None = None) -> None:
        if every is None:
            every = float(os.environ.get("EXTRACTOR_PROGRESS_SECONDS") or 10.0)
        self.quiet, self.every, self.total = quiet, every, total
        self.docs, self.tokens = 0, 0
        self.start = self.last = time.time()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", dynamic_ncols=True, file=sys.stderr)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix(tokens_per_s=f"{self.tokens / elapsed:,.0f}", refresh=False)
        elif not self.quiet and time.time() - self.last >= self.every:
            self.last = time.time()
            rate = self.docs / elapsed
            eta = f", ETA {((self.total - self.docs) / rate):.0f}s" if self.total and rate > 0 else ""
            print(
                f"progress: {self.docs}/{self.total or '?'} documents, {rate:.1f} docs/s, "
                f"{self.tokens / elapsed:,.0f} tokens/s{eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
