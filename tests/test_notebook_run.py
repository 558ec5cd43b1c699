"""Progress bars: on stderr (train.py) or on the stream given (the notebook), cleared when their
pass ends, so that only the epoch lines remain."""

from __future__ import annotations

import io

import utils


# ---------------------------------------------------------------------------------------------
# The bars: on stderr (train.py) or on the stream given (the notebook), cleared when done.
# ---------------------------------------------------------------------------------------------
def last_line(text: str) -> str:
    """What a terminal or Jupyter shows of the last line: the text after its last \\r."""
    return text.rstrip("\r").rsplit("\r", 1)[-1]


def test_a_bar_on_a_given_stream_clears_itself_when_its_pass_ends(capsys):
    stream = io.StringIO()
    for _ in utils.progress_bar(range(3), "epoch  1 train", stream):
        pass
    assert "epoch  1 train" in stream.getvalue()
    assert last_line(stream.getvalue()).strip() == ""
    assert capsys.readouterr().err == ""


def test_a_bar_by_default_goes_to_stderr_and_clears_itself(capsys):
    for _ in utils.progress_bar(range(3), "epoch  1 train", True):
        pass
    err = capsys.readouterr().err
    assert "epoch  1 train" in err and last_line(err).strip() == ""


def test_no_bar_when_progress_is_off(capsys):
    for _ in utils.progress_bar(range(3), "epoch  1 train", False):
        pass
    assert capsys.readouterr() == ("", "")
