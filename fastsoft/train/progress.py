"""The progress bar of a compression run: one bar over every job's step budget, with the step rate and the
latest losses. Finished and failed jobs fill the rest of their budget at once."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class RunProgress:
    def __init__(self, total_steps: int, done_steps: int, enabled: bool):
        self.bar = tqdm(total=total_steps, unit="step", disable=not enabled, dynamic_ncols=True)
        self.bar.update(done_steps)
        self.started = time.perf_counter()

    def say(self, what: str) -> None:
        self.bar.set_description(what)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def after_step(self, counts: dict[str, int], tokens: int, losses: dict[str, float]) -> None:
        """Redraw once a step: queue counts, trained tokens per second since the start, up to 4 jobs' latest loss."""
        self.bar.set_description("train", refresh=False)
        rate = tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(
            **counts, tok_s=f"{rate:.0f}", loss=" ".join(f"{k}={v:.3f}" for k, v in list(losses.items())[:4])
        )

    def close(self) -> None:
        self.bar.close()

    @staticmethod
    def note(message: str) -> None:
        """A line above the bar (on stderr)."""
        tqdm.write(f"fastsoft: {message}", file=sys.stderr)
