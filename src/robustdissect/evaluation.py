"""Robustness evaluation: attack settings, Wilson intervals, and adversarial examples as stored
evidence.

`attack_evidence` runs an attack through the run's evidence store (`store.EvidenceStore`): the
adversarial examples, predictions and correctness flags of (model weights, exact images, attack
settings, seed) are computed once per run and reused by every stage that asks for them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .attacks import ATTACKS, PGD, Attack, check_black_box_breaks, check_margin_vs_ce, make_attack, masking_checks
from .attacks.pgd import STEP_RULE_ALIASES, STEP_RULES
from .config import parse_budgets, parse_eps
from .errors import UserError
from .modelutil import eval_mode, model_device
from .parallel import sharded, world
from .stats import proportion_interval
from .stats import wilson_interval as wilson_interval  # re-exported for older imports
from .store import EvidenceStore, evidence_key, index_hash

log = logging.getLogger(__name__)

# The columns of the neuron-sensitivity paper's Table III, then the reliable-evaluation extras.
TABLE_ATTACKS = ("cw-l2", "pgd-l2", "pgd-linf", "fgsm", "spsa", "nattack", "apgd-ce", "apgd-dlr")
BLACK_BOX = ("spsa", "nattack", "square-linf", "square-l2")
SQUARE = {"linf": "square-linf", "l2": "square-l2"}
CORRUPTION_NAMES = ("gaussian-noise", "shot-noise", "impulse-noise", "gaussian-blur", "contrast", "brightness", "jpeg")


@dataclass(frozen=True)
class EvaluateOptions:
    """Settings of the evaluation (METHODS §5.3, §8.1); every one is a config option."""

    attacks: str | list[str] = "all"  # "all" or names from TABLE_ATTACKS
    eps: float = 0.1  # L-inf budget (pixel units)
    eps_l2: float = 1.5  # L2 budget
    pgd_steps: int = 20
    # alpha = eps/sqrt(k) ("paper", the neuron-sensitivity paper's stated rule; also the sensitivity
    # stage's), or "2.5eps/k" (Madry et al.); a number in attack_options[<attack>].alpha wins
    step_rule: str = "paper"
    cw_steps: int = 300
    cw_search_steps: int = 3
    apgd_steps: int = 100
    blackbox_n: int = 500  # SPSA / NAttack run on a fixed subset of this many images
    spsa_iterations: int = 100
    spsa_samples: int = 512
    nattack_iterations: int = 100
    nattack_population: int = 300
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTION_NAMES))
    noise_scale: str = "auto"  # auto: "fmnist" (x3.19 set) for 1-channel 28x28 images, else "cifar"
    eps_sweep: list[float] | None = None  # explicit ε values; None: eps_sweep_relative × ε
    eps_sweep_relative: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    steps_sweep: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 7, 10, 20])
    curve_n: int = 1000
    large_eps: float = 0.5  # for the gradient-masking check
    grid_attack: str = "pgd-linf"
    batch_size: int = 500
    # white-box L-inf attacks of the worst case, in order (AutoAttack's cascade: each attack only on
    # the points still robust); table attacks among them reuse their stored results. The worst case
    # itself is the per-image minimum over every attack of the threat model that the run computed.
    worst_case: list[str] = field(default_factory=lambda: ["pgd-linf", "fgsm", "apgd-ce", "apgd-dlr"])
    # the Square attack (black-box) runs last on the points every other attack left robust, for the
    # worst case of each norm listed; queries: the paper's 5,000 (0: no Square)
    square_queries: int = 5000
    square_norms: list[str] = field(default_factory=lambda: ["linf", "l2"])
    curves: bool = True  # accuracy against eps and steps, and the gradient-masking checks
    # any parameter an attack class takes, per attack: {"pgd-linf": {"alpha": 0.01, "restarts": 5}}
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", "eps_l2", "eps_sweep", stage="evaluate")
        """Refuse bad attack settings before any stage runs: every attack of the table, the worst
        case and `attack_options` is built once (dry construction), and an error names the option."""
        if not isinstance(self.square_queries, int) or isinstance(self.square_queries, bool) or self.square_queries < 0:
            raise UserError(f"square_queries must be an integer >= 0, got {self.square_queries!r}")
        bad_norms = [n for n in self.square_norms if n not in SQUARE]
        if bad_norms:
            raise UserError(f"square_norms takes linf and/or l2, got {bad_norms}")
        check_attack_options(self)

    def eps_grid(self) -> list[float]:
        """The ε values of the accuracy-against-ε sweep: explicit, or relative to ε."""
        if self.eps_sweep is not None:
            return list(self.eps_sweep)
        return [round(r * self.eps, 10) for r in self.eps_sweep_relative]

    def attack_names(self) -> list[str]:
        if self.attacks == "all":
            return list(TABLE_ATTACKS)
        names = [a.strip() for a in (self.attacks.split(",") if isinstance(self.attacks, str) else self.attacks)]
        for n in names:
            if n not in TABLE_ATTACKS:
                ATTACKS.get(n)  # unknown names raise with close matches
                raise UserError(f"'{n}' is a corruption; list it under 'corruptions', not 'attacks'")
        return names


# The default run's budgets (`quick: true`); `--full` uses the dataclass defaults above.
QUICK_EVALUATE = {
    "attacks": ["pgd-linf", "fgsm", "pgd-l2"],
    "cw_steps": 50,
    "cw_search_steps": 3,
    "apgd_steps": 50,
    "blackbox_n": 100,
    "spsa_iterations": 20,
    "spsa_samples": 128,
    "nattack_iterations": 30,
    "nattack_population": 100,
    "curve_n": 200,
    "eps_sweep_relative": [0.5, 1.0, 2.0],
    "steps_sweep": [1, 5, 20],
    "corruptions": ["gaussian-noise"],
    "square_queries": 300,
    "square_norms": ["linf"],
}


def check_attack_options(opts: EvaluateOptions) -> None:
    """Build every attack the options can ask for, once with each `attack_options` entry alone and
    once with all of them, so that a bad value is refused (UserError) with the option named."""
    if not isinstance(opts.attack_options, dict):
        raise UserError(f"attack_options must map attack -> {{parameter: value}}, got {opts.attack_options!r}")
    for name, params in opts.attack_options.items():
        ATTACKS.get(str(name))  # unknown attack names fail with close matches
        if not isinstance(params, dict):
            raise UserError(f"attack_options.{name} must be a mapping of parameter -> value, got {params!r}")
        try:
            build_attack(name, opts, 0)
        except (UserError, TypeError, ValueError) as e:
            for param, value in params.items():  # name the option that fails on its own, if one does
                try:
                    build_attack(name, opts, 0, extra={param: value})
                except (UserError, TypeError, ValueError) as alone:
                    raise UserError(f"attack option {name}.{param}={value}: {_reason(alone)}") from None
            given = ", ".join(f"{name}.{k}={v}" for k, v in params.items())
            raise UserError(f"attack options {given}: {_reason(e)}") from None
    eps = opts.eps
    for name in {*opts.attack_names(), *opts.worst_case, *(SQUARE[n] for n in opts.square_norms)}:
        try:
            attack = build_attack(name, opts, 0)
        except (TypeError, ValueError) as e:
            raise UserError(f"attack '{name}': {_reason(e)}") from None
        if name in opts.worst_case and (attack.norm != "linf" or not attack.white_box or attack.eps != eps):
            raise UserError(f"evaluate: worst_case takes white-box L-inf attacks at eps={eps:g}; not '{name}'")


def _reason(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def build_attack(
    name: str,
    opts: EvaluateOptions,
    seed: int,
    *,
    extra: dict[str, Any] | None = None,
    eps: float | None = None,
    steps: int | None = None,
) -> Attack:
    """The evaluation's instance of a table attack; `opts.attack_options[name]` (or `extra`)
    overrides any of its parameters (unknown ones are refused with the list of those it takes);
    `eps` / `steps` replace the options' L-inf eps and PGD steps (the masking sweeps)."""
    given = opts.attack_options.get(name, {}) if extra is None else extra
    if not isinstance(given, dict):
        raise UserError(f"attack_options.{name} must be a mapping of parameter -> value")
    extra = dict(given)
    if "eps" in extra:
        extra["eps"] = parse_eps(extra["eps"])
    if isinstance(extra.get("alpha"), str):  # a rule by name: "eps/sqrt(k)", "2.5eps/k", or a number
        text = extra.pop("alpha").strip()
        rule = STEP_RULE_ALIASES.get(text.replace(" ", ""), text)
        if rule in STEP_RULES:
            extra["step_rule"] = rule
        else:
            try:
                extra["alpha"] = parse_eps(text, name="alpha")
            except UserError:
                rules = ", ".join([*STEP_RULES, *STEP_RULE_ALIASES])
                raise UserError(f"alpha must be a positive number or a step rule ({rules}), got {text!r}") from None
    return _build_attack(name, opts, seed, extra, eps, steps)


