"""The progress bar of a compression run: one bar over every job's step budget, with the step rate, the scored
tokens a second and the latest losses. Finished and failed jobs fill the rest of their budget at once."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class RunProgress:
    def __init__(self, total_steps: int, done_steps: int, enabled: bool):
        self.bar = tqdm(total=total_steps, unit="step", disable=not enabled, dynamic_ncols=True)
        self.bar.update(done_steps)

    def say(self, what: str) -> None:
        self.bar.set_description(what)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def after_step(self, counts: dict[str, int], scored_per_second: float, losses: dict[str, float]) -> None:
        """Redraw once a step: queue counts, scored (answer) tokens trained per second of the steps so far, up to 4
        jobs' latest loss."""
        self.bar.set_description("train", refresh=False)
        self.bar.set_postfix(
            **counts,
            scored_tok_s=f"{scored_per_second:.0f}",
            loss=" ".join(f"{k}={v:.3f}" for k, v in list(losses.items())[:4]),
        )

    def close(self) -> None:
        self.bar.close()

    @staticmethod
    def note(message: str) -> None:
        """A line above the bar (on stderr)."""
        tqdm.write(f"fastsoft: {message}", file=sys.stderr)
