"""The notebook API restates the keywords of the library function each call runs (so that help()
and type checkers show them): every keyword the two share has the same default, so a default
changed in the library cannot leave the API giving other numbers than the run."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from robustdissect import api
from robustdissect.analysis.concepts import dissect
from robustdissect.analysis.diagnose import diagnose
from robustdissect.analysis.landscape import landscape
from robustdissect.analysis.metric import robustness_metric
from robustdissect.analysis.sensitivity import neuron_sensitivity

# keywords whose default differs on purpose: the API takes the stage's batch size
DIFFERENT = {("sensitivity", "batch_size")}


@pytest.mark.parametrize(
    ("call", "library", "least"),
    [
        (api.concepts, dissect, 10),
        (api.metric, robustness_metric, 9),
        (api.landscape, landscape, 9),
        (api.sensitivity, neuron_sensitivity, 2),
        (api.diagnose, diagnose, 3),
    ],
)
def test_api_keywords_keep_the_library_defaults(
    call: Callable[..., Any], library: Callable[..., Any], least: int
) -> None:
    ours, theirs = inspect.signature(call).parameters, inspect.signature(library).parameters
    empty = inspect.Parameter.empty
    shared = [n for n in ours if n in theirs and ours[n].default is not empty and theirs[n].default is not empty]
    assert len(shared) >= least, shared  # the comparison covers the keywords it is meant to
    for name in shared:
        if (call.__name__, name) not in DIFFERENT:
            assert ours[name].default == theirs[name].default, (call.__name__, name)
    assert all(ours[n].default != theirs[n].default for c, n in DIFFERENT if c == call.__name__)
