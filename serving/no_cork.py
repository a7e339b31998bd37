"""BentoML 1.4's adaptive batching without its cork wait: a batch leaves as soon as the model worker is free.

BentoML's `CorkDispatcher` holds a lone request back until it has waited `Optimizer.wait`, which
`Optimizer.trigger_refresh` sets to the mean queue wait of the last 50 batches' first requests
(bentoml/_internal/marshal/dispatcher.py; no upstream issue found, and no setting for it). Under load that is the wait
for a busy model, so after a burst every idle request waits it out and logs the same wait again: it never decays
(bench/load_test.py, 64 clients for 30 s: 0.15 s idle before, 1.31 s 1 s after, still 1.35 s 30 s after; with
`NoCorkOptimizer`, 0.03-0.04 s from 1 s after, and more requests/s under load). Without the cork, the requests that
queue while a forward pass runs still go together into the next one, the batching that pays on a busy model (as
Triton's default max_queue_delay, 0). tests/test_service.py's
test_bentoml_still_corks_idle_requests_with_the_mean_queue_wait fails once BentoML stops doing this.
"""

from __future__ import annotations

from bentoml._internal.marshal import dispatcher


class NoCorkOptimizer(dispatcher.Optimizer):
    """BentoML's adaptive-batching optimizer with its cork wait held at 0."""

    def trigger_refresh(self) -> None:
        super().trigger_refresh()  # keeps the latency fit (o_a, o_b) behind the max_latency_ms refusals
        self.wait = 0


def install() -> None:
    """Every dispatcher built from now on uses NoCorkOptimizer: call it at import of the service module, before the
    model service builds its dispatcher (bentoml is pinned below 1.5)."""
    dispatcher.Optimizer = NoCorkOptimizer
