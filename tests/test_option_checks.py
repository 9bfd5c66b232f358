"""config.check_ints, the one integer-field check of the options dataclasses: the first bad field in
order, bools refused, None only when optional, and the one-line messages every stage gives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from robustdissect.analysis.features import FeatureOptions
from robustdissect.config import check_ints
from robustdissect.errors import UserError
from robustdissect.stages.common import ConceptsOptions
from robustdissect.stages.diagnose import DiagnoseOptions
from robustdissect.stages.explorer import ExplorerOptions
from robustdissect.stages.metric import MetricOptions
from robustdissect.stages.pushback import PushbackOptions
from robustdissect.training.robust_data import KINDS, RobustDataSettings


@dataclass
class Opts:
    a: Any = 1
    b: Any = 2


def test_check_ints_accepts_ints_at_their_minimum() -> None:
    check_ints(Opts(1, 2), {"a": 1, "b": 2}, "s")
    check_ints(Opts(None, 5), {"a": 1, "b": 0}, "s", optional=True)


@pytest.mark.parametrize(
    ("opts", "optional", "message"),
    [
        (Opts(0, 2), False, "s: a must be an integer >= 1, got 0"),
        (Opts(1, 1), False, "s: b must be an integer >= 2, got 1"),
        (Opts(True, 2), False, "s: a must be an integer >= 1, got True"),
        (Opts(1.0, 2), False, "s: a must be an integer >= 1, got 1.0"),
        (Opts(None, 2), False, "s: a must be an integer >= 1, got None"),
        (Opts(0, 0), False, "s: a must be an integer >= 1, got 0"),  # the first bad field in order
        (Opts(None, "3"), True, "s: b must be an integer >= 2 or null, got '3'"),
    ],
)
def test_check_ints_refuses_with_one_line(opts: Opts, optional: bool, message: str) -> None:
    with pytest.raises(UserError) as e:
        check_ints(opts, {"a": 1, "b": 2}, "s", optional=optional)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ConceptsOptions(bins=1), "concepts: bins must be an integer >= 2, got 1"),
        (lambda: ConceptsOptions(n=True), "concepts: n must be an integer >= 1, got True"),
        (lambda: ExplorerOptions(cell=3), "explorer: cell must be an integer >= 4, got 3"),
        (lambda: DiagnoseOptions(decoder_n=0), "diagnose: decoder_n must be an integer >= 1, got 0"),
        (lambda: DiagnoseOptions(show=-1), "diagnose: show must be an integer >= 0, got -1"),
        (lambda: PushbackOptions(reliance_n=1), "pushback: reliance_n must be an integer >= 2 or null, got 1"),
        (lambda: PushbackOptions(bootstrap="x"), "pushback: bootstrap must be an integer >= 0, got 'x'"),
        (lambda: PushbackOptions(purify_n=0), "pushback: purify_n must be an integer >= 1, got 0"),
        (lambda: MetricOptions(eval_restarts=0.5), "metric: eval_restarts must be an integer >= 1, got 0.5"),
        (lambda: FeatureOptions(cdf_capacity=1), "features: cdf_capacity must be an integer >= 2, got 1"),
        (lambda: RobustDataSettings(kind=KINDS[0], n=10, batch=0), "robust-data: batch must be an integer >= 1, got 0"),
    ],
)
def test_stage_options_give_the_same_messages(build: Any, message: str) -> None:
    with pytest.raises(UserError) as e:
        build()
    assert str(e.value) == message
