"""Command-line interface: parse -> config -> one library call.

Exit codes: 0 done; 2 a mistake the user can fix (one line on stderr, nothing left behind);
1 an unexpected error (one line; the traceback goes to DIR.partial/error.log, or to the terminal
with --verbose), or a problem found after finished work was kept (a full disk, user code that
called sys.exit: one line with the resume hint); 130 interrupted by Ctrl-C, 143 by SIGTERM (one
line that says how to resume).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from .errors import UserError
from .registry import Registry
from .resources import read_train_config, train_presets

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Dissect the adversarial robustness of image classifiers, feature by feature.",
)

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="shipped checkpoint, zoo model, .safetensors with card, or file.py:factory"),
]
DataOpt = Annotated[str | None, typer.Option("--data", help="dataset name (robustdissect list datasets)")]
DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="folder or file holding the dataset")]
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", help="weights for a zoo or user model (.safetensors or .pt)")
]
ModelArgOpt = Annotated[
    list[str] | None, typer.Option("--model-arg", help="KEY=VALUE argument for the model factory (repeatable)")
]


def _kv(pairs: list[str] | None, flag: str = "--model-arg") -> dict[str, Any]:
    """Parse repeated `--model-arg KEY=VALUE` (values are YAML scalars or lists)."""
    out: dict[str, Any] = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k.strip().isidentifier():
            raise UserError(f"{flag} expects KEY=VALUE with KEY a Python name, got '{p}'")
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise UserError(f"{flag} {p}: cannot read the value ({' '.join(str(e).split())})") from None
    return out


def _eps(text: str, flag: str, linf: bool) -> float:
    """An epsilon from the command line: positive, finite, and at most 1 for L-inf."""
    from .config import parse_eps

    if text.strip().startswith("-"):  # -0.1 and 0 get the same message; unreadable text its own
        parse_eps(text.strip()[1:], name=flag)
        raise UserError(f"{flag} must be positive, got {text}")
    value = parse_eps(text, maximum=1.0 if linf else None, name=flag)
    if value <= 0:
        raise UserError(f"{flag} must be positive, got {text}")
    return value


def _names(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def _print_headline(path: Path, as_json: bool = False) -> None:
    """The run's numbers on the console, then the path of its report; with `as_json`, the
    summary of results.json (headline, per stage summary, seconds) as JSON instead."""
    from .pipeline import headline
    from .runs import read_json

    results = read_json(path / "results.json")
    if as_json:
        keep = ("model", "dataset", "clean_accuracy", "robust_accuracy", "headline", "evidence")
        summary = {k: results[k] for k in keep if k in results}
        summary["stages"] = {
            name: {"summary": e.get("summary", {}), "warnings": e.get("warnings", []), "seconds": e.get("seconds")}
            for name, e in results.get("stages", {}).items()
        }
        summary["report"] = str(path / "report.html")
        typer.echo(json.dumps(summary, indent=2))
        return
    for line in headline(results):
        typer.echo(line)
    typer.echo(f"wrote {path}/report.html")


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="run directory to create")]
NOpt = Annotated[int | None, typer.Option("--n", min=1, help="number of test images")]
SeedOpt = Annotated[int | None, typer.Option("--seed", min=0)]
QuickOpt = Annotated[bool, typer.Option("--quick", help="reduced settings for a first look")]
ConvLayersOpt = Annotated[
    str | None, typer.Option("--layers", help="comma-separated layer names (default: every conv)")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace an existing run directory (only one robustdissect made)")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue an interrupted run (cached results are reused)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logs; tracebacks on the terminal")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="run YAML: its settings and this stage's block are the base")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the summary of results.json as JSON")]
SampleOpt = Annotated[
    bool, typer.Option("--sample", help="a seeded random sample of --n images instead of the first n in file order")
]


@dataclass(frozen=True)
class Target:
    """The options every analysing command shares (declared once in COMMON_OPTIONS): the model
    and its counterparts, the data, the device, the images, the budgets and the run directory."""

    model: str | None = None
    weights: str | None = None
    model_arg: list[str] | None = None
    normalize: str | None = None
    compare: str | None = None
    compare_weights: str | None = None
    data: str | None = None
    data_dir: str | None = None
    image_size: int | None = None
    batch_size: str | None = None
    device: str | None = None
    n: int | None = None
    seed: int | None = None
    sample: bool = False
    quick: bool = False
    full: bool = False
    config: Path | None = None
    out: Path = Path("runs/default")
    overwrite: bool = False
    resume: bool = False
    as_json: bool = False
    verbose: bool = False
    max_input_bytes: str | None = None

    def run_config(self, base: Any) -> Any:
        """`base` (a RunConfig) with every option given on the command line applied."""
        from .config import check_device
        from .models.spec import split_label

        label, model = split_label(self.model) if self.model else (None, None)
        if self.quick and self.full:
            raise UserError("--quick and --full exclude each other (--quick: a first look, --full: full budgets)")
        if self.device is not None:
            check_device(self.device)
        if self.max_input_bytes is not None:
            from .data.files import MAX_INPUT_ENV, max_input_bytes

            os.environ[MAX_INPUT_ENV] = self.max_input_bytes  # read by every data loader of this process
            try:
                max_input_bytes()
            except UserError:
                raise UserError(f"--max-input-bytes {self.max_input_bytes!r}: expected a positive number of "
                                "bytes, e.g. 4294967296 or 4G") from None
        cfg = base.replace(model=model, label=label, weights=self.weights, dataset=self.data,
                           data_dir=self.data_dir, n=self.n, seed=self.seed, device=self.device,
                           normalize=self.normalize)  # fmt: skip
        if self.image_size is not None:
            cfg = cfg.replace(data_options={**cfg.data_options, "image_size": self.image_size})
        if self.batch_size is not None:
            from .batching import check_batch_size

            cfg = cfg.replace(batch_size=check_batch_size(self.batch_size, "--batch-size"))
        if self.model_arg:
            cfg = cfg.replace(model_args={**cfg.model_args, **_kv(self.model_arg)})
        if self.compare is not None:
            cfg = cfg.replace(compare=_compare_entries(self.compare, self.compare_weights))
        elif self.compare_weights:
            raise UserError("--compare-weights needs --compare: one weights file per compared model")
        if self.full:
            cfg = cfg.replace(quick=False)
        if self.sample:
            cfg = cfg.replace(sample=True)
        return cfg


def _compare_entries(compare: str, weights: str | None) -> list[Any]:
    """`--compare a,b=SPEC` with `--compare-weights W1,` -> config entries (strings, or mappings
    where a weights file is given); `--compare none` -> no counterpart."""
    names = _names(compare)
    if names == ["none"]:
        return []
    files = [w.strip() for w in (weights or "").split(",")] if weights else []
    if len(files) > len(names):
        raise UserError(f"--compare-weights gives {len(files)} files for {len(names)} --compare models")
    entries: list[Any] = []
    for i, spec in enumerate(names):
        w = files[i] if i < len(files) and files[i] else None
        if w is None:
            entries.append(spec)
            continue
        from .models.spec import split_label

        label, model = split_label(spec)
        entries.append({"model": model, "weights": w, **({"name": label} if label else {})})
    return entries


COMMON_OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (ModelOpt, None),
    "weights": (WeightsOpt, None),
    "model_arg": (ModelArgOpt, None),
    "normalize": (Annotated[str | None, typer.Option(
        "--normalize", help="the model expects standardised inputs: imagenet, cifar10, cifar100, mnist or MEAN/STD "
        "(per channel, e.g. 0.5,0.5,0.5/0.25,0.25,0.25); attacks and ε stay in pixels [0, 1]")], None),
    "compare": (Annotated[str | None, typer.Option(
        "--compare", help="counterparts to compare, comma-separated SPEC or name=SPEC (same forms as --model); "
        "'none' for no counterpart (default: PAT and SNS beside the shipped vanilla model, else none)")], None),
    "compare_weights": (Annotated[str | None, typer.Option(
        "--compare-weights", help="weights for the --compare models, comma-separated in the same order "
        "(empty for a checkpoint)")], None),
    "data": (DataOpt, None),
    "data_dir": (DataDirOpt, None),
    "image_size": (Annotated[int | None, typer.Option(
        "--image-size", min=1, max=4096, help="image-folder: resize the shorter side to SIZE and centre-crop SIZE x "
        "SIZE (e.g. 224 for ImageNet models)")], None),
    "batch_size": (Annotated[str | None, typer.Option(
        "--batch-size", help="images per batch, or auto (default): on CUDA the largest batch that fits, found once "
        "per model; on a CPU each stage's default")], None),
    "device": (Annotated[str | None, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N or "
                                                  "mps")], None),
    "n": (Annotated[int | None, typer.Option("--n", min=1, help="number of images analysed (default 500)")], None),
    "seed": (Annotated[int | None, typer.Option("--seed", min=0)], None),
    "sample": (Annotated[bool, typer.Option(
        "--sample", help="a seeded random sample of --n images instead of the first n in file order")], False),
    "quick": (Annotated[bool, typer.Option("--quick", help="a first look: at most 200 images, lighter settings")],
              False),
    "full": (Annotated[bool, typer.Option("--full", help="the papers' full budgets (slow on a CPU)")], False),
    "config": (Annotated[Path | None, typer.Option(
        "--config", "-c", help="run YAML: its settings (and this command's stage block) are the base")], None),
    "out": (Annotated[Path, typer.Option("--out", "-o", help="run directory to create")], None),
    "overwrite": (Annotated[bool, typer.Option(
        "--overwrite", help="replace an existing run directory (only one robustdissect made)")], False),
    "resume": (Annotated[bool, typer.Option("--resume", help="continue an interrupted run")], False),
    "as_json": (Annotated[bool, typer.Option("--json", help="print the summary of results.json as JSON")], False),
    "verbose": (Annotated[bool, typer.Option("--verbose", "-v", help="debug logs; tracebacks on the terminal")],
                False),
    "max_input_bytes": (Annotated[str | None, typer.Option(
        "--max-input-bytes", help="the most memory one input file may need once loaded, e.g. 16G (default 4G; "
        "also ROBUSTDISSECT_MAX_INPUT_BYTES)")], None),
}  # fmt: skip


def analysis_command(name: str, out: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(own options..., target: Target)` as command `name`: its signature gets every
    option of COMMON_OPTIONS (default run directory `out`), packed into `target`."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "target"]
        common = [
            inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                              default=Path(out) if key == "out" else default)
            for key, (annotation, default) in COMMON_OPTIONS.items()
        ]  # fmt: skip

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            ctx = kwargs.pop("cli_context", None)
            _GIVEN.clear()
            _GIVEN.update(name for name in [*(p.name for p in own), *COMMON_OPTIONS] if _given(ctx, name))
            target = Target(**{key: kwargs.pop(key) for key in COMMON_OPTIONS})
            fn(**kwargs, target=target)

        context = inspect.Parameter("cli_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        command.__signature__ = inspect.Signature([*own, *common, context])  # type: ignore[attr-defined]
        command.__annotations__ = {}  # typer reads the signature above, not fn's annotations
        app.command(name)(command)
        return fn

    return register


# The command's own options given on the command line (not left at their defaults), set per call.
_GIVEN: set[str] = set()
# stage option -> the command-line option that sets it, where the names differ
_CLI_NAME = {("evaluate", "pgd_steps"): "steps", ("concepts", "n"): "concept_n", ("metric", "evaluation"): "evaluate"}


def _given(ctx: Any, name: str) -> bool:
    """Whether option `name` came from the command line (True when that cannot be told)."""
    source = getattr(ctx, "get_parameter_source", lambda _n: None)(name) if ctx is not None else None
    return source is None or source.name != "DEFAULT"


def _stage_run(stage: str, stage_options: dict[str, Any], target: Target) -> None:
    """Run the overview stage plus one analysis stage into a run directory, with the run's reduced
    budgets unless --full (as `run`). With --config (a run YAML), its settings and its block for
    this stage are the base; options given on the command line win (a command-line default does
    not override a key the block sets)."""
    from .config import RunConfig, load_config
    from .runs import check_out

    check_out(target.out, target.overwrite)
    base = load_config(target.config) if target.config else RunConfig()
    block = base.stages.get(stage, {})
    given = {k: v for k, v in stage_options.items() if k not in block or _CLI_NAME.get((stage, k), k) in _GIVEN}
    options = {**block, **given}
    cfg = target.run_config(base.replace(stages={"overview": {}, stage: options}))
    _execute(cfg, target)


def _execute(cfg: Any, target: Target) -> None:
    from .parallel import dist_env
    from .pipeline import quick_config, run_pipeline

    _setup_logging(target.verbose)
    if target.quick:
        cfg = quick_config(cfg)
    path = run_pipeline(cfg, target.out, overwrite=target.overwrite, resume=target.resume)
    if dist_env().is_main:  # under torchrun only rank 0 reports
        _print_headline(path, target.as_json)


@analysis_command("run", "runs/default")
def run(target: Target) -> None:
    """Run every stage and write a run directory with report.html (the run's reduced budgets;
    --full: the papers')."""
    from .config import RunConfig, load_config
    from .runs import check_out

    check_out(target.out, target.overwrite)
    base = load_config(target.config) if target.config else RunConfig()
    _execute(target.run_config(base), target)


@analysis_command("evaluate", "runs/evaluate")
def evaluate(
    attacks: Annotated[str, typer.Option("--attacks", help="all, or a comma-separated list of attacks")] = "all",
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget in pixel units, e.g. 0.1 or 8/255")] = "0.1",
    eps_l2: Annotated[str, typer.Option("--eps-l2", help="L2 budget")] = "1.5",
    steps: Annotated[int, typer.Option("--steps", min=1, max=100_000, help="PGD steps")] = 20,
    attack_opt: Annotated[
        list[str] | None,
        typer.Option("--attack-opt", help="ATTACK.PARAM=VALUE for any attack parameter, e.g. pgd-linf.alpha=0.01, "
                     "pgd-linf.alpha=2.5eps/k, pgd-linf.restarts=5, apgd-ce.steps=50 (repeatable)"),
    ] = None,
    curves: Annotated[
        str | None, typer.Option("--curves", help="eps,steps (default), eps, steps or none: the sweeps and checks")
    ] = None,
    corruptions: Annotated[
        str | None, typer.Option("--corruptions", help="comma-separated corruptions, or none (default: all seven)")
    ] = None,
    *,
    target: Target,
) -> None:
    """Robust accuracy under every attack (with 95% intervals), worst case per threat model,
    curves, grids, masking checks."""
    options: dict[str, Any] = {
        "attacks": attacks, "eps": _eps(eps, "--eps", True), "eps_l2": _eps(eps_l2, "--eps-l2", False),
    }  # fmt: skip
    options["pgd_steps"] = steps
    if attack_opt:
        options["attack_options"] = _attack_options(attack_opt)
    if curves is not None:
        chosen = set(_names(curves)) - {"none"}
        if not chosen <= {"eps", "steps"}:
            raise UserError(f"--curves takes eps, steps or none, got {curves!r}")
        options["curves"] = bool(chosen)
        if chosen == {"eps"}:
            options["steps_sweep"] = [steps]
        elif chosen == {"steps"}:
            options["eps_sweep"] = [options["eps"]]
    if corruptions is not None:
        options["corruptions"] = [c for c in _names(corruptions) if c != "none"]
    if attacks != "all":
        from .attacks import ATTACKS

        if not _names(attacks):
            raise UserError("--attacks must be 'all' or a comma-separated list of attack names")
        for name in _names(attacks):
            ATTACKS.get(name)  # unknown names fail here, with close matches, before any work
    _stage_run("evaluate", options, target)


@analysis_command("sensitivity", "runs/sensitivity")
def sensitivity(
    layers: ConvLayersOpt = None,
    attack: Annotated[str, typer.Option("--attack", help="attack for the dual pairs (pgd-linf)")] = "pgd-linf",
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget, e.g. 0.1 or 8/255")] = "0.1",
    steps: Annotated[int, typer.Option("--steps", min=1, max=100_000, help="PGD steps (alpha = eps/sqrt(k))")] = 10,
    experiments: Annotated[
        str | None, typer.Option("--experiments", help="comma-separated: profiles, amplification, eps_sweep, ...")
    ] = None,
    *,
    target: Target,
) -> None:
    """Neuron sensitivity: every experiment of the paper (profiles, amplification, ratio vs eps, ...);
    the --compare models are overlaid."""
    if attack != "pgd-linf":
        raise UserError(f"--attack {attack}: the sensitivity protocol uses pgd-linf (METHODS §5.5)")
    options: dict[str, Any] = {"eps": _eps(eps, "--eps", True), "steps": steps}
    if layers:
        options["layers"] = _names(layers)
    if experiments:
        options["experiments"] = _names(experiments)
    _stage_run("sensitivity", options, target)


@analysis_command("features", "runs/features")
def features(
    layers: ConvLayersOpt = None,
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget of the attack set, e.g. 0.1 or 8/255")] = "0.1",
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, max=100_000, help="feature-targeted PGD steps")
    ] = None,
    restarts: Annotated[
        int | None, typer.Option("--restarts", min=1, max=1000, help="feature-targeted PGD restarts")
    ] = None,
    candidates: Annotated[
        int | None, typer.Option("--candidates", min=0, max=100_000, help="feature-attacked units per depth bin")
    ] = None,
    *,
    target: Target,
) -> None:
    """Feature dissection: usefulness, robust usefulness (upper bound), stability and the four
    quadrants per unit; the quadrant shift of each --compare model."""
    given = {"feature_steps": steps, "restarts": restarts, "candidates_per_bin": candidates}
    options: dict[str, Any] = {"eps": _eps(eps, "--eps", True), **{k: v for k, v in given.items() if v is not None}}
    if layers:
        options["layers"] = _names(layers)
    _stage_run("features", options, target)


