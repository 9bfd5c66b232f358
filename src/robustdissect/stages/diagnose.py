"""Stage `diagnose`: layer diagnosis (METHODS §1) of the run's model: per layer V_l, V_l^soft (read
by an independent judge), IL_l, d_l and A_l beside σ_Ratio, the explanation strips E_0(x′) … E_L(x′)
beside the clean strip, Spearman(IL_l, V_l) with a bootstrap interval, and the IG-1 pooling study
when one has been run (`python -m robustdissect.studies.ig1`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.diagnose import (
    INVERTERS,
    DecoderBank,
    DecoderSettings,
    Diagnosis,
    InversionSettings,
    OptimisationInverter,
    diagnose,
    diagnosis_layers,
    layer_sigma_ratio,
)
from ..config import check_ints, parse_budgets, stage_options
from ..errors import UserError
from ..evaluation import AttackOutcome, EvaluateOptions, build_attack
from ..report.plots_diagnose import layer_bars, pooling_comparison, strips
from ..resources import study_or_shipped
from .base import STAGES, AnalysisUnavailable, Context, Prepared, check_model_name, section, stage_settings

log = logging.getLogger(__name__)

# docs/results/ig1/study.json, shipped in the package by `python -m robustdissect.studies.ship`
SHIPPED_STUDY = "ig1-fmnist.json"


@dataclass(frozen=True)
class DiagnoseOptions:
    """Options of the `diagnose` stage.

    n: images (a prefix of the run's analysed split); layers: the boundaries l = 1..L (None: every
    ReLU output and pooling layer in forward order); eps / steps: the L∞ PGD (None: the evaluate
    stage's pgd-linf settings, so its stored examples are reused); early_stop: None keeps the
    evaluate stage's rule (each image frozen at its first successful step, just across the
    boundary); False runs every step and keeps the highest-loss successful iterate, as IG-1 does —
    explanations of such deeper examples reach the adversarial class far more often (the shipped
    standard smallcnn, judge TRADES, 100 images, PGD-20: no flip 62% early-stopped, 9% without);
    attack_all: attack the whole analysed split as evaluate does (a store hit when evaluate ran) and
    take the prefix;
    inverter: "decoder" (METHODS §1.5's GAN-free G_l, trained on `decoder_n` clean training
    images with DecoderSettings; evidence items of kind decoder in the run, reused on --resume) or
    "optim" (Mahendran–Vedaldi inversion, training-free; the default run's choice);
    decoder_reduction: "sum" (METHODS' squared norms) or "mean" (see DecoderSettings); judge: a
    model read as the independent judge (a counterpart's label or a checkpoint; None: the run's
    first robust counterpart, `--compare`; "self": the analysed model); resamples: bootstrap over
    images; show: adversarial examples drawn as strips; study: IG-1 folder to show (None: the study
    shipped in the package,
    results/ig1-fmnist.json, as an appendix of runs on the shipped Fashion-MNIST models only)."""

    n: int = 100
    layers: list[str] | None = None
    eps: float | None = None
    steps: int | None = None
    early_stop: bool | None = None
    attack_all: bool = True
    inverter: str = "decoder"
    inversion_steps: int = 500
    inversion_lr: float = 0.05
    tv: float = 1e-3
    tv_beta: float = 2.0
    decoder_n: int = 1000  # as good as 2,000 in batches of 128 at pool3 (R 0.56 vs 0.61), half the time
    # the decoder's settings default to DecoderSettings' own (one source for them)
    decoder_epochs: int = DecoderSettings.epochs
    decoder_batch_size: int = DecoderSettings.batch_size
    lambda_img: float = DecoderSettings.lambda_img
    lambda_feat: float = DecoderSettings.lambda_feat
    lambda_cls: float = DecoderSettings.lambda_cls
    lambda_adv: float = DecoderSettings.lambda_adv
    gan: bool = DecoderSettings.gan
    decoder_reduction: str = DecoderSettings.reduction
    judge: str | None = None
    resamples: int = 1000
    show: int = 4
    study: str | None = None

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", stage="diagnose")
        if self.inverter not in INVERTERS:
            raise UserError(f"diagnose: inverter must be one of {', '.join(INVERTERS)}, got {self.inverter!r}")
        ints = ("n", "inversion_steps", "decoder_n", "decoder_epochs", "decoder_batch_size")
        check_ints(self, dict.fromkeys(ints, 1), "diagnose")
        check_ints(self, {"resamples": 0, "show": 0}, "diagnose")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise UserError(f"diagnose: steps must be an integer >= 1 or null, got {self.steps!r}")
        self.inversion()
        self.decoder()

    def inversion(self) -> InversionSettings:
        """The optimisation inverter's settings."""
        return InversionSettings(steps=self.inversion_steps, lr=self.inversion_lr, tv=self.tv, tv_beta=self.tv_beta)

    def decoder(self, seed: int = 0) -> DecoderSettings:
        """The decoders' training settings, seeded with `seed`."""
        return DecoderSettings(epochs=self.decoder_epochs, batch_size=self.decoder_batch_size,
                               lambda_img=self.lambda_img, lambda_feat=self.lambda_feat,
                               lambda_cls=self.lambda_cls, lambda_adv=self.lambda_adv, gan=self.gan,
                               reduction=self.decoder_reduction, seed=seed)  # fmt: skip


# The default run: 32 images explained by 40-step optimisation inversions (the decoders, trained once
# per model, do not fit its 20 s share), 200 bootstrap resamples.
QUICK_DIAGNOSE: dict[str, Any] = {"n": 32, "inverter": "optim", "inversion_steps": 40, "resamples": 200, "show": 3}


def _check(prepared: Prepared, opts: DiagnoseOptions) -> None:
    """Before any work: the judge is a model of the run, a shipped checkpoint or a checkpoint file."""
    if opts.judge not in (None, "self"):
        check_model_name(str(opts.judge), prepared, "diagnose: judge")


def _judge(ctx: Context, option: str | None) -> tuple[nn.Module, str, list[str], bool]:
    """(judge model, its name, warnings, whether it is independent of the analysed model)."""
    wanted = option if option != "self" else None
    if wanted is None and option is None:
        wanted = ctx.robust_counterpart()
    if wanted is None:
        return ctx.model, f"{ctx.label} itself", [], False
    got = ctx.load_model(wanted)
    if isinstance(got, str):
        return ctx.model, f"{ctx.label} itself", [f"{got}; the analysed model judges itself"], False
    return got[0], wanted if wanted in ctx.compared else Path(wanted).stem, [], True


def describe_settings(settings: Mapping[str, Any]) -> str:
    """The reconstructed choices a study used, in words (for the report and the closing note)."""
    inv = settings.get("inverter") or {}
    eps = ", ".join(f"{e:g}" for e in settings.get("eps", []))
    if inv.get("method") == "optim":
        how = (f"optimisation inversion ({inv.get('steps')} Adam steps, lr {inv.get('lr')}, μ = {inv.get('tv')}, "
               "from the mean image)")  # fmt: skip
    else:
        how = (f"GAN-free decoders G_l trained on {inv.get('train_images')} clean training images ({inv.get('epochs')} "
               f"epochs, batches of {inv.get('batch_size')}, losses λ_img/λ_feat/λ_cls = {inv.get('lambda_img')}/"
               f"{inv.get('lambda_feat')}/{inv.get('lambda_cls')}, squared norms: {inv.get('reduction')})")  # fmt: skip
    return (f"L∞ PGD-{settings.get('steps')} at ε = {eps} (α = {settings.get('alpha')}, random start) on the first "
            f"{settings.get('n')} test images; the diagnosis on the first {settings.get('diag_n')} of them, "
            f"explanations by {how}, read by the judge {settings.get('judge')}; Spearman intervals from "
            f"{settings.get('resamples')} bootstrap resamples")  # fmt: skip


def load_study(option: str | None, ctx: Context | None = None) -> dict[str, Any] | None:
    """The IG-1 study in the folder `option` (its study.json), or (None) the one shipped in the
    package when the run analyses a shipped Fashion-MNIST model on its own data (`ctx`; any run
    without one)."""
    builtin = ctx is None or ctx.builtin_reference
    return study_or_shipped(option, builtin, "IG-1", "study.json", ("models", "differences"), SHIPPED_STUDY)


def _study_block(ctx: Context, study: dict[str, Any] | None, tables: list[dict[str, Any]],
                 figures: list[dict[str, str]], warnings: list[str]) -> dict[str, Any] | None:  # fmt: skip
    """Tables and the figure of the IG-1 study `study` (None: a warning); its summary, or None."""
    if study is None:
        return None
    nested = ("layers", "settings", "train_config")
    models = [{**{k: v for k, v in r.items() if k not in nested}, "stale": "; ".join(r.get("stale") or [])}
              for r in study["models"]]  # fmt: skip
    ctx.run.write_table("diagnose_ig1_models", models)
    ctx.run.write_table("diagnose_ig1_layers", [{"model": r["model"], "eps": r["eps"], **lr} for r in study["models"]
                                                for lr in r["layers"]])  # fmt: skip
    ctx.run.write_table("diagnose_ig1_differences", study["differences"])
    left_out = [{"model": e["models"], "comparison": e["comparison"], "training": e["training"],
                 "reason": e["reason"]} for e in study.get("excluded", [])]  # fmt: skip
    left_out += [{"model": s["model"], "comparison": "", "training": "", "reason": s["reason"]}
                 for s in study.get("skipped", [])]  # fmt: skip
    ctx.run.write_table("diagnose_ig1_left_out", left_out, ["model", "comparison", "training", "reason"])
    ctx.run.save_figure("diagnose_ig1", pooling_comparison(study))
    appendix = "Appendix, reference study on the shipped Fashion-MNIST smallcnn models — IG-1: "
    tables += [
        {"file": "tables/diagnose_ig1_differences.csv", "show": True,
         "title": appendix + "avg − max pooling per comparison (short-schedule seeds: mean and t interval over seed "
                  "pairs; shipped pair: Newcombe interval over test images)"},
        {"file": "tables/diagnose_ig1_models.csv", "show": True,
         "title": appendix + "every model, clean and PGD accuracy"},
        {"file": "tables/diagnose_ig1_left_out.csv", "show": True,
         "title": appendix + "models and pairs left out (not shipped yet, stale, or not like for like)"},
        {"file": "tables/diagnose_ig1_layers.csv", "title": appendix + "per layer of every model"},
    ]  # fmt: skip
    figures.append({"file": "figures/diagnose_ig1.png",
                    "caption": appendix + "PGD accuracy per pooling (bars and dots: short-schedule training seeds; "
                               "diamonds: shipped checkpoints); IL_l and V_l^soft per layer"})  # fmt: skip
    used = describe_settings(study["settings"])
    return {"settings": study["settings"], "differences": study["differences"], "used": used,
            "note": f"{study.get('note', '')} (IG-1 settings: {used}.)"}  # fmt: skip


@STAGES.register("diagnose", "layer vulnerability V_l, information loss IL_l, amplification A_l, explanation strips")
def diagnose_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Layer diagnosis on the stored adversarial examples of the evaluate stage's L∞ PGD."""
    opts: DiagnoseOptions = stage_options(DiagnoseOptions, options, "diagnose")
    ig1 = load_study(opts.study, ctx)  # a wrong folder fails before any work
    split = ctx.split
    n = min(opts.n, len(split))
    ev = _attack_settings(ctx, opts)
    attack = build_attack("pgd-linf", ev, ctx.config.seed)
    m = len(split) if opts.attack_all else n
    outcome = ctx.attack(attack, split.x[:m], split.y[:m], torch.arange(m))
    x, y = split.x[:n], split.y[:n]
    layers = list(opts.layers) if opts.layers else diagnosis_layers(ctx.model, x[:1].to(ctx.device))
    judge, judge_name, warnings, independent = _judge(ctx, opts.judge)
    x_mean = ctx.data.train.x.mean(0) if len(ctx.data.train) else x.mean(0)
    inverter = _inverter(ctx, opts, x_mean)
    diag = _diagnosis(ctx, opts, outcome, (x, y), layers, inverter, judge, x_mean)
    rows, corr_rows = _layer_outputs(ctx, diag, layers, (x, outcome.x_adv[:n]), judge_name, warnings)
    tables, figures = _entries()
    study = _study_block(ctx, ig1, tables, figures, warnings)
    summary, findings = _findings(diag, rows, len(layers))
    if not independent:
        warnings.append(ctx.no_counterpart("judge the explanations independently")
                        + " The analysed model reads its own explanations here.")  # fmt: skip
    inv = inverter.describe()
    summary["judge"] = judge_name
    summary["explanations by"] = (
        f"optimisation inversion, {opts.inversion_steps} steps" if opts.inverter == "optim"
        else f"decoders G_l, {opts.decoder_epochs} epochs, GAN {'on' if opts.gan else 'off'}"
    )  # fmt: skip
    spec = attack.describe()
    stop = ("each image kept at its first successful step" if spec.get("early_stop")
            else "every step run, the highest-loss successful iterate kept")  # fmt: skip
    text = (
        f"{n} images, the {spec.get('steps')}-step L∞ PGD at ε = {ev.eps:g}, {stop} "
        f"({summary['adversarial examples judged']} adversarial examples flip a correct prediction). Layers: "
        f"{', '.join(layers)}. Explanations by {_explanations_text(opts, inv)}; judge: {judge_name}. {findings}"
    )
    if study is not None:
        text += " " + study.get("note", "")
    return section("Layer diagnosis", text=text, summary=summary, tables=tables, figures=figures, warnings=warnings,
                   layers=rows, correlations=corr_rows, judge=judge_name, inverter=inv, attack=spec,
                   decoders=({"trained": inverter.trained, "loaded": inverter.loaded}
                             if isinstance(inverter, DecoderBank) else None),
                   study=study)  # fmt: skip


def _attack_settings(ctx: Context, opts: DiagnoseOptions) -> EvaluateOptions:
    """The evaluate stage's settings (its defaults when the run has none) with the diagnosis'
    own eps, steps and early stopping where set, so its L∞ PGD is evaluate's when they are not."""
    try:
        ev: EvaluateOptions = stage_settings("evaluate", ctx.config)
    except UserError:
        ev = EvaluateOptions()
    if opts.eps is not None:
        ev = replace(ev, eps=opts.eps)
    if opts.steps is not None:
        ev = replace(ev, pgd_steps=opts.steps)
    if opts.early_stop is not None:
        pgd_options = {**ev.attack_options.get("pgd-linf", {}), "early_stop": opts.early_stop}
        ev = replace(ev, attack_options={**ev.attack_options, "pgd-linf": pgd_options})
    return ev


def _inverter(ctx: Context, opts: DiagnoseOptions, x_mean: torch.Tensor) -> OptimisationInverter | DecoderBank:
    """The explanations' inverter: optimisation from the mean image x_mean (C, H, W), or the
    decoders G_l trained on `decoder_n` clean training images (kept in the run's store)."""
    if opts.inverter == "optim":
        return OptimisationInverter(ctx.model, x_mean, opts.inversion())
    x_train = ctx.data.train.subset(min(opts.decoder_n, len(ctx.data.train)), seed=ctx.config.seed).x
    return DecoderBank(ctx.model, ctx.store, x_train, opts.decoder(ctx.config.seed), ctx.store.model_hash(ctx.model))


def _diagnosis(
    ctx: Context,
    opts: DiagnoseOptions,
    outcome: AttackOutcome,
    images: tuple[torch.Tensor, torch.Tensor],
    layers: list[str],
    inverter: OptimisationInverter | DecoderBank,
    judge: nn.Module,
    x_mean: torch.Tensor,
) -> Diagnosis:
    """The diagnosis of the clean images and labels `images` ((N, C, H, W), (N,)) against the first
    N adversarial examples of `outcome`, memoised in the run's store (a failure: the analysis is
    unavailable)."""
    x, y = images
    n = len(y)
    try:
        return ctx.store.memo(
            "diagnosis",
            {"adv": outcome.key, "n": n, "layers": layers, "inverter": inverter.describe(),
             "judge": ctx.store.model_hash(judge), "resamples": opts.resamples, "show": opts.show},
            lambda: diagnose(ctx.model, x, y, outcome.x_adv[:n], outcome.pred[:n], layers, inverter, judge, x_mean,
                             resamples=opts.resamples, seed=ctx.config.seed, show=opts.show),
        )  # fmt: skip
    except UserError as e:
        raise AnalysisUnavailable(str(e)) from e


def _layer_outputs(
    ctx: Context,
    diag: Diagnosis,
    layers: list[str],
    images: tuple[torch.Tensor, torch.Tensor],
    judge_name: str,
    warnings: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The per-layer, per-example and correlation tables and the layer and strip figures, with
    σ_Ratio between the clean and adversarial `images` (both (N, C, H, W)); (layer rows, correlation rows)."""
    sigma_ratio: dict[str, float] = {}
    try:
        sigma_ratio = layer_sigma_ratio(ctx.model, *images, layers)
    except UserError as e:
        warnings.append(f"σ_Ratio not computed for these layers: {e}")
    rows = diag.layer_rows(sigma_ratio)
    run, vul, shown = ctx.run, diag.vulnerability, diag.shown
    run.write_table("diagnose_layers", rows)
    run.write_table("diagnose_per_example", diag.per_example_rows())
    corr_rows = diag.correlation_rows()
    run.write_table("diagnose_correlation", corr_rows)
    run.save_figure("diagnose_layers", layer_bars(rows, f"{ctx.label}, judge {judge_name}"))
    run.save_figure("diagnose_strips", strips(diag.clean_strips, diag.adv_strips, layers, diag.clean_classes,
                                              vul.classes[shown], list(ctx.data.classes), vul.y[shown],
                                              vul.y_adv[shown]))  # fmt: skip
    return rows, corr_rows


def _entries() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The report entries of the diagnosis' own tables and figures."""
    tables: list[dict[str, Any]] = [
        {"file": "tables/diagnose_layers.csv", "show": True,
         "title": "Per layer: d_l, A_l, R_l, IL_l, V_l, V_l^soft, mean σ_Ratio of the top-10% neurons"},
        {"file": "tables/diagnose_correlation.csv", "show": True,
         "title": "Spearman(IL_l, V_l) across layers, percentile bootstrap over images"},
        {"file": "tables/diagnose_per_example.csv",
         "title": "Per adversarial example: the judge's class at every layer"},
    ]  # fmt: skip
    figures: list[dict[str, str]] = [
        {"file": "figures/diagnose_layers.png", "caption": "V_l, V_l^soft, IL_l and A_l per layer (red: pooling)"},
        {"file": "figures/diagnose_strips.png",
         "caption": "Explanations E_0 … E_L of the clean image (upper row) and of its adversarial version (lower "
                    "row); titles: the judge's class, red = the adversarial class"},
    ]  # fmt: skip
    return tables, figures


def _findings(diag: Diagnosis, rows: list[dict[str, Any]], n_layers: int) -> tuple[dict[str, Any], str]:
    """(summary, text) of the diagnosis: examples judged, the largest IL_l, the most frequent flip
    layer and the Spearman correlations with their intervals."""
    judged = int(diag.vulnerability.y.numel())
    top_il = max(rows[1:], key=lambda r: r["IL"])["layer"]
    c, cs = diag.correlations[0], diag.correlations[1]
    summary: dict[str, Any] = {"adversarial examples judged": judged, "largest IL_l": top_il}
    if judged:
        no_flip = 1.0 - sum(r["V"] for r in rows)
        top_v = max(rows, key=lambda r: r["V"])["layer"]
        summary.update({"most frequent flip layer": top_v, "no flip (share)": f"{no_flip:.0%}"})
        flips_text = (f"Explanations flip most often at {top_v}; for {no_flip:.0%} the judge does not read even the "
                      "last layer's explanation as the adversarial class. ")  # fmt: skip
    else:
        flips_text = ("No adversarial example flips a correct prediction on these images at this ε, so there is no "
                      "flip layer to find. ")  # fmt: skip
    if math.isfinite(c.rho):
        summary["Spearman(IL, V)"] = f"{c.rho:.2f} [{c.low:.2f}, {c.high:.2f}]"
    if math.isfinite(cs.rho):
        summary["Spearman(IL, V_soft)"] = f"{cs.rho:.2f} [{cs.low:.2f}, {cs.high:.2f}]"
    corr_text = "".join(
        f" Spearman(IL_l, {what}) = {k.rho:.2f} [{k.low:.2f}, {k.high:.2f}] across {n_layers} layers."
        for what, k in (("V_l", c), ("V_l^soft", cs)) if math.isfinite(k.rho)
    ) or " The Spearman correlations are undefined here (a constant V_l or IL_l across layers)."
    return summary, (
        f"{flips_text}The largest information loss is at {top_il}.{corr_text} (Bootstrap over images; an interval "
        "that contains 0 does not support 'layers that lose more information are more vulnerable'.)"
    )


def _explanations_text(opts: DiagnoseOptions, inv: Mapping[str, Any]) -> str:
    """How the explanations were made, in words (the inverter's settings; `inv` its description)."""
    if opts.inverter == "optim":
        return (f"optimisation inversion ({opts.inversion_steps} Adam steps, lr {opts.inversion_lr:g}, "
                f"μ = {opts.tv:g}, TV^{opts.tv_beta:g}, from the mean image)")  # fmt: skip
    return (f"decoders G_l trained on {inv['train_images']} clean images ({opts.decoder_epochs} epochs in batches of "
            f"{opts.decoder_batch_size}, λ_img {opts.lambda_img:g}, λ_feat {opts.lambda_feat:g}, λ_cls "
            f"{opts.lambda_cls:g} on squared norms ({opts.decoder_reduction}), "
            f"GAN {'on, λ_adv ' + format(opts.lambda_adv, 'g') if opts.gan else 'off'})")  # fmt: skip


diagnose_stage.options_class = DiagnoseOptions  # type: ignore[attr-defined]
diagnose_stage.reduced_options = QUICK_DIAGNOSE  # type: ignore[attr-defined]
diagnose_stage.check = _check  # type: ignore[attr-defined]