@dataclass(frozen=True)
class _Budget:
    """What an attack of the table is built with: the options, the L-inf and L2 budgets and PGD's steps."""

    opts: EvaluateOptions
    linf: float
    l2: float
    pgd_steps: int


# attack name -> its parameters in the evaluation (beside seed and batch size); others take only those
ATTACK_PARAMETERS: dict[str, Callable[[_Budget], dict[str, Any]]] = {
    "pgd-linf": lambda b: {"eps": b.linf, "steps": b.pgd_steps, "step_rule": b.opts.step_rule, "early_stop": True},
    "pgd-l2": lambda b: {"eps": b.l2, "steps": b.pgd_steps, "step_rule": b.opts.step_rule, "early_stop": True},
    "square-linf": lambda b: {"eps": b.linf, "queries": max(1, b.opts.square_queries)},
    "square-l2": lambda b: {"eps": b.l2, "queries": max(1, b.opts.square_queries)},
    "fgsm": lambda b: {"eps": b.linf},
    "cw-l2": lambda b: {"steps": b.opts.cw_steps, "search_steps": b.opts.cw_search_steps},
    "apgd-ce": lambda b: {"eps": b.linf, "steps": b.opts.apgd_steps},
    "apgd-dlr": lambda b: {"eps": b.linf, "steps": b.opts.apgd_steps},
    "spsa": lambda b: {"eps": b.linf, "iterations": b.opts.spsa_iterations, "n_samples": b.opts.spsa_samples},
    "nattack": lambda b: {"eps": b.linf, "iterations": b.opts.nattack_iterations,
                          "population": b.opts.nattack_population},
}