@analysis_command("concepts", "runs/concepts")
def concepts(
    layers: ConvLayersOpt = None,
    concept_n: Annotated[int, typer.Option("--concept-n", min=1, help="generated concept images")] = 2000,
    quantile: Annotated[
        float, typer.Option("--quantile", min=0.0001, max=0.5, help="top share per unit (0.005; PNAS 0.01)")
    ] = 0.005,
    permutations: Annotated[int, typer.Option("--permutations", min=0, help="shuffles of the null")] = 100,
    broden: Annotated[
        str | None, typer.Option("--broden", help="a Broden directory instead of the generated concept set")
    ] = None,
    concept_dir: Annotated[
        str | None,
        typer.Option("--concept-dir", help="your concepts: DIR/images/NAME.png|jpg, DIR/masks/NAME.png (label PNG, "
                     "0 = none) and DIR/labels.txt|csv (index, name[, category])"),
    ] = None,
    join: Annotated[bool, typer.Option("--join/--no-join", help="attack x concept with the feature quadrants")] = True,
    *,
    target: Target,
) -> None:
    """Network Dissection: the concept of every unit, and which concepts the brittle units carry."""
    options: dict[str, Any] = {"n": concept_n, "quantile": quantile, "permutations": permutations, "join": join}
    if layers:
        options["layers"] = _names(layers)
    if broden:
        options["broden"] = broden
    if concept_dir:
        if broden:
            raise UserError("pass --broden DIR or --concept-dir DIR, not both")
        from .data.concepts import check_concept_dir

        check_concept_dir(concept_dir)  # the layout is checked before any work; masks as they are read
        options["concept_dir"] = concept_dir
    _stage_run("concepts", options, target)


