"""Progress reports: tqdm on a terminal, plain periodic lines without escape codes everywhere else."""

from __future__ import annotations

import io

from layermerge.progress import PlainProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdm_and_a_pipe_gets_plain_lines():
    from tqdm import tqdm

    assert isinstance(progress(range(3), desc="x", stream=Terminal()), tqdm)
    assert isinstance(progress(range(3), desc="x", stream=io.StringIO()), PlainProgress)


def test_plain_lines_are_periodic_and_end_with_a_summary():
    stream = io.StringIO()
    items = list(progress(range(4), desc="prodistill: blocks", unit="block", interval=0.0, stream=stream))
    assert items == [0, 1, 2, 3]
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        "prodistill: blocks 1/4 (25%)", "prodistill: blocks 2/4 (50%)", "prodistill: blocks 3/4 (75%)",
        "prodistill: blocks 4/4 (100%)"]                          # the final line is not repeated
    assert all(line.endswith("s") for line in lines)
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_plain_lines_wait_for_the_interval():
    stream = io.StringIO()
    for _ in progress(range(1000), desc="merging", interval=3600.0, stream=stream):
        pass
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]]      # only the final line
    assert stream.getvalue().startswith("merging 1000/1000 (100%) ")


def test_update_postfix_and_context_manager_without_a_total():
    stream = io.StringIO()
    with progress(desc="fine-tuning sst2", unit="step", interval=0.0, stream=stream) as bar:
        bar.update(2)
        bar.set_postfix(loss="0.500")
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("fine-tuning sst2 2 step ")
    assert lines[-1].startswith("fine-tuning sst2 3 step ") and lines[-1].endswith(", loss=0.500")


def test_disabled_and_transient_reports_print_nothing_at_the_end():
    stream = io.StringIO()
    assert list(progress(range(3), desc="quiet", disable=True, interval=0.0, stream=stream)) == [0, 1, 2]
    bar = progress(total=5, desc="epochs", leave=False, interval=3600.0, stream=stream)
    bar.update(5)
    bar.close()
    bar.close()
    assert stream.getvalue() == ""
