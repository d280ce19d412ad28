"""Progress in logs: plain lines at a steady interval when output is not a terminal (disco/progress.py)."""
import io
import time

from disco.progress import Progress


def test_a_log_gets_lines_with_count_rate_time_left_and_figures_then_an_end():
    log = io.StringIO()  # not a terminal
    steps = Progress(range(6), "dense 1/2", stream=log, every_s=0.05)
    for step in steps:
        time.sleep(0.03)
        steps.set_postfix({"loss": f"{1 / (step + 1):.2f}"})
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 4, lines  # about every other step, then the end
    assert lines[0].startswith("dense 1/2: ") and "/6 batches (" in lines[0] and "left" in lines[0]
    assert "loss=" in lines[0]
    assert lines[-1].startswith("dense 1/2: 6/6 batches") and lines[-1].endswith(", done")


def test_short_work_prints_nothing_and_counts_without_an_iterable():
    log = io.StringIO()
    with Progress(None, "checking", total=3, unit="files", stream=log, every_s=60) as files:
        for _ in range(3):
            files.update()
    assert files.done == 3 and log.getvalue() == ""