@analysis_command("metric", "runs/metric")
def metric(
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget of the KL maximiser, e.g. 0.1 or 8/255")] = "0.1",
    steps: Annotated[
        int, typer.Option("--steps", min=1, max=100_000, help="PGD steps on KL (alpha = eps/4); 20 = METHODS' K")
    ] = 5,
    restarts: Annotated[int, typer.Option("--restarts", min=1, max=1000, help="restarts of the maximiser")] = 1,
    calibration: Annotated[
        str, typer.Option("--calibration", help="temperature (mean max-softmax 0.9), logit_norm or none")
    ] = "temperature",
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="also time a PGD-100 robust-accuracy evaluation of the same images")
    ] = False,
    study: Annotated[str | None, typer.Option("--study", help="folder of a YU-1 study to show")] = None,
    *,
    target: Target,
) -> None:
    """Robustness metric Ψ of the model and each --compare model: the largest prediction
    divergence (KL) in the eps-ball, no labels needed."""
    options: dict[str, Any] = {"eps": _eps(eps, "--eps", True), "steps": steps, "restarts": restarts,
                               "calibration": calibration, "evaluation": evaluate, "counterparts": None}  # fmt: skip
    if target.n is not None:
        options["n"] = target.n
    if study is not None:
        options["study"] = study
    _stage_run("metric", options, target)


