"""A hung step ends the process even while C code holds the GIL; a record that kills the worker is named, and an
outside kill is told from a record's fault."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from streams.crash_journal import INTAKE_STEP, RENDER_STEP, CrashJournal, Deaths, Deliberate
from streams.liveness import Deadlines, Heartbeat
from tests.harness import ROOT


def run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_a_step_that_spins_in_c_with_the_gil_held_ends_the_process():
    started = time.monotonic()
    done = run_python("""
        import re
        from streams.liveness import Deadlines
        with Deadlines().guard("a catastrophic regex", 0.5):
            re.match(r"(a*)*b", "a" * 64)  # exponential backtracking inside the C regex engine, GIL held
        print("survived")
    """)
    assert done.returncode != 0 and "survived" not in done.stdout
    assert time.monotonic() - started < 20
    assert "Thread" in done.stderr or "Stack" in done.stderr  # every thread's stack explains the hang


def test_steps_that_end_in_time_leave_the_process_alone():
    deadlines = Deadlines()
    with deadlines.guard("outer", 0.3), deadlines.guard("inner", 5):
        pass
    time.sleep(0.5)  # the outer limit passed after its step ended: nothing fires


def test_the_heartbeat_file_shows_progress(tmp_path):
    path = tmp_path / "health"
    beat = Heartbeat(str(path), "w1", min_interval_s=0.0)
    beat.ready()
    beat.beat("main")
    first = json.loads(path.read_text())
    time.sleep(0.01)
    beat.beat("render")
    second = json.loads(path.read_text())
    assert first["worker_id"] == "w1" and {"ready", "main"} <= first["beats"].keys()
    assert second["beats"]["render"] >= first["beats"]["main"]
    beat.clear()
    assert not path.exists()


SOURCE = ("zimage.requests.normal", 2, 41)


def die_holding(folder, activity: str = "intake", how: str = "os.kill(os.getpid(), signal.SIGKILL)",
                held: tuple = (SOURCE,)) -> int:
    done = run_python(f"""
        import faulthandler, os, signal
        from streams.crash_journal import CrashJournal
        journal = CrashJournal({str(folder)!r}, "w")
        with journal.holding({activity!r}, {list(held)!r}):
            {how}
    """)
    return done.returncode


SEGFAULT = "faulthandler._sigsegv()"  # what a crash in a C extension looks like


@pytest.mark.parametrize("activity", ["intake", "render"])
def test_each_death_by_a_fault_while_holding_a_record_is_a_strike(tmp_path, activity, caplog):
    assert die_holding(tmp_path, activity, SEGFAULT) == -11
    assert CrashJournal(tmp_path, "w").deaths(SOURCE) == Deaths(by_fault=1)
    assert "Fatal Python error" in caplog.text  # the next process logs the traceback faulthandler left
    assert die_holding(tmp_path, activity, SEGFAULT) == -11
    journal = CrashJournal(tmp_path, "w")
    deaths = journal.deaths(SOURCE)
    assert deaths == Deaths(by_fault=2) and journal.is_poison(deaths)
    journal.committed({SOURCE[:2]: SOURCE[2] + 1})  # once its outcome commits, the record is forgiven
    assert CrashJournal(tmp_path, "w").deaths(SOURCE) is None


def test_an_exception_escaping_a_step_is_a_fault_of_the_records_held(tmp_path):
    assert die_holding(tmp_path, "render", "raise ValueError('a bug')") == 1
    assert CrashJournal(tmp_path, "w").deaths(SOURCE) == Deaths(by_fault=1)


def test_kills_from_outside_make_suspects_and_poison_only_a_record_that_keeps_dying_alone(tmp_path):
    mate = ("zimage.render.turbo.normal", 1, 9)
    assert die_holding(tmp_path, "render", held=(SOURCE, mate)) == -9  # a deploy's kill, mid-batch
    journal = CrashJournal(tmp_path, "w", max_deaths=3)
    assert journal.deaths(SOURCE) == journal.deaths(mate) == Deaths()  # suspects: rendered alone next, unblamed
    for died in (1, 2, 3):  # killed again each time it renders, alone
        assert die_holding(tmp_path, "render") == -9
        journal = CrashJournal(tmp_path, "w", max_deaths=3)
        deaths = journal.deaths(SOURCE)
        assert deaths == Deaths(unexplained=died)
        assert journal.is_poison(deaths) == (died == 3)  # its partition is not held for good
    assert journal.deaths(mate) == Deaths()


def test_a_death_after_a_long_write_and_a_short_one_blames_only_the_short_ones_records(tmp_path):
    batch = [(f"zimage.render.turbo.{'x' * 200}", p, 10_000 + p) for p in range(400)]  # beyond the first map
    done = run_python(f"""
        import os, signal
        from streams.crash_journal import CrashJournal
        journal = CrashJournal({str(tmp_path)!r}, "w")
        with journal.holding("render", {batch!r}):
            pass
        with journal.holding("render", [{SOURCE!r}]):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert done.returncode == -9
    journal = CrashJournal(tmp_path, "w")
    assert journal.deaths(SOURCE) == Deaths(unexplained=1) and not any(journal.deaths(src) for src in batch)