def _build_attack(
    name: str, opts: EvaluateOptions, seed: int, extra: dict[str, Any], eps_: float | None, steps_: int | None
) -> Attack:
    steps = opts.pgd_steps if steps_ is None else steps_
    budget = _Budget(opts, opts.eps if eps_ is None else eps_, opts.eps_l2, steps)
    params = ATTACK_PARAMETERS[name](budget) if name in ATTACK_PARAMETERS else {}
    return make_attack(name, **{**params, "seed": seed, "batch_size": opts.batch_size, **extra})


@dataclass
class AttackOutcome:
    """One attack on a set of images: x_adv (N, C, H, W), correct (N,) bool, pred (N,) int64."""

    name: str
    x_adv: torch.Tensor
    correct: torch.Tensor
    pred: torch.Tensor
    settings: dict[str, Any]
    index: torch.Tensor  # (N,) positions of these images in the analysed split
    key: str = ""  # the evidence key it is stored under

    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else math.nan


def attack_evidence(
    store: EvidenceStore,
    model: nn.Module,
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    split: str = "test",
) -> AttackOutcome:
    """`attack(model, x, y)` from `store`, keyed by the model's weights, the exact indices (N,)
    of the images in the analysed `split`, the attack's settings and its seed; computed and
    stored on a miss. Tensors come back on the CPU."""
    settings = attack.describe()
    parts = {
        "name": attack.name,
        "model": store.model_hash(model),
        "split": split,
        "images": index_hash(index),
        "n": len(index),
        "settings": settings,
        "seed": attack.seed,
    }

    def compute(part: slice) -> dict[str, torch.Tensor]:
        device = model_device(model, x.device)
        res = attack(model, x[part].to(device), y[part].to(device), ids=index[part])
        return {
            "x_adv": res.x_adv,
            "correct": res.correct.to(torch.uint8),
            "pred": res.logits.argmax(1),
            "index": index[part],
        }

    def share(part: slice) -> dict[str, torch.Tensor]:
        return store.fetch_shard("adv", parts, part, lambda: compute(part)) if world()[1] > 1 else compute(part)

    # under torchrun each rank attacks its share of the images (each image's random stream is
    # keyed by its index, so the shards together equal one process's result)
    t = store.fetch("adv", parts, lambda: sharded(len(index), share))
    if world()[1] > 1:
        store.drop_shards("adv", parts)
    return AttackOutcome(
        attack.name, t["x_adv"], t["correct"].bool(), t["pred"], settings, index, evidence_key(parts)
    )