@analysis_command("landscape", "runs/landscape")
def landscape(
    eps: Annotated[str, typer.Option("--eps", help="threat radius (L-inf, or L2 with --norm l2)")] = "0.1",
    grid: Annotated[int | None, typer.Option("--grid", min=3, max=401, help="G x G grid (odd)")] = None,
    norm: Annotated[str, typer.Option("--norm", help="direction units: linf or l2")] = "linf",
    direction: Annotated[str, typer.Option("--direction", help="d1: pgd (stored PGD example) or gradient")] = "pgd",
    *,
    target: Target,
) -> None:
    """Decision and CE surfaces in input space around test images, the model beside each --compare
    model: contours, 3-D, a* and steepness."""
    options: dict[str, Any] = {"eps": _eps(eps, "--eps", norm != "l2"), "norm": norm, "direction": direction,
                               "counterparts": None}  # fmt: skip
    if grid is not None:
        options["grid"] = grid
    if target.n is not None:
        options["n"] = target.n
    _stage_run("landscape", options, target)


@analysis_command("diagnose", "runs/diagnose")
def diagnose(
    layers: Annotated[
        str | None, typer.Option("--layers", help="layer boundaries, comma-separated (default: every ReLU and pool)")
    ] = None,
    eps: Annotated[str | None, typer.Option("--eps", help="L-inf PGD budget (default: the evaluate stage's)")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, max=100_000, help="PGD steps")] = None,
    early_stop: Annotated[
        bool | None,
        typer.Option("--early-stop/--no-early-stop",
                     help="stop PGD at each image's first success (default: as the evaluate stage, on)"),
    ] = None,
    inverter: Annotated[
        str | None,
        typer.Option("--inverter", help="decoder (trained G_l; --full) or optim (training-free inversion; default)"),
    ] = None,
    inversion_steps: Annotated[
        int | None, typer.Option("--inversion-steps", min=1, help="Adam steps of the inversion")
    ] = None,
    decoder_n: Annotated[
        int | None, typer.Option("--decoder-n", min=1, help="clean training images for G_l (default 1000)")
    ] = None,
    decoder_epochs: Annotated[int | None, typer.Option("--decoder-epochs", min=1, help="default 3")] = None,
    gan: Annotated[bool, typer.Option("--gan", help="add the GAN term to the decoders (GPU runs)")] = False,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="the model that reads the explanations: a --compare name or checkpoint "
                     "(default: the first robust --compare model); 'self'"),
    ] = None,
    study: Annotated[str | None, typer.Option("--study", help="folder of an IG-1 pooling study to show")] = None,
    *,
    target: Target,
) -> None:
    """Layer diagnosis: flip layer V_l, V_l^soft, information loss IL_l, amplification A_l, strips."""
    given = {"inverter": inverter, "decoder_n": decoder_n, "decoder_epochs": decoder_epochs,
             "inversion_steps": inversion_steps, "layers": _names(layers) if layers is not None else None,
             "eps": _eps(eps, "--eps", True) if eps is not None else None, "steps": steps,
             "early_stop": early_stop, "judge": judge, "study": study, "n": target.n}  # fmt: skip
    options: dict[str, Any] = {"gan": gan, **{k: v for k, v in given.items() if v is not None}}
    _stage_run("diagnose", options, target)


