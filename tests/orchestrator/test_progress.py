"""The live view of a sweep (orchestrator/progress.py) stays readable and cheap with many methods: a fake
tracker (the real `TrialRecord`s, no MLflow) with the quickstart's 4 methods and with 18 methods × 100."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from peftsweep import search_spaces
from peftsweep.orchestrator import progress as progress_module
from peftsweep.orchestrator.progress import MAX_ROWS, MILESTONES, SweepProgress
from peftsweep.orchestrator.tracking import TrialRecord
from peftsweep.spec import SweepSpec, parse_spec

CPU_METHODS = [m for m in search_spaces.method_names() if not search_spaces.get_method(m).requires_cuda]


def _spec(methods: list[str], trials: int) -> SweepSpec:
    search, resources = {"trials_per_method": trials}, {"zero_stage": 0}  # every method runs at ZeRO 0
    return parse_spec({"name": "prog", "methods": methods, "search": search, "resources": resources})


def _trial(method: str, i: int, value: float, status: str = "completed", role: str = "search") -> TrialRecord:
    return TrialRecord(
        method, f"{method}-{i}", f"run-{method}-{i}", lr=1e-3 * (1 + i % 7), rank=8, status=status, role=role,
        metrics={"exact_match": value, "step": 150}, has_adapter=True,
    )  # fmt: skip


class Tracker(SimpleNamespace):
    """What the progress reads of a `SweepTracker`: its records by trial id, in start order."""

    def add(self, record: TrialRecord) -> TrialRecord:
        self.trials[record.trial_id] = record
        return record


def _live(spec: SweepSpec, tracker: Tracker) -> tuple[SweepProgress, io.StringIO]:
    out = io.StringIO()
    progress = SweepProgress(spec, tracker)  # type: ignore[arg-type]
    progress.live = SimpleNamespace(console=Console(file=out, width=200))
    return progress, out


def _rows(progress: SweepProgress) -> list[list[str]]:
    table = progress.table()
    return [list(r) for r in zip(*(c._cells for c in table.columns), strict=True)]


def test_few_methods_one_row_each_in_spec_order_and_a_line_per_finished_trial() -> None:
    spec = _spec(["lora", "pissa", "milora", "dora"], 8)
    tracker = Tracker(trials={})
    progress, out = _live(spec, tracker)
    running = tracker.add(_trial("pissa", 0, 0.1, status="running"))
    progress.update()
    assert out.getvalue() == ""  # a running trial is not announced
    running.status = "stopped_early"
    progress.update()
    progress.update()  # announced once
    assert out.getvalue().count("trial pissa-0") == 1 and "stopped_early" in out.getvalue()
    rows = _rows(progress)
    assert [r[0] for r in rows] == ["lora", "pissa", "milora", "dora"]
    assert rows[1][1:3] == ["1/8", "0/4"]


@pytest.fixture(scope="module")
def many() -> tuple[SweepSpec, Tracker]:
    """18 methods × 100 search trials + 4 confirmation runs each; method k's best score rises with k."""
    spec = _spec(CPU_METHODS, 100)
    tracker = Tracker(trials={})
    for k, method in enumerate(CPU_METHODS):
        for i in range(100):
            tracker.add(_trial(method, i, 0.01 * k * (i % 10) / 9, "completed" if i % 3 else "stopped_early"))
        for seed in range(4):
            tracker.add(_trial(method, 100 + seed, 0.01 * k, role="confirm"))
    return spec, tracker


def test_many_methods_the_table_shows_the_leaders_and_one_row_sums_up_the_rest(
    many: tuple[SweepSpec, Tracker],
) -> None:
    spec, tracker = many
    progress, _ = _live(spec, tracker)
    table = progress.table()
    rows = _rows(progress)
    assert len(rows) == MAX_ROWS  # 18 methods: MAX_ROWS - 1 leaders + one summary row
    leaders = [r[0] for r in rows[:-1]]
    assert leaders == CPU_METHODS[::-1][: MAX_ROWS - 1]  # best score first
    rest = len(CPU_METHODS) - (MAX_ROWS - 1)
    assert rows[-1][0] == f"+ {rest} more methods" and rows[-1][1] == f"{rest * 100}/{rest * 100}"
    assert "1800/1800 search trials done" in str(table.title)
    assert "72/72 confirmation runs" in str(table.title)