def clean_predictions(
    store: EvidenceStore, model: nn.Module, x: torch.Tensor, index: torch.Tensor, split: str = "test",
    batch_size: int = 500,
) -> torch.Tensor:
    """Predicted labels (N,) of `model` on x (N, C, H, W), from the store when already computed.
    A model whose clean logits are not finite is refused (UserError): no attack result on it
    would mean anything."""
    def compute(part: slice) -> dict[str, torch.Tensor]:
        device = model_device(model, x.device)
        first, stop = part.start or 0, part.stop
        preds = [torch.empty(0, dtype=torch.int64)]
        with eval_mode(model), torch.no_grad():
            for s in range(first, stop, batch_size):
                logits = model(x[s : min(s + batch_size, stop)].to(device))
                bad = int((~torch.isfinite(logits)).any(dim=1).sum())
                if bad:
                    raise UserError(
                        f"the model's logits are NaN or infinite on {bad} of images {s}..{s + len(logits) - 1}; "
                        "check its weights (a diverged training?) before evaluating it"
                    )
                preds.append(logits.argmax(1).cpu())
        return {"pred": torch.cat(preds)}

    parts = {"name": "clean", "model": store.model_hash(model), "split": split, "images": index_hash(index)}
    return store.fetch("predictions", parts, lambda: sharded(x.shape[0], compute))["pred"]


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, float]:
    """Mean and max L-inf / L2 norm of x_adv - x over images; both (N, C, H, W)."""
    d = (x_adv - x).flatten(1)
    linf, l2 = d.abs().amax(1), d.norm(dim=1)
    return {
        "linf_mean": float(linf.mean()),
        "linf_max": float(linf.max()),
        "l2_mean": float(l2.mean()),
        "l2_max": float(l2.max()),
    }


# ---------------------------------------------------------------------------------------------
# the evaluation's tables (the `evaluate` stage and `robustdissect.api.evaluate` both build them here)


def accuracy_row(name: str, correct: torch.Tensor, kind: str, settings: str = "") -> dict[str, Any]:
    """A row of the robust-accuracy table: accuracy of correct (N,) bool with its Wilson interval."""
    n = len(correct)
    acc, lo, hi = proportion_interval(int(correct.sum()), n)
    return {"attack": name, "kind": kind, "n": n, "accuracy": acc, "ci_low": lo, "ci_high": hi, "settings": settings}


def settings_text(s: Mapping[str, Any]) -> str:
    """An attack's settings column: its budget, steps and search sizes."""
    keep = ("eps", "steps", "alpha", "iterations", "search_steps", "n_samples", "population", "severity")
    return ", ".join(f"{k}={s[k]:.4g}" if isinstance(s[k], float) else f"{k}={s[k]}" for k in keep if k in s)