@app.command("robust-data")
def robust_data(
    kind: Annotated[str, typer.Option("--kind", help="r, nr, r-selective, rand, det or bp")],
    n: Annotated[int, typer.Option("--n", min=1, help="training images to transform")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output .safetensors (a JSON card is written beside it)")],
    model: Annotated[str | None, typer.Option("--model", help="source model (PAT for r, else vanilla)")] = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    batch: Annotated[int, typer.Option("--batch", min=1, help="images per resumable batch")] = 250,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="iterations (1000 r/nr, 100 rand/det)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Build a robust / non-robust / random-target / deterministic-target / back-perturbed dataset
    (rerunning the same command resumes an interrupted build; under `torchrun --standalone
    --nproc_per_node W -- robustdissect robust-data ...` the W processes share the batches — the
    `--` keeps torchrun from reading --n as its own option); train on it with --data robust-data:OUT."""
    from .training.robust_data import build_dataset

    _setup_logging(verbose)
    path = build_dataset(kind, n, out, model=model, dataset=data or "fashion-mnist", data_dir=data_dir, seed=seed,
                         batch=batch, steps=steps, progress=True)  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # under torchrun the ranks share the batches; rank 0 writes OUT
        typer.echo(f"wrote {path} and {path.with_suffix('.json')}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Re-render report.html from a run directory's files alone (only files inside it are read)."""
    from .report import render_report

    typer.echo(f"wrote {render_report(run_dir)}")


@app.command()
def train(
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="training preset (robustdissect list presets) or YAML file")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="zoo architecture, checkpoint (name or .safetensors with card) or "
                     "file.py:factory / pkg.module:factory"),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="starting weights: a checkpoint, or a weights file for a zoo or user model"),
    ] = None,
    model_arg: ModelArgOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="learning rate (finite, >= 0)")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="train on a seeded subset of N images")] = None,
    objective: Annotated[
        str | None, typer.Option("--objective", help="training objective (robustdissect list objectives)")
    ] = None,
    eps: Annotated[
        str | None, typer.Option("--eps", help="L-inf budget of the training attack, e.g. 0.1 or 8/255")
    ] = None,
    objective_arg: Annotated[
        list[str] | None,
        typer.Option("--objective-arg", help="KEY=VALUE argument for the objective, e.g. steps=7 (repeatable)"),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0)] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="continue the run in this folder (its own configuration)")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs; tracebacks on the terminal")] = False,
) -> None:
    """Train a zoo, checkpoint or user (file.py:factory) model; writes per-epoch state,
    model.safetensors and its card (which records how to load the model back)."""
    from .training.loop import saved_train_config, train_config_from_dict

    if resume is not None and out is not None and Path(out) != Path(resume):
        raise UserError("pass either --out DIR for a new run or --resume DIR to continue one, not both")
    folder = resume or out
    if folder is None:
        raise UserError("pass --out DIR (or --resume DIR to continue a run)")
    base: dict[str, Any] = {}
    where = "training config"
    if config:
        from .config import load_yaml

        where = config
        base = load_yaml(config, "training config") if Path(config).is_file() else read_train_config(config)
        if not isinstance(base, dict):
            raise UserError(f"{config} must hold a mapping of settings, got {type(base).__name__}")
    elif resume is not None:
        base, where = saved_train_config(resume), f"the configuration saved in {resume}"
    overrides = {
        "model": model,
        "dataset": data,
        "data_dir": data_dir,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "n": n,
        "objective": objective,
        "seed": seed,
        "device": device,
        "init": weights,
    }
    base = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    for key, pairs, flag in (("model_args", model_arg, "--model-arg"), ("objective_args", objective_arg,
                                                                          "--objective-arg")):  # fmt: skip
        if key == "objective_args" and eps is not None:
            pairs = [*(pairs or []), f"eps={_eps(eps, '--eps', True)}"]
        if pairs:
            previous = base.get(key) or {}
            if not isinstance(previous, dict):
                raise UserError(f"{where}: {key} must be a mapping, got {previous!r}")
            base[key] = {**previous, **_kv(pairs, flag)}
    cfg = train_config_from_dict(base, where)
    from .training import train as train_fn

    _setup_logging(verbose)
    result = train_fn(cfg, folder, resume=resume is not None, progress=True)
    if int(os.environ.get("RANK", "0")) == 0:  # one line under torchrun, not one per process
        typer.echo(f"test accuracy {result.card['test_accuracy']:.4f}; wrote {folder}/model.safetensors")