def test_a_death_blames_exactly_the_records_named_whatever_their_topic_names(tmp_path):
    odd = [('zimage."quoted"\\topic', 2, 5), ("zimage.render.turbo.low", 11, 2**40)]
    done = run_python(f"""
        import os, signal
        from streams.crash_journal import CrashJournal
        journal = CrashJournal({str(tmp_path)!r}, "w")
        with journal.holding("intake", {odd!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert done.returncode == -9
    journal = CrashJournal(tmp_path, "w")
    assert [journal.deaths(src) for src in odd] == [Deaths(), Deaths()] and journal.deaths(SOURCE) is None


def test_a_deliberate_exit_or_a_normal_end_is_no_strike(tmp_path):
    journal = CrashJournal(tmp_path, "w")
    with journal.holding("render", [SOURCE]):
        pass
    with pytest.raises(Deliberate), journal.holding("render", [SOURCE]):
        raise Deliberate("the device is gone; exiting on purpose")
    journal.close()
    assert CrashJournal(tmp_path, "w").deaths(SOURCE) is None


RENDERING = ("zimage.render.turbo.normal", 0, 7)


def run_holding_both(folder, body: str) -> subprocess.CompletedProcess:
    """Runs `body` in a process whose worker holds a record in intake (SOURCE) and a batch in render (RENDERING),
    with the deadline monitor noting overdue steps in the journal, as the worker wires it."""
    return run_python(f"""
        import os, re, signal, time
        from streams.crash_journal import CrashJournal
        from streams.liveness import Deadlines
        journal = CrashJournal({str(folder)!r}, "w")
        deadlines = Deadlines(on_overdue=journal.overdue, monitor_period_s=0.05, dump_to=journal.fault_file)
        with journal.holding("render", [{RENDERING!r}]), journal.holding("intake", [{SOURCE!r}]):
{textwrap.indent(textwrap.dedent(body), " " * 12)}
        print("survived")
    """)


def blamed(folder) -> dict[tuple[str, int, int], Deaths]:
    journal = CrashJournal(folder, "w")
    return {src: deaths for src in (SOURCE, RENDERING) if (deaths := journal.deaths(src)) is not None}


@pytest.mark.parametrize(("step", "to_blame"), [
    ("a transaction commit", {}),  # stuck in a broker outage: no record's fault
    (RENDER_STEP, {RENDERING: Deaths(by_fault=1)}),
    (INTAKE_STEP, {SOURCE: Deaths(by_fault=1)}),
])
def test_a_death_by_a_deadline_blames_the_records_of_the_step_that_overran_only(tmp_path, step, to_blame):
    done = run_holding_both(tmp_path, f"""
        with deadlines.guard({step!r}, 0.2):
            time.sleep(30)  # waits for what never comes: the deadline ends the process
    """)
    assert done.returncode == 1 and "survived" not in done.stdout, done.stderr[-2000:]
    assert blamed(tmp_path) == to_blame


def test_a_step_that_overran_but_ended_blames_nothing_by_itself_afterwards(tmp_path):
    done = run_holding_both(tmp_path, """
        with deadlines.guard("a transaction commit", 0.1):
            time.sleep(0.6)  # late, yet back before the timer's margin ran out
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)  # then something else kills the process: all in hand is suspect
    """)
    assert done.returncode == -9
    assert blamed(tmp_path) == {SOURCE: Deaths(unexplained=1), RENDERING: Deaths(unexplained=1)}


def test_a_deadline_death_with_the_gil_held_blames_everything_in_hand(tmp_path):
    done = run_holding_both(tmp_path, """
        with deadlines.guard("a transaction commit", 0.3):
            re.match(r"(a*)*b", "a" * 64)  # the monitor never runs to note the step: nothing is excused
    """)
    assert done.returncode == 1 and "survived" not in done.stdout
    # the timer's stacks in the journal's fault file are the evidence that the process ended itself
    assert blamed(tmp_path) == {SOURCE: Deaths(by_fault=1), RENDERING: Deaths(by_fault=1)}