def black_box_subset(n: int, blackbox_n: int, seed: int) -> torch.Tensor:
    """The sorted positions (min(n, blackbox_n),) of the seeded subset the black-box attacks run on."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(blackbox_n, n)].sort().values


def table_attacks(
    names: Sequence[str],
    opts: EvaluateOptions,
    seed: int,
    index: torch.Tensor,
    bb_index: torch.Tensor,
    run: Callable[[Attack, torch.Tensor], AttackOutcome],
    label: str,
) -> dict[str, AttackOutcome]:
    """{name: outcome} of the table attacks `names` by run(attack, idx): white-box on the images
    index (N,), black-box on bb_index (M,); `label` prefixes the progress log."""
    outcomes: dict[str, AttackOutcome] = {}
    for i, name in enumerate(names):
        attack = build_attack(name, opts, seed)
        idx = bb_index if name in BLACK_BOX else index
        log.info("%s: %s (%d/%d) on %d images", label, name, i + 1, len(names), len(idx))
        outcomes[name] = run(attack, idx)
    return outcomes


def accuracy_rows(clean_correct: torch.Tensor, outcomes: Mapping[str, AttackOutcome]) -> list[dict[str, Any]]:
    """The robust-accuracy table (Table III layout): the clean row of clean_correct (N,) bool, then
    one row per attack outcome with its kind and settings."""
    rows = [accuracy_row("clean", clean_correct, "clean")]
    for name, out in outcomes.items():
        kind = "black-box" if name in BLACK_BOX else "white-box"
        rows.append(accuracy_row(name, out.correct, kind, settings_text(out.settings)))
    return rows


def in_threat(settings: Mapping[str, Any], norm: str, eps: float) -> bool:
    """Whether an attack with these settings attacks the (norm, eps) threat model."""
    e = settings.get("eps")
    return settings.get("norm") == norm and isinstance(e, float) and math.isclose(e, eps, rel_tol=1e-9)


def attack_kind(settings: Mapping[str, Any]) -> str:
    return "white-box" if settings.get("white_box", True) else "black-box"


def fold_robust(
    robust: torch.Tensor, norm: str, label: str, idx: torch.Tensor, correct: torch.Tensor, kind: str
) -> dict[str, Any]:
    """Mark the points at idx (M,) that the attack broke (correct (M,) False) as not robust in
    robust (N,), in place; the row of the worst-case table."""
    before = robust[idx]
    broke = before & ~correct.bool()
    robust[idx[broke]] = False
    att, brk = int(before.sum()), int(broke.sum())
    return {
        "threat_model": norm, "attack": label, "kind": kind, "attacked": att, "broken": brk,
        "accuracy_on_attacked": (att - brk) / att if att else math.nan,
        "cumulative_accuracy": float(robust.float().mean()),
    }  # fmt: skip


def table_pgd(opts: EvaluateOptions, eps: float, steps: int, seed: int) -> PGD:
    """The table's L-inf PGD at another eps or step count (the masking sweeps use it, so their
    point at the table's (eps, steps) is the table's attack)."""
    attack = build_attack("pgd-linf", opts, seed, eps=eps, steps=steps)
    assert isinstance(attack, PGD)
    return attack


@dataclass(frozen=True)
class Curves:
    """Accuracy against ε and against PGD steps (L-inf PGD on the first n images), the
    gradient-masking warnings and measurements, and the sweeps' PGD runs that are no table attack
    (`extra`: those at the table's ε join the L-inf worst case)."""

    accuracy_vs_eps: dict[float, float]
    accuracy_vs_steps: dict[int, float]
    warnings: list[str]
    masking: dict[str, Any]
    extra: list[tuple[str, AttackOutcome]]
    n: int


def sweep_curves(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opts: EvaluateOptions,
    seed: int,
    table_rows: Sequence[Mapping[str, Any]],
    table: Mapping[str, AttackOutcome],
    run: Callable[[Attack, torch.Tensor], AttackOutcome],
) -> Curves:
    """The curves and masking checks (`opts.curves`; none when off) on the first `opts.curve_n` of
    x (N, C, H, W), y (N,), beside the table's rows and outcomes; run(attack, idx) -> the attack's
    outcome on images idx (M,)."""
    cn = min(opts.curve_n, len(y))
    if not opts.curves:
        return Curves({}, {}, [], {}, [], cn)
    extra: list[tuple[str, AttackOutcome]] = []

    def same(a: AttackOutcome, b: AttackOutcome) -> bool:
        return a.settings == b.settings and len(a.index) == len(b.index) and bool(torch.equal(a.index, b.index))

    def sweep_accuracy(attack: Attack) -> float:
        out = run(attack, torch.arange(cn))
        if not any(same(out, o) for o in [*table.values(), *(o for _, o in extra)]):
            extra.append((f"{attack.name} k={attack.describe().get('steps')} (curves)", out))
        return out.accuracy()

    attacked = [r for r in table_rows if r["kind"] in ("white-box", "black-box")]
    report = masking_checks(
        model, x[:cn], y[:cn], eps=opts.eps, large_eps=opts.large_eps, eps_values=opts.eps_grid(),
        steps_values=opts.steps_sweep, steps=opts.pgd_steps, seed=seed,
        accuracies={r["attack"]: r["accuracy"] for r in attacked},
        white_box={r["attack"]: r["kind"] == "white-box" for r in attacked},
        accuracy=sweep_accuracy, pgd=lambda e, k: table_pgd(opts, e, k, seed),
    )  # fmt: skip
    masking = {"zero_gradient_share": report.zero_gradient_share, **asdict(report.randomness)}
    return Curves(report.accuracy_vs_eps, report.accuracy_vs_steps, list(report.warnings), masking, extra, cn)


@dataclass(frozen=True)
class WorstCase:
    """The worst case of one threat model: robust (N,) bool per image, the table row, the rows of
    who broke what (cascade) and the cascade's warnings."""

    label: str
    robust: torch.Tensor
    row: dict[str, Any]
    cascade: list[dict[str, Any]]
    warnings: list[str]


def worst_cases(
    opts: EvaluateOptions,
    seed: int,
    clean_correct: torch.Tensor,
    computed: Sequence[tuple[str, AttackOutcome]],
    run: Callable[[Attack, torch.Tensor], AttackOutcome],
) -> list[WorstCase]:
    """Worst case per threat model (L-inf at opts.eps, L2 at opts.eps_l2): the per-image minimum
    over every `computed` attack of that (norm, eps); for L-inf then the cascade `opts.worst_case`
    (table attacks among them are folded, not rerun), then Square, each only on the points still
    robust. clean_correct: (N,) bool; run(attack, idx) -> the attack's outcome on images idx (M,)."""
    n = len(clean_correct)
    done = dict(computed)
    eps = opts.eps
    out: list[WorstCase] = []
    for norm, budget in (("linf", eps), ("l2", opts.eps_l2)):
        members = [(nm, o) for nm, o in computed if in_threat(o.settings, norm, budget)]
        # cross-entropy white-box attacks first, then margin losses, then black-box ones (the table
        # of who broke what reads as AutoAttack's cascade); the minimum does not depend on the order
        order = {name: i for i, name in enumerate(opts.worst_case)}
        members.sort(key=lambda m: (attack_kind(m[1].settings) == "black-box", m[1].settings.get("loss") == "dlr",
                                    order.get(m[0], len(order))))  # fmt: skip
        if not members and not (norm == "linf" and opts.worst_case):
            continue
        robust = clean_correct.clone()
        rows = [fold_robust(robust, norm, label, o.index, o.correct, attack_kind(o.settings)) for label, o in members]
        warnings: list[str] = []
        if norm == "linf":
            for name in opts.worst_case:
                attack = build_attack(name, opts, seed)
                table = done.get(name)
                if table is not None and table.settings == attack.describe() and len(table.index) == n:
                    continue  # a table attack: folded above
                idx = robust.nonzero().squeeze(1)
                correct = torch.ones(0, dtype=torch.bool)
                if idx.numel():
                    log.info("evaluate: worst case (L∞): %s on %d points still robust", name, idx.numel())
                    correct = run(attack, idx).correct
                rows.append(fold_robust(robust, norm, name, idx, correct, "white-box"))
            broken = {r["attack"]: r["broken"] for r in rows}
            warnings = check_margin_vs_ce({"apgd-dlr": broken.get("apgd-dlr", 0)}, n)
        if norm in opts.square_norms and opts.square_queries > 0:
            sq = build_attack(SQUARE[norm], opts, seed)
            idx = robust.nonzero().squeeze(1)
            if idx.numel():
                log.info("evaluate: worst case: %s on %d points still robust", sq.name, idx.numel())
                rows.append(fold_robust(robust, norm, sq.name, idx, run(sq, idx).correct, "black-box"))
                warnings += check_black_box_breaks(sq.name, rows[-1]["broken"], int(idx.numel()), n)
        label = "worst case (L∞)" if norm == "linf" else "worst case (L2)"
        text = f"eps={budget:g}; per-image minimum over {len(rows)} attacks"
        out.append(WorstCase(label, robust, accuracy_row(label, robust, "worst case", text), rows, warnings))
    return out


def per_class_rows(
    classes: Sequence[str],
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    outcomes: Mapping[str, AttackOutcome],
    worst: Mapping[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """Per class: clean accuracy, accuracy under each attack (on the images it ran on) and in each
    worst case; y, clean_correct and the worst cases' robust flags are (N,)."""
    rows: list[dict[str, Any]] = []
    for c, cls in enumerate(classes):
        row: dict[str, Any] = {"class": cls, "clean": float(clean_correct[y == c].float().mean())}
        for name, out in outcomes.items():
            mask = y[out.index] == c
            row[name] = float(out.correct[mask].float().mean()) if mask.any() else math.nan
        for label, flags in worst.items():
            row[label] = float(flags[y == c].float().mean()) if bool((y == c).any()) else math.nan
        rows.append(row)
    return rows