@app.command()
def layers(
    model: ModelOpt = "fmnist-smallcnn-vanilla",
    weights: WeightsOpt = None,
    model_arg: ModelArgOpt = None,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
) -> None:
    """List every layer: path, paper-style alias, output shape and channels."""
    from .data import load_dataset
    from .models import list_layers
    from .pipeline import resolve_model

    ds = load_dataset(data or "fashion-mnist", data_dir)
    m, _card = resolve_model(model or "fmnist-smallcnn-vanilla", weights, _kv(model_arg), ds, require_weights=False)
    rows = list_layers(m, ds.image_shape)
    typer.echo(f"{'path':<28} {'alias':<14} {'type':<18} {'output shape':<16} channels")
    for r in rows:
        typer.echo(f"{r.path:<28} {r.alias:<14} {r.kind:<18} {'x'.join(map(str, r.shape)):<16} {r.channels}")


@app.command("list")
def list_(
    what: Annotated[
        str, typer.Argument(help="datasets | models | checkpoints | presets | objectives | attacks | stages")
    ],
    pattern: Annotated[str, typer.Argument(help="shell-style filter on names, e.g. 'fmnist-*'")] = "*",
) -> None:
    """List what is registered; models are zoo architectures and shipped checkpoints."""
    if what in ("models", "checkpoints"):
        from .models import describe_model, list_models

        for name in list_models(pattern):
            info = describe_model(name)
            if what == "models":
                kind = f"checkpoint of {info.arch}" if info.checkpoint else "architecture"
                typer.echo(f"{name:<34} {kind:<24} {info.summary}")
            elif info.checkpoint:
                typer.echo(f"{name:<34} {info.arch:<10} {info.summary}")
        return
    if what == "presets":
        for name in train_presets():
            if fnmatchcase(name, pattern):
                typer.echo(f"robustdissect train --config {name}")
        return
    registries = {
        "datasets": ("data", "DATASETS"),
        "objectives": ("training", "OBJECTIVES"),
        "attacks": ("attacks", "ATTACKS"),
        "stages": ("stages", "STAGES"),
    }
    if what not in registries:
        raise UserError(
            f"cannot list '{what}'; choose datasets, models, checkpoints, presets, objectives, attacks or stages"
        )
    module, attr = registries[what]
    reg: Registry[Any] = getattr(importlib.import_module(f"robustdissect.{module}"), attr)
    for entry in reg:
        if fnmatchcase(entry.name, pattern):
            typer.echo(f"{entry.name:<20} {entry.summary}")


