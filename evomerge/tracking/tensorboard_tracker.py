"""TensorBoard: event files in `<run>/tracking/tensorboard` (or `log_dir`), one scalar per metric
at the row's ledger seq; the parameters as a text table (`params`), the best's recipe and model
card as text (`artifacts/NAME`). View them with `tensorboard --logdir RUN/tracking/tensorboard`.
Written with torch's SummaryWriter (torch is a dependency already; it needs the `tensorboard`
package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.tracking.base import Tracker, TrackerOptions


class TensorBoardOptions(TrackerOptions):
    log_dir: str | None = None  # default: <run>/tracking/tensorboard
    flush_secs: float = 10.0


class TensorBoardTracker(Tracker):
    Options = TensorBoardOptions
    PACKAGE = EXTRA = "tensorboard"  # import name, and pip extra

    def start(self, state: dict[str, Any]) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        log_dir = Path(self.options.log_dir) if self.options.log_dir else self.run.tracking_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=max(1, round(self.options.flush_secs)))
        return {"log_dir": str(log_dir.resolve())}

    def log_params(self, params: dict[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v.replace('|', '&#124;')} |" for k, v in params.items())
        self.writer.add_text("params", f"| setting | value |\n|---|---|\n{rows}", global_step=0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_artifact(self, name: str, text: str) -> None:
        fence = "yaml" if name.endswith((".yaml", ".yml")) else "markdown"
        self.writer.add_text(f"artifacts/{name}", f"```{fence}\n{text}\n```")

    def close(self, status: str) -> None:
        self.writer.close()
