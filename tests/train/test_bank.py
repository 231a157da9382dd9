"""The prompt bank (per-slot Adam) and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from fastsoft.train.bank import PromptBank
from fastsoft.train.lr_schedule import lr_at


def test_schedule_is_warmup_then_cosine():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_bank_updates_only_the_slots_given():
    bank = PromptBank(3, 2, 4)
    for slot in range(3):
        bank.assign(slot, torch.full((2, 4), float(slot)))
    (bank.prompts[0].sum() + 0 * bank.prompts[1].sum()).backward()  # slot 1 present with zero grad, slot 2 absent
    bank.step({0: 0.1, 1: 0.1})
    before = bank.get(1)
    (bank.prompts[0].sum()).backward()
    bank.step({0: 0.1})
    assert torch.equal(bank.get(1), before)  # Adam with zero grad would still move it: it was masked out
    assert torch.equal(bank.get(2), torch.full((2, 4), 2.0))
    assert bank.steps.tolist() == [2, 1, 0]
    torch.testing.assert_close(bank.get(0), torch.full((2, 4), -0.2))  # Adam's first steps move by lr each
