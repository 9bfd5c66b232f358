"""Command-line interface: parse -> config -> one library call. User errors exit with code 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from .errors import UserError

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


def _kv(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise UserError(f"expected KEY=VALUE, got '{p}'")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML run configuration")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to create")] = Path("runs/default"),
    quick: Annotated[bool, typer.Option("--quick", help="300 images, for a first look")] = False,
    full: Annotated[bool, typer.Option("--full", help="the papers' full attack budgets (slow on CPU)")] = False,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="number of images analysed")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the full dissection and write a run directory with report.html."""
    from .config import RunConfig, load_config
    from .pipeline import quick_config, run_pipeline

    _setup_logging(verbose)
    cfg = load_config(config) if config else RunConfig()
    cfg = cfg.replace(model=model, weights=weights, dataset=data, data_dir=data_dir, n=n, seed=seed)
    if full:
        cfg = cfg.replace(quick=False)
    if quick:
        cfg = quick_config(cfg)
    path = run_pipeline(cfg, out, overwrite=overwrite, resume=resume, progress=True)
    typer.echo(f"wrote {path}/report.html")


def _analysis_run(
    stage: str,
    stage_options: dict[str, Any],
    model: str | None,
    weights: str | None,
    data: str | None,
    data_dir: str | None,
    n: int | None,
    seed: int | None,
    quick: bool,
    out: Path,
    overwrite: bool,
    resume: bool,
    verbose: bool,
) -> None:
    """Run the overview stage plus one analysis stage into a run directory."""
    from .config import RunConfig
    from .pipeline import quick_config, run_pipeline

    _setup_logging(verbose)
    cfg = RunConfig(stages={"overview": {}, stage: stage_options}, quick=False)
    cfg = cfg.replace(model=model, weights=weights, dataset=data, data_dir=data_dir, n=n, seed=seed)
    if quick:
        cfg = quick_config(cfg)
    path = run_pipeline(cfg, out, overwrite=overwrite, resume=resume, progress=True)
    typer.echo(f"wrote {path}/report.html")


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="run directory to create")]
NOpt = Annotated[int | None, typer.Option("--n", help="number of test images")]
QuickOpt = Annotated[bool, typer.Option("--quick", help="reduced settings for a first look")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue an interrupted run (cached results are reused)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]


@app.command()
def evaluate(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    attacks: Annotated[str, typer.Option("--attacks", help="all, or a comma-separated list of attacks")] = "all",
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget in pixel units, e.g. 0.1 or 8/255")] = "0.1",
    eps_l2: Annotated[str, typer.Option("--eps-l2", help="L2 budget")] = "1.5",
    steps: Annotated[int, typer.Option("--steps", help="PGD steps")] = 20,
    n: NOpt = 1000,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    quick: QuickOpt = False,
    out: OutOpt = Path("runs/evaluate"),
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Robust accuracy under every attack (with 95% intervals), curves, grids, masking checks."""
    from .config import parse_eps

    options = {"attacks": attacks, "eps": parse_eps(eps), "eps_l2": parse_eps(eps_l2), "pgd_steps": steps}
    _analysis_run("evaluate", options, model, weights, data, data_dir, n, seed, quick, out, overwrite, resume, verbose)


@app.command()
def sensitivity(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="comma-separated layer names (default: every conv)")
    ] = None,
    attack: Annotated[str, typer.Option("--attack", help="attack for the dual pairs (pgd-linf)")] = "pgd-linf",
    eps: Annotated[str, typer.Option("--eps", help="L-inf budget, e.g. 0.1 or 8/255")] = "0.1",
    steps: Annotated[int, typer.Option("--steps", help="PGD steps (alpha = eps/sqrt(k))")] = 10,
    experiments: Annotated[
        str | None, typer.Option("--experiments", help="comma-separated: profiles, amplification, eps_sweep, ...")
    ] = None,
    models: Annotated[
        str | None, typer.Option("--models", help="other checkpoints to overlay, comma-separated")
    ] = None,
    n: NOpt = 1000,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    quick: QuickOpt = False,
    out: OutOpt = Path("runs/sensitivity"),
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Neuron sensitivity: every experiment of the paper (profiles, amplification, ratio vs eps, ...)."""
    from .config import parse_eps

    if attack != "pgd-linf":
        raise UserError(f"--attack {attack}: the sensitivity protocol uses pgd-linf (METHODS §5.5)")
    options: dict[str, Any] = {"eps": parse_eps(eps), "steps": steps}
    if layers:
        options["layers"] = [s.strip() for s in layers.split(",") if s.strip()]
    if experiments:
        options["experiments"] = [s.strip() for s in experiments.split(",") if s.strip()]
    if models:
        options["compare"] = [s.strip() for s in models.split(",") if s.strip()]
    _analysis_run(
        "sensitivity", options, model, weights, data, data_dir, n, seed, quick, out, overwrite, resume, verbose
    )


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Re-render report.html from a run directory's files alone."""
    from .report import render_report

    typer.echo(f"wrote {render_report(run_dir)}")


@app.command()
def train(
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="training preset (robustdissect list presets) or YAML file")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="zoo model name")] = None,
    model_arg: ModelArgOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    n: Annotated[int | None, typer.Option("--n", help="train on a seeded subset of N images")] = None,
    objective: Annotated[
        str | None, typer.Option("--objective", help="training objective (robustdissect list objectives)")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this folder")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a zoo model; writes per-epoch state, model.safetensors and its card."""
    import dataclasses

    from .training import TrainConfig
    from .training import train as train_fn

    _setup_logging(verbose)
    base: dict[str, Any] = {}
    if config:
        from .resources import read_train_config

        base = read_train_config(config)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = [k for k in base if k not in known]
        if unknown:
            from .errors import unknown_name

            raise unknown_name(f"setting in {config}", unknown[0], known)
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
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if model_arg:
        base["model_args"] = {**base.get("model_args", {}), **_kv(model_arg)}
    cfg = TrainConfig(**base)
    folder = resume or out
    if folder is None:
        raise UserError("pass --out DIR (or --resume DIR to continue a run)")
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
    from fnmatch import fnmatchcase

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
        from .resources import train_presets

        for name in train_presets():
            if fnmatchcase(name, pattern):
                typer.echo(f"robustdissect train --config {name}")
        return
    import importlib

    from .registry import Registry

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


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return int(e.code or 0)
    print(e.code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit with code 2."""
    try:
        app(args=argv)
        code = 0
    except UserError as e:
        print(f"robustdissect: error: {e}", file=sys.stderr)
        code = 2
    except SystemExit as e:
        code = _exit_code(e)
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
