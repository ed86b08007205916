"""The report's charts take their titles and labels as plain text."""

import numpy as np
import pytest


@pytest.mark.parametrize("title", ["tile/test/crack/a$\\frac$", "x$^$y"])
def test_report_charts_take_titles_as_plain_text(tmp_path, title):
    """matplotlib would parse "$...$" as mathtext and fail on an image id such as these."""
    from PIL import Image

    from anomalyncd.report import plot_count_sequence

    plot_count_sequence(tmp_path / "c.png", np.arange(10), np.arange(10), 3, title)
    assert Image.open(tmp_path / "c.png").size == (400, 240)
