"""An exponential moving average of the weights in host memory, updated in the background (arXiv 2412.19437
§3.2.3: the EMA costs no device memory and no step time).

Each rank keeps the EMA of the parameters it owns under ZeRO-1 (1/dp of them). `update()` after an applied
optimizer step copies the new weights to the host and blends them in on a worker thread; `wait()` must run
before anything writes those weights again (the next optimizer step) or reads the averages (a checkpoint).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moetron.device import HOST


class WeightEMA:
    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.params, self.decay = params, decay
        self.averages = {key: p.detach().to(HOST, copy=True) for key, p in params.items()}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetron-ema")
        self._pending: Future | None = None

    def update(self) -> None:
        """Blend the current weights in: avg <- avg + (1 - decay) * (w - avg), in the background."""
        self.wait()

        @torch.no_grad()
        def blend():
            for key, avg in self.averages.items():
                avg.lerp_(self.params[key].detach().to(HOST), 1.0 - self.decay)

        self._pending = self._worker.submit(blend)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.wait()
        self._worker.shutdown()
