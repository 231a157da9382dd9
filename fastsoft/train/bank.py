"""The prompt bank: ``S`` soft-prompt slots ``[S, P, H]`` (fp32 master copy) with per-slot Adam state.

Only the slots present in a step are updated: Adam with a zero gradient still moves a parameter
(its moments are non-zero), so absent slots are masked out, and each slot keeps its own step count
and learning rate (jobs sit at different points of their schedules).
"""

from __future__ import annotations

import torch


class PromptBank:
    def __init__(
        self,
        slots: int,
        length: int,
        hidden: int,
        device="cpu",
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.prompts = torch.zeros(slots, length, hidden, device=device, requires_grad=True)  # [S, P, H]
        self.exp_avg = torch.zeros(slots, length, hidden, device=device)
        self.exp_avg_sq = torch.zeros(slots, length, hidden, device=device)
        self.steps = torch.zeros(slots, dtype=torch.int64)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    @property
    def slots(self) -> int:
        return self.prompts.shape[0]

    @property
    def length(self) -> int:
        return self.prompts.shape[1]

    @torch.no_grad()
    def assign(self, slot: int, prompt: torch.Tensor) -> None:
        """Put a fresh prompt ``[P, H]`` into ``slot`` and reset its optimizer state."""
        self.prompts[slot] = prompt.to(self.prompts)
        self.exp_avg[slot].zero_()
        self.exp_avg_sq[slot].zero_()
        self.steps[slot] = 0

    def get(self, slot: int) -> torch.Tensor:
        return self.prompts[slot].detach().clone()

    @torch.no_grad()
    def step(self, lrs: dict[int, float]) -> None:
        """One Adam step (decoupled weight decay) for the slots in ``lrs`` (slot -> learning rate) only."""
        grad = self.prompts.grad
        beta1, beta2 = self.betas
        for slot, lr in lrs.items():
            g = grad[slot] if grad is not None else torch.zeros_like(self.prompts[slot])
            self.steps[slot] += 1
            t = int(self.steps[slot])
            self.exp_avg[slot].lerp_(g, 1 - beta1)
            self.exp_avg_sq[slot].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (self.exp_avg_sq[slot] / (1 - beta2**t)).sqrt_().add_(self.eps)
            if self.weight_decay:
                self.prompts[slot].mul_(1 - lr * self.weight_decay)
            self.prompts[slot].addcdiv_(self.exp_avg[slot], denom, value=-lr / (1 - beta1**t))
        self.prompts.grad = None

    def state_dict(self) -> dict:
        return {
            "prompts": self.prompts.detach().clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "steps": self.steps.clone(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.prompts.copy_(state["prompts"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.steps.copy_(state["steps"])
