"""Attack options are validated before any stage runs, by dry construction of each attack, with
the option named: exit code 2, one line, no run directory left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from robustdissect.errors import UserError
from robustdissect.evaluation import EvaluateOptions


@pytest.mark.parametrize(
    ("option", "named", "why"),
    [
        ("pgd-linf.alpha=abc", "pgd-linf.alpha=abc", "positive number or a step rule"),
        ("pgd-linf.alpha=-1", "pgd-linf.alpha=-1", "must be > 0"),
        ("fgsm.nosuchparam=1", "fgsm.nosuchparam=1", "no parameter"),
        ("apgd-ce.steps=0", "apgd-ce.steps=0", "steps must be an integer >= 1"),
        ("pgd-linf.alpha=[1]", "pgd-linf.alpha=[1]", "must be a number"),
    ],
)
def test_bad_attack_opt_fails_before_any_stage(cli: Any, tmp_path: Path, option: str, named: str, why: str) -> None:
    out = tmp_path / "ev"
    code, stdout, err = cli(["evaluate", "--attack-opt", option, "--n", "20", "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert named in lines[0] and why in lines[0] and "Traceback" not in err
    assert "step_rule" not in lines[0]  # the option given is blamed, not another one
    assert stdout.strip() == ""  # nothing ran
    assert not out.exists() and not out.with_name("ev.partial").exists()


def test_bad_yaml_attack_option_fails_before_any_stage(cli: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n: 20\nstages:\n  evaluate:\n    attack_options:\n      spsa: {lr: -0.5}\n")
    out = tmp_path / "ev"
    code, _stdout, err = cli(["evaluate", "--config", str(cfg), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "spsa.lr=-0.5" in lines[0] and "lr must be > 0" in lines[0], err
    assert not out.exists() and not out.with_name("ev.partial").exists()


@pytest.mark.parametrize(
    ("block", "why"),
    [("pgd_steps: abc", "steps must be an integer >= 1"), ("attack_options: {fgsm: {nosuch: 1}}", "fgsm.nosuch=1")],
)
def test_bad_compare_attack_option_fails_before_any_stage(cli: Any, tmp_path: Path, block: str, why: str) -> None:
    """The compare stage's attack options are built before the overview stage runs."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"n: 20\nstages:\n  overview: {{}}\n  compare:\n    attack_options:\n      {block}\n")
    out = tmp_path / "run"
    code, stdout, err = cli(["run", "--config", str(cfg), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and why in lines[0], err
    assert stdout.strip() == "" and not out.exists() and not out.with_name("run.partial").exists()


def test_options_class_checks_every_attack_option() -> None:
    EvaluateOptions(attack_options={"pgd-linf": {"alpha": "2.5eps/k", "restarts": 2}, "square-linf": {"queries": 10}})
    EvaluateOptions(attack_options={"pgd-linf": {"keep": "max-loss", "early_stop": False}})  # fine together
    with pytest.raises(UserError, match="attack option pgd-linf.keep=max-loss"):
        EvaluateOptions(attack_options={"pgd-linf": {"keep": "max-loss"}})
    with pytest.raises(UserError, match="unknown attack 'pgd-lnf'"):
        EvaluateOptions(attack_options={"pgd-lnf": {"alpha": 0.01}})
    with pytest.raises(UserError, match="must be a mapping"):
        EvaluateOptions(attack_options={"pgd-linf": 3})  # type: ignore[dict-item]
    with pytest.raises(UserError, match="worst_case takes white-box L-inf attacks"):
        EvaluateOptions(worst_case=["pgd-linf", "pgd-l2"])
    with pytest.raises(UserError, match="square_queries"):
        EvaluateOptions(square_queries=-1)