def _attack_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """`ATTACK.PARAM=VALUE` strings -> {attack: {param: value}} (values read as YAML scalars)."""
    from .attacks import ATTACKS

    out: dict[str, dict[str, Any]] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        attack, dot, param = key.strip().rpartition(".")
        if not sep or not dot or not attack or not param:
            raise UserError(f"--attack-opt expects ATTACK.PARAM=VALUE (e.g. pgd-linf.alpha=0.01), got {item!r}")
        ATTACKS.get(attack)  # unknown attack names fail with close matches
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out.setdefault(attack, {})[param.strip()] = parsed
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return int(e.code or 0)
    print(f"robustdissect: error: {_one_line(str(e.code))}", file=sys.stderr)
    return 1


def _unexpected(e: BaseException, verbose: bool) -> None:
    """One line for an unexpected error; the traceback goes to error.log (and the terminal with -v)."""
    from . import runs

    trace = "".join(traceback.format_exception(e))
    stamp = f"--- {' '.join(sys.argv)}\n"
    log = None
    with contextlib.suppress(OSError):
        log = runs.write_error_log(stamp + trace)
    if verbose:
        print(trace, end="", file=sys.stderr)
    what = _one_line(f"{type(e).__name__}: {e}")
    if len(what) > 200:
        what = what[:197] + "..."
    where = f"; details in {log}" if log else ("" if verbose else "; rerun with --verbose for the traceback")
    print(f"robustdissect: unexpected error: {what}{where}", file=sys.stderr)


# Signals this process received while a command ran (SIGINT, SIGTERM), newest last.
_SIGNALS: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    _SIGNALS.append(signum)
    if signum == signal.SIGTERM:  # a second SIGTERM ends the process at once, as by default
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt  # unwinds like Ctrl-C: locks released, finished stages kept


