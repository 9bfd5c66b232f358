"""Adversarial attacks, corruptions, worst-case evaluation and gradient-masking checks.

    import robustdissect as rd
    result = rd.attacks.PGD(eps=0.1)(model, x, y)          # x: (N, C, H, W) in [0, 1]
    result.x_adv, result.success, result.robust_accuracy
    rd.attacks.make_attack("apgd-ce", eps=0.1)(model, x, y)
    rd.attacks.worst_case(model, x, y, ["apgd-ce", "apgd-dlr"]).worst_case_accuracy
    rd.attacks.make_attack("square-linf", eps=0.1, queries=1000)(model, x, y)   # black-box

Every attack is registered in ATTACKS by name and shares the contract of `Attack.__call__`.
"""

from .apgd import APGD, APGDCE, APGDDLR
from .base import ATTACKS, Attack, AttackResult, SearchOutput, frozen, make_attack
from .blackbox import SPSA, NAttack
from .corruptions import (
    CORRUPTIONS,
    JPEG,
    Brightness,
    Contrast,
    Corruption,
    GaussianBlur,
    GaussianNoise,
    ImpulseNoise,
    ShotNoise,
)
from .cw import CW
from .ensemble import AttackSummary, EnsembleResult, worst_case
from .masking import (
    MaskingReport,
    OutputRandomness,
    accuracy_vs_eps,
    accuracy_vs_steps,
    check_black_box_breaks,
    check_black_box_vs_white_box,
    check_large_eps,
    check_margin_vs_ce,
    check_more_steps,
    check_random_output,
    check_zero_gradients,
    masking_checks,
    masking_warning,
    output_randomness,
    zero_gradient_share,
)
from .pgd import FGSM, PGD, PGDL2, PGDLinf
from .rng import SampleRandom
from .square import Square, SquareL2, SquareLinf
from .threat import L2Threat, LinfThreat, ThreatModel, get_threat, project, random_start

CWL2 = CW

__all__ = [
    "APGD",
    "APGDCE",
    "APGDDLR",
    "ATTACKS",
    "CORRUPTIONS",
    "CW",
    "CWL2",
    "FGSM",
    "JPEG",
    "PGD",
    "PGDL2",
    "SPSA",
    "Attack",
    "AttackResult",
    "AttackSummary",
    "Brightness",
    "Contrast",
    "Corruption",
    "EnsembleResult",
    "GaussianBlur",
    "GaussianNoise",
    "ImpulseNoise",
    "L2Threat",
    "LinfThreat",
    "MaskingReport",
    "NAttack",
    "OutputRandomness",
    "PGDLinf",
    "SampleRandom",
    "SearchOutput",
    "ShotNoise",
    "Square",
    "SquareL2",
    "SquareLinf",
    "ThreatModel",
    "accuracy_vs_eps",
    "accuracy_vs_steps",
    "check_black_box_breaks",
    "check_black_box_vs_white_box",
    "check_large_eps",
    "check_margin_vs_ce",
    "check_more_steps",
    "check_random_output",
    "check_zero_gradients",
    "frozen",
    "get_threat",
    "make_attack",
    "masking_checks",
    "masking_warning",
    "output_randomness",
    "project",
    "random_start",
    "worst_case",
    "zero_gradient_share",
]  # fmt: skip
