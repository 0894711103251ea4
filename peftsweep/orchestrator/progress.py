"""Live progress of a sweep: per method, trials done/running/stopped/diverged/failed and the best so far.

Derived from the tracker's trial records (no second copy of the state). In a terminal it is a live table,
rendered by rich's Live at its own refresh rate (never once per Tune event: a sweep of thousands of trials
has tens of thousands of events). In logs (CI, `nohup`), where Live shows only the final table, lines are
printed as well: one per finished trial when the sweep has few methods; with many, one per finished method
and one per tenth of the sweep, so 20 methods × 100 trials stay readable.

With more methods than `MAX_ROWS`, the table shows the leaders (best so far first, methods with trials
running before idle ones of the same score) and one row summing up the rest; the title carries the totals.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from peftsweep.orchestrator import scoring
from peftsweep.orchestrator.tracking import SweepTracker, TrialRecord
from peftsweep.spec import SweepSpec

MAX_ROWS = 12  # method rows of the live table; beyond, the rest are one summary row
PER_TRIAL_LINES_UP_TO = 6  # methods up to which every finished trial gets a line; beyond, milestones
MILESTONES = 10  # with many methods: a line each time another 1/MILESTONES of the search budget is done
FINISHED = ("completed", "stopped_early", "diverged", "failed")
# Live's redraws a second. Rendering the table takes the driver's GIL for ~35 ms at 20 methods, which Tune's
# event loop then waits for; at 2 a second that was ~7 % of a core during a big sweep (bench/scale.py).
REFRESH_PER_SECOND = 1


def snapshot(tracker: SweepTracker) -> list[TrialRecord]:
    """The tracker's records, read safely from Live's refresh thread while the driver adds trials."""
    for _ in range(5):
        try:
            return list(tracker.trials.values())
        except RuntimeError:  # the dict grew during the copy: copy again
            continue
    return []


class SweepProgress:
    def __init__(self, spec: SweepSpec, tracker: SweepTracker, max_rows: int = MAX_ROWS) -> None:
        self.spec, self.tracker, self.max_rows = spec, tracker, max_rows
        self.live: Any = None
        self.per_trial = len(spec.methods) <= PER_TRIAL_LINES_UP_TO
        self._seen = len(tracker.trials)  # a resumed sweep's finished trials: said before
        self._open: dict[str, TrialRecord] = {}  # trials seen running, not announced yet
        self._done = sum(t.status in FINISHED and t.role == "search" for t in tracker.trials.values())
        self._budget = spec.search.trials_per_method * len(spec.methods)
        self._milestone = self._done * MILESTONES // max(1, self._budget)
        self._table: Table | None = None
        self._dirty = True
        self._changed: set[str] | None = None  # methods with a trial event since the last table; None: all
        self._rows: dict[str, dict[str, Any]] = {}  # each method's row in the last table
        self._lock = threading.Lock()  # Live's refresh thread renders while the driver updates

    def __rich__(self) -> Table:
        """What Live renders at each refresh: the table, rebuilt only when a trial event came since, and
        then only the rows of the methods it came from (a row scores all of its method's trials: rebuilding
        all 20 took the GIL for 24 ms a redraw at 2,000 trials, bench/scale.py)."""
        with self._lock:
            if self._dirty or self._table is None:
                changed, self._changed, self._dirty = self._changed, set(), False
                self._table = self.table(changed)
            return self._table

    def table(self, changed: set[str] | None = None) -> Table:
        """The table. ``changed``: the only methods whose rows may differ from the last one's (None: all)."""
        metric = self.spec.search.metric
        trials = snapshot(self.tracker)
        by_method: dict[str, list[TrialRecord]] = {m.name: [] for m in self.spec.methods}
        for t in trials:
            by_method.setdefault(t.method, []).append(t)
        for name, mine in by_method.items():
            if changed is None or name in changed or name not in self._rows:
                self._rows[name] = self._row(name, mine)
        rows = [self._rows[name] for name in by_method]
        busy = [row["method"] for row in rows if row["running"]]
        search_done = sum(row["done"] for row in rows)
        confirm_done = sum(row["confirm"] for row in rows)
        title = f"{self.spec.name}: running {', '.join(busy) or '-'}"
        if len(rows) > self.max_rows:
            title = (
                f"{self.spec.name}: {search_done}/{self._budget} search trials done, "
                f"{confirm_done}/{self._confirm_budget() * len(rows)} confirmation runs, "
                f"{sum(row['running'] for row in rows)} running in {len(busy)} of {len(rows)} methods"
            )
        table = Table(title=title, show_edge=False)
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
        shown, rest = self._leaders(rows)
        for row in shown:
            table.add_row(*self._cells(row))
        if rest:
            table.add_row(*self._cells(self._sum(rest)), style="dim")
        return table

    def _confirm_budget(self) -> int:
        return self.spec.search.confirm_seeds * self.spec.search.confirm_top_k

    def _row(self, method: str, mine: Sequence[TrialRecord]) -> dict[str, Any]:
        search = [t for t in mine if t.role == "search"]  # the budget counts search trials
        count = {s: sum(t.status == s for t in search) for s in FINISHED}
        best = self._best(mine)
        metric = self.spec.search.metric or ""
        return {
            "method": method,
            "done": sum(count.values()),
            "budget": self.spec.search.trials_per_method,
            "confirm": sum(t.role == "confirm" and t.status != "running" for t in mine),
            "confirm_budget": self._confirm_budget(),
            "running": sum(t.status == "running" for t in mine),
            "stopped": count["stopped_early"],
            "diverged": count["diverged"],
            "failed": count["failed"],
            "best": best.metrics.get(metric) if best else None,
            "lr": best.lr if best else None,
            "rank": best.rank if best else None,
        }

    def _best(self, mine: Sequence[TrialRecord]) -> TrialRecord | None:
        """`SweepTracker.best_trial` over a snapshot of the method's trials (the Live thread's view)."""
        return scoring.representative_trial(mine, self.spec.search.metric or "", self.spec.search.direction)

    def _leaders(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """All rows in spec order when they fit; else the best so far first (ties: trials running first)."""
        if len(rows) <= self.max_rows:
            return rows, []
        sign = 1.0 if self.spec.search.direction == "max" else -1.0
        ordered = sorted(
            rows,
            key=lambda r: (
                r["best"] is None,
                -sign * r["best"] if r["best"] is not None else 0.0,
                -r["running"],
            ),
        )
        keep = self.max_rows - 1  # the last row sums up the others
        return ordered[:keep], ordered[keep:]

    @staticmethod
    def _sum(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": f"+ {len(rows)} more methods",
            "best": None,
            "lr": None,
            "rank": None,
        }
        for key in (
            "done",
            "budget",
            "confirm",
            "confirm_budget",
            "running",
            "stopped",
            "diverged",
            "failed",
        ):
            out[key] = sum(r[key] for r in rows)
        return out

    @staticmethod
    def _cells(row: dict[str, Any]) -> list[str]:
        return [
            row["method"],
            f"{row['done']}/{row['budget']}",
            f"{row['confirm']}/{row['confirm_budget']}",
            str(row["running"]),
            str(row["stopped"]),
            str(row["diverged"]),
            str(row["failed"]),
            f"{row['best']:.3f}" if row["best"] is not None else "-",
            f"{row['lr']:.2e}" if row["lr"] is not None else "-",
            str(row["rank"]) if row["rank"] else "-",  # 0: the method has no rank
        ]

    def update(self, method: str | None = None) -> None:
        """Called by the Tune callback on every trial event (of ``method``; None: of any): cheap (only the
        trials started or open since the last call are looked at); the table is rebuilt at Live's next
        refresh."""
        with self._lock:
            self._dirty = True
            if method is None:
                self._changed = None
            elif self._changed is not None:
                self._changed.add(method)
        if self.live is None:
            return
        trials = self.tracker.trials
        if len(trials) > self._seen:  # new trials: dicts keep insertion order
            for t in list(trials.values())[self._seen :]:
                self._open[t.trial_id] = t
            self._seen = len(trials)
        finished = [t for t in self._open.values() if t.status != "running"]
        for t in finished:
            del self._open[t.trial_id]
            if t.role == "search" and t.status in FINISHED:
                self._done += 1
            if self.per_trial:
                self._say_trial(t)
        if not self.per_trial and finished:
            self._say_milestone()

    def _say(self, line: str) -> None:
        self.live.console.print(line, highlight=False, markup=False)

    def _say_trial(self, t: TrialRecord) -> None:
        metric = self.spec.search.metric
        value = t.metrics.get(metric)
        shown = f"{value:.3f}" if value is not None else "-"
        rank = t.rank or "-"  # 0: the method has no rank
        why = f": {t.failure}" if t.status == "failed" and t.failure else ""
        self._say(
            f"  {t.method:>8} trial {t.trial_id}: lr={t.lr:.2e} rank={rank} → {metric} {shown} "
            f"at step {int(t.metrics.get('step', 0))} ({t.status}{why})"
        )

    def _say_milestone(self) -> None:
        reached = self._done * MILESTONES // max(1, self._budget)
        if reached <= self._milestone:
            return
        self._milestone = reached
        running = sum(t.status == "running" for t in self._open.values())
        leaders = self._leader_text(3)
        self._say(
            f"  {self._done}/{self._budget} search trials done ({self._done / max(1, self._budget):.0%}), "
            f"{running} running" + (f"; best so far: {leaders}" if leaders else "")
        )

    def _leader_text(self, k: int) -> str:
        metric = self.spec.search.metric or ""
        sign = 1.0 if self.spec.search.direction == "max" else -1.0
        trials = snapshot(self.tracker)
        bests = [(m.name, self._best([t for t in trials if t.method == m.name])) for m in self.spec.methods]
        bests = [(name, b) for name, b in bests if b is not None and b.metrics.get(metric) is not None]
        bests.sort(key=lambda nb: -sign * nb[1].metrics[metric])
        return ", ".join(f"{name} {b.metrics[metric]:.3f}" for name, b in bests[:k])

    def method_done(self, method: str) -> None:
        """A line when a method's search and confirmation are over (the sweep's `on_done`)."""
        if self.live is None:
            return
        metric = self.spec.search.metric
        mine = [t for t in snapshot(self.tracker) if t.method == method]
        best = self._best(mine)
        found = "no result"
        if best is not None and best.metrics.get(metric) is not None:
            found = f"best {metric} {best.metrics[metric]:.3f} at lr {best.lr:.2e}"
            found += f" rank {best.rank}" if best.rank else ""
        confirm = sum(t.role == "confirm" for t in mine)
        self._say(f"  {method} done: {found} ({len(mine) - confirm} trials + {confirm} confirmation runs)")