def _install_signal_handlers() -> dict[int, Any]:
    """Ctrl-C and SIGTERM end a command with one line that says how to resume (exit 130, 143).

    A SIGINT the parent set to be ignored (a background job of a non-interactive shell, nohup)
    stays ignored; SIGTERM is left alone under torchrun, whose agent stops workers with it."""
    previous: dict[int, Any] = {}
    wanted = [signal.SIGINT]
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        wanted.append(signal.SIGTERM)
    for sig in wanted:
        try:
            current = signal.getsignal(sig)
            if current in (signal.default_int_handler, signal.SIG_DFL):
                previous[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main thread: leave the handlers as they are
            pass
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(sig, handler)


def _interrupted(terminated: bool = False) -> None:
    from . import runs

    held = runs.held_locks()
    hint = f"; {held[-1].hint}" if held and held[-1].hint else ""
    print(f"robustdissect: {'terminated' if terminated else 'interrupted'}{hint}", file=sys.stderr)


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from or during (at most a few)."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out and len(out) < 8:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


_NO_SPACE = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded", "os error 122")
_NO_WRITE = ("permission denied", "os error 13", "read-only file system", "os error 30")


def _free_bytes(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    return None


def _os_problem(e: BaseException) -> tuple[str, str] | None:
    """(what happened, what to do) for an OS error the user can fix (a full disk, a folder that
    is not writable), or None. Also recognises the same errors reported by libraries that do not raise OSError
    (safetensors' SafetensorError, torch.save's "file write failed")."""
    from . import runs

    for x in _chain(e):
        if not isinstance(x, OSError) or x.errno is None:
            continue
        name = x.filename if isinstance(x.filename, (str, os.PathLike)) else None
        target = f" writing {name}" if name else ""
        if x.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the disk is full (no space left on device{target})", "free some space"
        if x.errno == errno.EROFS:
            return f"cannot write {name or 'the run directory'}: the file system is read-only", ""
        if x.errno in (errno.EACCES, errno.EPERM) and name:
            file = Path(name)
            folder = file.parent
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"cannot write {file}: {folder} is not writable", ""
            if file.exists() and not os.access(file, os.W_OK):
                return f"cannot write {file}: it is not writable", ""
            return f"permission denied: {file}", ""
    text = " ".join(str(x).lower() for x in _chain(e))
    run = runs.current_run()
    where = f" in {run.path}" if run is not None else ""
    if any(k in text for k in _NO_SPACE):
        return f"the disk is full (no space left on device writing{where or ' a file'})", "free some space"
    if any(k in text for k in _NO_WRITE) and not isinstance(e, OSError):
        return f"cannot write{where or ' a file'}: permission denied or a read-only file system", ""
    held = runs.held_locks()
    if "file write failed" in text and held:  # torch.save reports no errno
        free = _free_bytes(held[-1].work)
        if free is not None and free < 2**20:
            return f"the disk is full (no space left on device writing in {held[-1].work})", "free some space"
    return None


def _stopped(message: str, action: str = "") -> int:
    """Report a problem that stopped a command, with what to do (`action`, may be empty): with
    nothing computed yet, the run directory is removed and the exit code is 2; with finished work
    kept, 1 and how to resume."""
    from . import runs

    run = runs.current_run()
    held = runs.held_locks()
    if run is not None and run.computed():
        then = f"{action}, then rerun" if action else "rerun"
        hint = f"finished work is kept in {run.path}; {then} the same command with --resume to continue"
        code = 1
    elif run is None and held and held[-1].hint:  # e.g. train: its own way to continue
        hint = f"{action}; {held[-1].hint}" if action else held[-1].hint
        code = 1
    else:
        if run is not None:
            run.discard()
        hint, code = action, 2
    print(f"robustdissect: error: {message}{'; ' + hint if hint else ''}", file=sys.stderr)
    return code


def _foreign_exit(e: SystemExit, verbose: bool) -> int:
    """A SystemExit that escaped a command came from code the command called (a model's forward
    pass, a hook, a library): never a success."""
    frames = traceback.extract_tb(e.__traceback__)
    at = ""
    if frames:
        last = frames[-1]
        with contextlib.suppress(ValueError):
            last_file = os.path.relpath(last.filename)
            at = f" at {last_file if not last_file.startswith('..') else last.filename}:{last.lineno}"
    if verbose:
        print("".join(traceback.format_exception(e)), end="", file=sys.stderr)
    status = "0" if e.code is None else str(e.code) if isinstance(e.code, int) else repr(e.code)
    return _stopped(f"code the run called exited with status {status} (SystemExit{at}) before the run finished")


def _broken_pipe(e: SystemExit) -> bool:
    """typer ends a command whose stdout was closed (`robustdissect list | head`) with exit 1."""
    return isinstance(e.__context__, OSError) and e.__context__.errno == errno.EPIPE


def _invoke(args: list[str]) -> int:
    """Run one command; every outcome is an exit code and at most one line on stderr."""
    from . import runs

    verbose = any(a in ("--verbose", "-v") for a in args)
    command = typer.main.get_command(app)
    del _SIGNALS[:]
    try:
        rv = command.main(args=args or ["--help"], prog_name="robustdissect", standalone_mode=False)
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        if code == 130:  # Ctrl-C or SIGTERM inside a command (the parser turns it into exit code 130)
            terminated = bool(_SIGNALS) and _SIGNALS[-1] == signal.SIGTERM
            _interrupted(terminated)
            code = 143 if terminated else 130
    except UserError as e:
        print(f"robustdissect: error: {_one_line(str(e))}", file=sys.stderr)
        code = 2
    except typer.Abort:
        print("robustdissect: aborted", file=sys.stderr)
        code = 1
    except typer.TyperException as e:  # the parser's own errors: unknown option, bad value, ...
        print(f"robustdissect: error: {_one_line(e.format_message())}", file=sys.stderr)
        code = int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        terminated = bool(_SIGNALS) and _SIGNALS[-1] == signal.SIGTERM
        _interrupted(terminated)
        code = 143 if terminated else 130
    except SystemExit as e:
        code = _exit_code(e) if _broken_pipe(e) else _foreign_exit(e, verbose)
    except Exception as e:
        problem = _os_problem(e)
        if problem is None:
            _unexpected(e, verbose)
            code = 1
        else:
            if verbose:
                print("".join(traceback.format_exception(e)), end="", file=sys.stderr)
            code = _stopped(_one_line(problem[0]), problem[1])
    finally:
        runs.release_all()
    return code


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit with code 2 (see the module doc)."""
    handlers = _install_signal_handlers()
    try:
        code = _invoke(sys.argv[1:] if argv is None else list(argv))
    finally:
        _restore_signal_handlers(handlers)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, gloo's worker threads can still be alive when the interpreter runs its
        # C++ static destructors, which then aborts the process (SIGABRT) after a run that
        # finished and wrote everything. All output is flushed here and the process ends without
        # those destructors, so its exit status is the command's own.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
