"""Every number an evaluation writes is finite, or it is null and the run says so (issue 24)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from traitsae.evaluation.core.figures import pareto_front
from traitsae.evaluation.core.outputs import write_json


def test_non_finite_values_are_written_as_null_listed_and_warned(tmp_path, caplog):
    """json.dumps wrote NaN (not JSON at all: strict parsers refuse the file) and nothing said
    a number was undefined."""
    data = {"mean": 0.5, "ci": [float("nan"), 1.0], "rows": [{"fvu": np.float64("inf")}]}
    with caplog.at_level(logging.WARNING):
        write_json(tmp_path / "out.json", data)
    text = (tmp_path / "out.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    saved = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert saved["ci"] == [None, 1.0] and saved["rows"] == [{"fvu": None}]
    assert saved["non_finite"] == {"ci[0]": "nan", "rows[0].fvu": "inf"}
    assert "out.json: 2 value(s) are undefined" in caplog.text and "ci[0] = nan" in caplog.text
    assert math.isnan(data["ci"][0])  # the caller's data is left alone


def test_finite_outputs_are_unchanged(tmp_path, caplog):
    data = {"a": [1, 2.5, None, "x"], "b": {"c": True}}
    with caplog.at_level(logging.WARNING):
        write_json(tmp_path / "out.json", data)
    assert json.loads((tmp_path / "out.json").read_text()) == data and not caplog.text


def test_a_run_with_an_undefined_coordinate_is_never_pareto_optimal():
    """health marked a run with FVU NaN (scale 0 in its sae.json) Pareto-optimal: NaN compares
    false with everything, so nothing dominated it."""
    front = pareto_front(np.array([1.0, 2.0, 0.5, 3.0]), np.array([1.0, 0.5, np.nan, np.inf]))
    assert front.tolist() == [True, True, False, False]
