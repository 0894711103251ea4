"""Live progress of a sweep: per method, trials done/running/stopped/diverged/failed and the best so far.

Derived from the tracker's trial records (no second copy of the state). In a terminal it is a live table;
in logs (CI, `nohup`) one line per finished trial is printed as well.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from peftsweep.orchestrator.tracking import SweepTracker
from peftsweep.spec import SweepSpec


class SweepProgress:
    def __init__(self, spec: SweepSpec, tracker: SweepTracker) -> None:
        self.spec, self.tracker = spec, tracker
        self.live: Any = None
        self._announced: set[str] = set(tracker.trials)  # a resumed sweep's finished trials: said before

    def table(self) -> Table:
        metric = self.spec.search.metric
        busy = sorted({t.method for t in self.tracker.trials.values() if t.status == "running"})
        table = Table(title=f"{self.spec.name}: running {', '.join(busy) or '-'}", show_edge=False)
        for col in (
            "method",
            "done",
            "confirm",
            "running",
            "stopped",
            "diverged",
            "failed",
            f"best {metric}",
            "lr",
            "rank",
        ):
            table.add_column(col, justify="left" if col == "method" else "right")
        for mspec in self.spec.methods:
            mine = [t for t in self.tracker.trials.values() if t.method == mspec.name]
            trials = [t for t in mine if t.role == "search"]  # the budget counts search trials
            confirms = [t for t in mine if t.role == "confirm" and t.status != "running"]
            count = {
                s: sum(t.status == s for t in trials)
                for s in ("completed", "running", "stopped_early", "diverged", "failed")
            }
            best = self.tracker.best_trial(mspec.name)
            table.add_row(
                mspec.name,
                f"{count['completed'] + count['stopped_early'] + count['diverged'] + count['failed']}"
                f"/{self.spec.search.trials_per_method}",
                f"{len(confirms)}/{self.spec.search.confirm_seeds * self.spec.search.confirm_top_k}",
                str(sum(t.status == "running" for t in mine)),
                str(count["stopped_early"]),
                str(count["diverged"]),
                str(count["failed"]),
                f"{best.metrics[metric]:.3f}" if best else "-",
                f"{best.lr:.2e}" if best else "-",
                str(best.rank) if best and best.rank else "-",
            )
        return table

    def update(self) -> None:
        """Called by the Tune callback on every trial event."""
        if self.live is None:
            return
        metric = self.spec.search.metric
        for t in self.tracker.trials.values():
            if t.status != "running" and t.trial_id not in self._announced:
                self._announced.add(t.trial_id)
                value = t.metrics.get(metric)
                shown = f"{value:.3f}" if value is not None else "-"
                rank = t.rank or "-"  # 0: the method has no rank
                why = f": {t.failure}" if t.status == "failed" and t.failure else ""
                self.live.console.print(
                    f"  {t.method:>8} trial {t.trial_id}: lr={t.lr:.2e} rank={rank} → {metric} {shown} "
                    f"at step {int(t.metrics.get('step', 0))} ({t.status}{why})",
                    highlight=False,
                    markup=False,
                )
        self.live.update(self.table())
