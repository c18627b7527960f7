"""Metric callables for tests/test_sweep.py (``eval.callable: sweep_metrics:<name>``)."""
from __future__ import annotations

import torch

calls = []  # one entry per call of any metric here


def first_logit(model, tokenizer) -> dict[str, float]:
    """A deterministic function of the weights: the first logit of a fixed prompt."""
    calls.append("first_logit")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]], device=model.device)).logits
    return {"first_logit": float(logits[0, -1, 0])}


def fails_every_other(model, tokenizer) -> dict[str, float]:
    """Raises on every second call of a process (a metric that fails for some configurations)."""
    calls.append("fails")
    if len([c for c in calls if c == "fails"]) % 2 == 0:
        raise RuntimeError("metric failed")
    return first_logit(model, tokenizer)


def interrupt_on_third(model, tokenizer) -> dict[str, float]:
    """Ctrl-C during the third evaluation of a process."""
    calls.append("interrupt")
    if len([c for c in calls if c == "interrupt"]) == 3:
        raise KeyboardInterrupt
    return first_logit(model, tokenizer)
