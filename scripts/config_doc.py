"""Generate docs/config.md, the reference of every YAML key, from the option dataclasses.

    .venv/bin/python scripts/config_doc.py            # rewrite docs/config.md
    .venv/bin/python scripts/config_doc.py --check    # exit 1 when docs/config.md is stale

Sources, so that the reference cannot drift from the code: the run config (`RunConfig`), the
`options_class` of every stage registered in `pipeline.STAGES` with its reduced-budget profile
(`reduced_options`), the training config (`TrainConfig`) and the constructor of every training
objective. A key's meaning is taken from the comment on its line, the comment lines just above it,
and the `name: meaning` clauses of its class docstring; its type is the annotation, its default
the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config.md"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?$")

# Meanings of keys whose dataclass gives none (no field comment, no docstring clause), by
# "Class.field" or by field name for every class. The code's own comment wins when one is added;
# an entry naming a field that no longer exists fails the generation (so this cannot go stale).
GLOSSARY: dict[str, str] = {
    "batch_size": "images per forward (or training) batch; lower it when memory is short",
    "seed": "seed of every random draw (sampling, attack starts, shuffles)",
    "device": "auto (CUDA when present), cpu, cuda, cuda:N or mps",
    "dataset": "dataset name (`robustdissect list datasets`)",
    "data_dir": "folder or file holding the dataset (null: the built-in location)",
    "model_args": "KEY: VALUE arguments of the model factory (`--model-arg`)",
    "RunConfig.split": "the split analysed: test, val or train",
    "RunConfig.stages": "the stages to run, each with its option block (below); a list of names runs them "
    "with defaults",
    "EvaluateOptions.pgd_steps": "PGD iterations k of the table's PGD attacks",
    "EvaluateOptions.cw_steps": "C&W-L2 optimisation steps per binary-search step",
    "EvaluateOptions.cw_search_steps": "C&W-L2 binary-search steps over the constant c",
    "EvaluateOptions.apgd_steps": "APGD-CE / APGD-DLR iterations",
    "EvaluateOptions.spsa_iterations": "SPSA iterations (black-box, on the `blackbox_n` subset)",
    "EvaluateOptions.spsa_samples": "SPSA perturbation samples per iteration",
    "EvaluateOptions.nattack_iterations": "NAttack iterations (black-box, on the `blackbox_n` subset)",
    "EvaluateOptions.nattack_population": "NAttack population per iteration",
    "EvaluateOptions.corruptions": "common corruptions evaluated (`robustdissect list attacks` names them); "
    "[] for none",
    "EvaluateOptions.eps_sweep_relative": "the accuracy-against-ε curve at these multiples of `eps`",
    "EvaluateOptions.steps_sweep": "the accuracy-against-steps curve at these PGD step counts",
    "EvaluateOptions.curve_n": "images of the ε and steps curves and of the gradient-masking checks",
    "EvaluateOptions.grid_attack": "the attack whose examples the image grids show",
    "EvaluateOptions.square_norms": "threat models whose worst case the Square attack completes (linf, l2)",
    "SensitivityOptions.experiments": "experiments run: profiles, amplification, eps_sweep, importance, overlap, "
    "suppression, roi, compare",
    "SensitivityOptions.steps": "PGD iterations k of the attack that makes the pairs (x, x′)",
    "SensitivityOptions.reduction": "eq1: σ as Eq. 1 (mean over images of the ℓ1 distance of the channel's "
    "clean and adversarial maps, per element); mindarmour: the distance of the maps' spatial means",
    "SensitivityOptions.eps_sweep": "ε values of the σ_Ratio-against-ε table (Table II layout)",
    "SensitivityOptions.noise_severities": "severities of the random-noise rows beside the attacks in the ε sweep",
    "SensitivityOptions.noise_scale": "noise scale set: auto (fmnist for 1-channel 28×28 images, else cifar), "
    "fmnist or cifar",
    "SensitivityOptions.importance_ks": "sizes k of the top-k sensitive and important neuron sets compared (E1)",
    "SensitivityOptions.sub_cost": "substitution cost of the Levenshtein similarity between the two top-k lists",
    "SensitivityOptions.suppression_betas": "scale factors β applied to the sensitive neurons in the "
    "suppression experiment",
    "SensitivityOptions.suppression_n": "images of the suppression experiment",
    "SensitivityOptions.suppression_eps": "L-inf budget of the suppression experiment's attacks",
    "SensitivityOptions.suppression_eps_l2": "L2 budget of the suppression experiment's attacks",
    "SensitivityOptions.suppression_draws": "random neuron sets drawn as the suppression control",
    "SensitivityOptions.roi_layer": "layer of the regions-of-interest maps (absent: the second conv layer)",
    "FeatureOptions.depth_bins": "depth bins the analysed layers are split into (units chosen per bin)",
    "FeatureOptions.null_quantile": "quantile of the label-shuffle null that sets τ_ρ",
    "FeatureOptions.tau_rho_fallback": "τ_ρ used when the null cannot be computed (permutations 0)",
    "FeatureOptions.strict_r": "retention r a unit needs in the strict robust quadrant",
    "ConceptsOptions.iou_threshold": "IoU a unit needs (beyond the null) to count as a concept detector",
    "ConceptsOptions.permutations": "shuffles of the masks across images for the IoU null",
    "ConceptsOptions.null_percentile": "percentile of the shuffle null a detector's IoU must exceed",
    "ConceptsOptions.bins": "histogram bins of the streaming per-unit threshold",
    "ConceptsOptions.broden_max_images": "read at most this many Broden images (null: all)",
    "ConceptsOptions.steps": "PGD iterations of the adversarial rows",
    "ConceptsOptions.top_images": "top images shown per unit",
    "ConceptsOptions.gradcam_images": "images shown with Grad-CAM and their top units' concepts",
    "CompareStageOptions.steps_sweep": "PGD step counts of the accuracy-against-steps curve (E11)",
    "CompareStageOptions.eps_sweep": "ε values of the accuracy-against-ε curve (E11)",
    "DiagnoseOptions.inversion_steps": "Adam steps of the optimisation inversion (`inverter: optim`)",
    "DiagnoseOptions.inversion_lr": "Adam learning rate of the optimisation inversion",
    "DiagnoseOptions.tv": "weight μ of the total-variation prior of the optimisation inversion",
    "DiagnoseOptions.tv_beta": "exponent β of the total-variation prior",
    "DiagnoseOptions.decoder_batch_size": "batch size of the decoder training",
    "DiagnoseOptions.lambda_img": "weight of the decoder's pixel reconstruction loss",
    "DiagnoseOptions.lambda_feat": "weight of the decoder's feature (latent) consistency loss",
    "DiagnoseOptions.lambda_cls": "weight of the decoder's classification consistency loss",
    "DiagnoseOptions.lambda_adv": "weight of the GAN term (only with `gan`)",
    "DiagnoseOptions.gan": "add a GAN discriminator term to the decoder training (GPU runs)",
    "MetricOptions.target_confidence": "mean max-softmax the temperature T is set to reach",
    "MetricOptions.calibration_n": "validation images the temperature is calibrated on",
    "MetricOptions.logit_scale": "scale s of `calibration: logit_norm`",
    "MetricOptions.eval_steps": "steps of the timed PGD evaluation (`evaluation`)",
    "MetricOptions.eval_restarts": "restarts of the timed PGD evaluation",
    "LandscapeOptions.attack_steps": "PGD steps that make the adversarial direction d₁",
    "TrainConfig.epochs": "training epochs",
    "TrainConfig.batch_size": "training batch size",
    "TrainConfig.lr": "learning rate (SGD with momentum)",
    "TrainConfig.momentum": "SGD momentum",
    "TrainConfig.weight_decay": "L2 weight decay",
    "TrainConfig.objective": "training objective (`robustdissect list objectives`; table below)",
    "TrainConfig.objective_args": "the objective's arguments (table below), e.g. {eps: 0.1, steps: 7}",
}


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comments (the lines just above it, then the one on its line)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not text.startswith(("fmt:", "type:", "noqa")):
                comments[tok.start[0]] = text
    lines = source.splitlines()
    out: dict[str, str] = {}
    field_line = re.compile(r"\s{4}([A-Za-z_][A-Za-z0-9_]*)\s*:")
    for i, line in enumerate(lines, start=1):
        m = field_line.match(line)
        if not m or m.group(1) not in names or line.startswith(" " * 5):
            continue
        above: list[str] = []
        j = i - 1
        while j >= 1 and lines[j - 1].strip().startswith("#") and j in comments:
            above.insert(0, comments[j])
            j -= 1
        parts = [" ".join(above)] if above else []
        if i in comments:
            parts.append(comments[i])
        out.setdefault(m.group(1), "; ".join(parts))
    return out


def _split_top(text: str, seps: tuple[str, ...]) -> list[str]:
    """Split `text` at any of `seps` that sits outside parentheses and backticks."""
    return [part for part, _sep in _split_top_sep(text, seps)]


def _split_top_sep(text: str, seps: tuple[str, ...]) -> list[tuple[str, str]]:
    """(part, the separator that ended it) for each part of `text` split as `_split_top` does."""
    parts: list[tuple[str, str]] = []
    depth, quoted, start, i = 0, False, 0, 0
    while i < len(text):
        c = text[i]
        if c == "`":
            quoted = not quoted
        elif not quoted and c in "([{":
            depth += 1
        elif not quoted and c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and not quoted:
            for sep in seps:
                if text.startswith(sep, i):
                    parts.append((text[start:i], sep))
                    start = i + len(sep)
                    i = start - 1
                    break
        i += 1
    parts.append((text[start:], ""))
    return parts


def docstring_clauses(cls: type) -> dict[str, str]:
    """Field name -> the `name: meaning` clauses of the class docstring naming it (`a / b: ...`,
    `a, b (note): ...` and `prefix_*: ...` included); unmatched clauses continue the previous one."""
    doc = " ".join((inspect.getdoc(cls) or "").split())
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    out: dict[str, str] = {}
    last: list[str] = []
    previous_sep = ""
    for clause, sep in _split_top_sep(doc, ("; ", ". ")):
        head_text = _split_top(clause, (": ",))
        targets: list[tuple[str, str]] = []
        if len(head_text) > 1:
            for item in _split_top(head_text[0], (", ", " / ", "/")):
                item = item.strip()
                note = ""
                if "(" in item and item.endswith(")"):
                    item, note = item[: item.index("(")].strip(), item[item.index("(") + 1 : -1]
                item = item.strip("`")
                if not _IDENT.match(item):
                    targets = []
                    break
                matched = [n for n in names if n == item or (item.endswith("*") and n.startswith(item[:-1]))]
                if not matched:
                    targets = []
                    break
                targets += [(n, note) for n in matched]
        if targets:
            text = ": ".join(head_text[1:]).strip().rstrip(".")
            last = []
            for name, note in targets:
                text_n = f"{text} ({note})" if note else text
                out[name] = f"{out[name]}; {text_n}" if name in out else text_n
                last.append(name)
        else:
            for name in last:  # a clause without its own key continues the previous one
                out[name] += previous_sep.rstrip() + " " + clause.strip().rstrip(".")
        previous_sep = sep
    return out


# Meanings of the training objectives' arguments ("objective.arg" or, for all objectives, "arg").
OBJECTIVE_ARGS: dict[str, str] = {
    "eps": "L-inf budget of the training attack (pixel units)",
    "steps": "PGD steps of the training attack",
    "alpha": "step size (null: the `step_rule`)",
    "step_rule": "paper: α = ε/√k; 2.5eps/k: Madry et al.'s",
    "random_start": "start the training attack from a uniform random point in the ball",
    "seed": "seed of the training attack's random starts",
    "loss": "the loss the training attack maximises (ce; TRADES fixes kl)",
    "start": "distribution of the random start (uniform; TRADES fixes gaussian)",
    "mix": "half: ½ CE(clean) + ½ CE(adversarial); adv: CE on adversarial examples only",
    "label_smoothing": "label smoothing of the cross-entropy",
    "alp.lam": "weight λ of the logit-pairing term",
    "trades.beta": "weight β of the KL term",
    "fast.alpha": "FGSM step (null: 1.25 ε)",
    "sns.lam": "weight λ of the stabilising term L_sns",
    "sns.layers": "layers S (names, k or \"topk\"; null: the last three conv layers, all for `brittle`)",
    "sns.variant": "which neurons Ω: sen (most sensitive), dyn (reselected every epoch), rand, all, brittle "
    "(the feature dissection's brittle units: the SNS bridge)",
    "sns.hook": "σ at the conv (BN output) or relu hook point",
    "sns.fraction": "share of each layer's neurons in Ω",
    "sns.reference": "model whose σ chooses Ω (a checkpoint, or \"initial\": the model as training starts)",
    "sns.select_n": "training images σ is measured on to choose Ω (null: all)",
    "sns.dyn_n": "images of the per-epoch reselection (`dyn`)",
    "sns.freeze": "freeze the layers before S",
    "sns.base_loss": "adv: the PAT loss of `mix`; clean: CE on clean images only",
    "sns.units_n": "images of the feature dissection that finds the brittle units (`brittle`)",
    "sns.units_reference_n": "reference images of that dissection",
    "sns.units_options": "FeatureOptions overrides of that dissection",
}


def objective_params(factory: Any) -> list[inspect.Parameter]:
    """The keyword arguments an objective takes: its own, then those its `**kwargs` passes on to its
    base class (less any the class fixes in its `super().__init__` call)."""
    own = [p for p in inspect.signature(factory).parameters.values() if p.name != "self"]
    params = [p for p in own if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not any(p.kind == p.VAR_KEYWORD for p in own):
        return params
    seen = {p.name for p in params}
    fixed: set[str] = set()
    for cls in factory.__mro__[1:]:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        sub = factory.__mro__[factory.__mro__.index(cls) - 1]
        sub_src = inspect.getsource(sub.__dict__.get("__init__", init))
        call = sub_src[sub_src.find("super().__init__(") :]
        fixed |= {m for m in re.findall(r"(\w+)=(?!\1\b)", call) if m not in seen}
        for p in inspect.signature(init).parameters.values():
            if p.name not in seen | fixed | {"self"} and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.append(p)
                seen.add(p.name)
    return params


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def render_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(f: dataclasses.Field[Any]) -> str:
    t = f.type
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def dataclass_table(cls: type, reduced: dict[str, Any] | None = None) -> list[str]:
    """One markdown table row per field: key, type, default, [reduced profile,] meaning."""
    comments, clauses = field_comments(cls), docstring_clauses(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in GLOSSARY:
        owner, _, name = key.rpartition(".")
        if owner == cls.__name__ and name not in names:
            raise SystemExit(f"config_doc.py: GLOSSARY names {key}, which {cls.__name__} no longer has")
    head = "| key | type | default |" + (" default run (`quick`) |" if reduced is not None else "") + " meaning |"
    rows = [head, "|---|---|---|" + ("---|" if reduced is not None else "") + "---|"]
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        meaning = "; ".join(p for p in (clauses.get(f.name, ""), comments.get(f.name, "")) if p)
        meaning = meaning or GLOSSARY.get(f"{cls.__name__}.{f.name}") or GLOSSARY.get(f.name) or "—"
        cells = [f"`{f.name}`", f"`{_type(f)}`", f"`{render_value(_default(f))}`"]
        if reduced is not None:
            cells.append(f"`{render_value(reduced[f.name])}`" if f.name in reduced else "")
        cells.append(meaning)
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def generate() -> str:
    """The text of docs/config.md."""
    from robustdissect.config import DEFAULT_STAGES, RunConfig
    from robustdissect.pipeline import STAGES
    from robustdissect.training.loop import TrainConfig
    from robustdissect.training.objectives import OBJECTIVES
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by scripts/config_doc.py from the option dataclasses; do not edit by hand:",
        "     run `.venv/bin/python scripts/config_doc.py` after changing an option -->",
        "",
        "Every key a run YAML (`robustdissect run --config FILE`, and every analysing command's",
        "`--config`) and a training YAML (`robustdissect train --config FILE`) accepts, with its type,",
        "default and meaning. Command-line options override the YAML; unknown keys are refused with the",
        "closest names. A stage's options go in its block under `stages:`; a stage listed without",
        "options runs with its defaults. Under `quick: true` (the default of `run` and of every",
        "analysing command; `--full` sets it to false) a stage starts from its reduced profile, shown",
        "in the column *default run*, and keys you set win over it. Budgets given as `eps` accept a",
        "number or a fraction such as `8/255`. Examples: [examples/](../examples/).",
        "",
        "```yaml",
        "model: fmnist-smallcnn-vanilla",
        "compare: [pat=fmnist-smallcnn-pat]",
        "n: 200",
        "stages:",
        "  evaluate: {attacks: [pgd-linf, fgsm], eps: 8/255}",
        "  sensitivity: {}",
        "```",
        "",
        "## Run config (top level)",
        "",
        _summary(RunConfig),
        "",
        *dataclass_table(RunConfig),
        "",
        "## Stages (`stages.<name>`)",
        "",
        "Stages of the default run, in order: " + ", ".join(f"`{s}`" for s in DEFAULT_STAGES) + ".",
    ]
    # only the package's own stages (a test suite may register stages of its own beside them)
    own = [e for e in STAGES if getattr(e.factory, "__module__", "").startswith("robustdissect.")]
    order = list(DEFAULT_STAGES) + [e.name for e in own if e.name not in DEFAULT_STAGES]
    entries = {e.name: e for e in own}
    for name in order:
        entry = entries[name]
        fn = entry.factory
        cls = getattr(fn, "options_class", None)
        lines += ["", f"### `{name}`", "", f"{entry.summary}."]
        if cls is None:
            lines += ["", "No options."]
            continue
        summary = _summary(cls)
        if summary and ":" not in summary.split(".")[0]:
            lines += ["", summary]
        reduced = getattr(fn, "reduced_options", None)
        lines += ["", *dataclass_table(cls, dict(reduced) if reduced else None)]
    lines += [
        "",
        "## Training config (`robustdissect train --config FILE`)",
        "",
        "The shipped presets are in `src/robustdissect/configs/train/` (`robustdissect list presets`).",
        "",
        *dataclass_table(TrainConfig),
        "",
        "### Objectives (`objective`, with `objective_args`)",
        "",
        "| objective | argument | default | what it is |",
        "|---|---|---|---|",
    ]
    for entry in OBJECTIVES:
        lines.append(f"| `{entry.name}` | | | {_cell(entry.summary)} |")
        for p in objective_params(entry.factory):
            default = f"`{render_value(p.default)}`" if p.default is not p.empty else "(required)"
            what = OBJECTIVE_ARGS.get(f"{entry.name}.{p.name}") or OBJECTIVE_ARGS.get(p.name) or "—"
            lines.append(f"| | `{p.name}` | {_cell(default)} | {_cell(what)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/config.md differs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: run .venv/bin/python scripts/config_doc.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