def test_many_methods_a_line_per_tenth_of_the_sweep_and_per_finished_method_not_per_trial(
    many: tuple[SweepSpec, Tracker],
) -> None:
    spec, full = many
    tracker = Tracker(trials={})
    progress, out = _live(spec, tracker)
    for record in full.trials.values():  # the sweep replayed: each trial starts, then finishes
        done = TrialRecord(**vars(record))
        record = tracker.add(TrialRecord(**(vars(record) | {"status": "running"})))
        progress.update()
        record.status = done.status
        progress.update()
    for method in spec.methods:
        progress.method_done(method.name)
    lines = out.getvalue().splitlines()
    milestones = [line for line in lines if "search trials done" in line]
    assert len(milestones) == MILESTONES and "1800/1800 search trials done (100%)" in milestones[-1]
    assert "best so far: vera 0." in milestones[-1]  # the leader first
    assert len(lines) == MILESTONES + len(spec.methods)  # nothing per trial
    assert "vera done: best exact_match 0.1" in out.getvalue()
    assert "(100 trials + 4 confirmation runs)" in out.getvalue()


def test_the_table_is_built_at_lives_refresh_only_when_a_trial_event_came(
    many: tuple[SweepSpec, Tracker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial event (thousands of them in a big sweep) never rebuilds the table itself: Live renders it at
    its own rate, and only when something changed since."""
    spec, tracker = many
    progress, _ = _live(spec, tracker)
    built = []
    real = SweepProgress.table
    monkeypatch.setattr(SweepProgress, "table", lambda self, *a: built.append(1) or real(self, *a))
    for _ in range(500):
        progress.update()
    assert built == []
    Console(file=io.StringIO()).print(progress)  # what Live does at a refresh
    Console(file=io.StringIO()).print(progress)
    assert len(built) == 1  # nothing changed between the two refreshes
    progress.update()
    Console(file=io.StringIO()).print(progress)
    assert len(built) == 2


def test_a_refresh_rescores_only_the_methods_a_trial_event_came_from(
    many: tuple[SweepSpec, Tracker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring a method's row reads all its trials: at a refresh only the rows of methods with news are."""
    spec, full = many
    tracker = Tracker(trials=dict(full.trials))
    progress, _ = _live(spec, tracker)
    scored: list[str] = []
    real = SweepProgress._row
    monkeypatch.setattr(
        SweepProgress, "_row", lambda self, name, mine: scored.append(name) or real(self, name, mine)
    )
    Console(file=io.StringIO()).print(progress)
    assert sorted(scored) == sorted(CPU_METHODS)  # the first table: every row
    scored.clear()
    done = progress._rows[CPU_METHODS[0]]["done"]
    news = tracker.add(_trial(CPU_METHODS[0], 999, 0.5))  # another finished trial of the first method
    progress.update(news.method)
    Console(file=io.StringIO()).print(progress)
    assert scored == [CPU_METHODS[0]]
    assert progress._rows[CPU_METHODS[0]]["done"] == done + 1
    scored.clear()
    progress.update()  # an event of unknown method: every row again
    Console(file=io.StringIO()).print(progress)
    assert sorted(scored) == sorted(CPU_METHODS)


def test_a_snapshot_survives_the_driver_adding_a_trial_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Live renders from its own thread: a copy of the records that races an insert is taken again."""

    class Racing(dict):
        attempts = 0

        def values(self):  # noqa: ANN202
            Racing.attempts += 1
            if Racing.attempts == 1:
                raise RuntimeError("dictionary changed size during iteration")
            return super().values()

    tracker = SimpleNamespace(trials=Racing({"a": _trial("lora", 0, 0.5)}))
    assert [t.trial_id for t in progress_module.snapshot(tracker)] == ["lora-0"]  # type: ignore[arg-type]
    assert Racing.attempts == 2
