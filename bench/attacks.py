"""Attack speed and strength: PGD and APGD per step against a plain loop, PGD-k overhead, and
robustdissect side by side with peer libraries.

(s) Time per step of PGD (keep-best, no early stop) and APGD-CE against an independent plain PGD
    loop with the same number of steps (random start, sign step, clamp projections, one forward for
    the predictions) and against torchattacks' PGD / APGD at equal steps: a LeNet-5-sized model and
    the shipped fmnist-smallcnn-vanilla, the same images, repetitions interleaved; target ours /
    plain <= 1.10. Then where the remaining time goes: model passes of each (counted) and the
    operators whose time exceeds the plain loop's (torch.profiler, ms per step).
(a) PGD-k wall time / (k x one forward+backward to the input), same model and batch; target <= 1.10.
(b) FGSM, PGD-Linf, PGD-L2 and C&W against torchattacks and foolbox (optional `bench` extra), same
    model, batch, eps, steps, step size and start: time ratio ours/theirs (target <= 1.0) and robust
    accuracy (target: ours <= theirs + 0.5 point). Every library must deliver predictions on x_adv:
    ours and foolbox return them, so torchattacks is timed with the one forward that gets them.

Usage: python bench/attacks.py [--device cuda] [--quick] [--threads N] [--only s|a|b]
Peers: pip install -c constraints.txt -e '.[bench]' && pip install -c constraints.txt --no-deps torchattacks
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustdissect.attacks as rda
from robustdissect.models import build_model, load_checkpoint, shipped_checkpoints

_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = _clock()
        fn()
        _sync(device)
        times.append(_clock() - t0)
    return statistics.median(times)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _fwd_bwd(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One forward and one backward to the input: what one attack step costs at best."""
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y, reduction="none")
    torch.autograd.grad(loss.sum(), xr)


def _smallcnn(device: torch.device) -> tuple[nn.Module, str]:
    if "fmnist-smallcnn-vanilla" in shipped_checkpoints():
        model, _ = load_checkpoint("fmnist-smallcnn-vanilla")
        return _frozen(model.to(device)), "fmnist-smallcnn-vanilla"
    torch.manual_seed(0)
    return _frozen(build_model("smallcnn").to(device)), "smallcnn (random init)"


def _data(shape: tuple[int, int, int], n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if shape == (1, 28, 28):
        try:
            from robustdissect.data import load_dataset

            split = load_dataset("fashion-mnist").test.subset(n, seed=0)
            return split.x.to(device), split.y.to(device)
        except Exception:  # the data is optional for a benchmark; fall back to noise
            pass
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *shape, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)

def lenet5(train_n: int = 6000, epochs: int = 2) -> tuple[nn.Module, str]:
    """LeNet-5-sized: conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, 10 (28x28 input), trained
    briefly on Fashion-MNIST (Adam, batch 128) so that most test images are classified correctly,
    as for a real model; random init when the data is not there."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip
    try:
        from robustdissect.data import load_dataset

        train = load_dataset("fashion-mnist").train.subset(train_n, seed=0)
    except Exception:  # the data is optional for a benchmark
        return net, "LeNet-5-sized (random init)"
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(train.y))
        for i in range(0, len(perm), 128):
            b = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(net(train.x[b]), train.y[b]).backward()
            opt.step()
    return net, f"LeNet-5-sized (trained {epochs} epochs on {train_n} images)"


def plain_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, g: torch.Generator
) -> Tensor:
    """The reference: the textbook L-inf PGD loop, then one forward for the predictions (N,)."""
    x_adv = (x + (2 * torch.rand(x.shape, generator=g, device=x.device) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        return model(x_adv).argmax(1)


class _Counter(nn.Module):
    """Counts forward passes (with / without autograd) and images of a wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.grad_calls = self.nograd_calls = self.images = 0

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_calls += 1
        else:
            self.nograd_calls += 1
        self.images += x.shape[0]
        out: Tensor = self.inner(x)
        return out


def _op_times(fn: Callable[[], Any]) -> dict[str, float]:
    """Self CPU time (s) per operator name of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def per_step(device: torch.device, quick: bool, n: int, eps: float) -> None:
    have_ta = importlib.util.find_spec("torchattacks") is not None
    k_pgd, k_apgd = (20, 50) if quick else (40, 100)
    reps = 3 if quick else 5
    print(f"\n(s) time per step against a plain PGD loop (target <= 1.10) and torchattacks, {n} images, "
          f"L-inf eps {eps}, PGD-{k_pgd} (alpha 2.5eps/k), APGD-CE {k_apgd} steps, {reps} interleaved "
          "repetitions")  # fmt: skip
    if not have_ta:
        print("    torchattacks is not installed (pip install -c constraints.txt --no-deps torchattacks): "
              "no peer column")  # fmt: skip
    models: list[tuple[str, Callable[[], tuple[nn.Module, str]]]] = [
        ("lenet5", lambda: (lambda m, lab: (_frozen(m.to(device)), lab))(*lenet5())),
        ("smallcnn", lambda: _smallcnn(device)),
    ]
    for _key, make in models:
        model, label = make()
        x, y = _data((1, 28, 28), n, device)
        _per_step_model(model, label, x, y, device, eps, k_pgd, k_apgd, reps, have_ta)


def _per_step_model(
    model: nn.Module, label: str, x: Tensor, y: Tensor, device: torch.device, eps: float, k_pgd: int,
    k_apgd: int, reps: int, have_ta: bool,
) -> None:  # fmt: skip
    """Section (s) on one model: interleaved timings, ratios, model passes and operator excess."""
    n = x.shape[0]
    alpha = 2.5 * eps / k_pgd
    g = torch.Generator(device=device)
    runners: dict[str, tuple[int, Callable[[], Any]]] = {
        "plain PGD": (k_pgd, lambda: plain_pgd(model, x, y, eps, alpha, k_pgd, g)),
        "ours PGD": (k_pgd, lambda: rda.PGD(eps, steps=k_pgd, alpha=alpha)(model, x, y)),
        "plain PGD@apgd": (k_apgd, lambda: plain_pgd(model, x, y, eps, 2.5 * eps / k_apgd, k_apgd, g)),
        "ours APGD-CE": (k_apgd, lambda: rda.APGDCE(eps, steps=k_apgd)(model, x, y)),
    }
    if have_ta:
        import torchattacks as ta

        ta_pgd = ta.PGD(model, eps=eps, alpha=alpha, steps=k_pgd, random_start=True)
        ta_apgd = ta.APGD(model, norm="Linf", eps=eps, steps=k_apgd, n_restarts=1, loss="ce")
        runners["torchattacks PGD"] = (k_pgd, lambda: _acc(model, ta_pgd(x, y), y))
        runners["torchattacks APGD"] = (k_apgd, lambda: _acc(model, ta_apgd(x, y), y))
    rda.PGD(eps, steps=2)(model, x[:8], y[:8])
    plain_pgd(model, x[:8], y[:8], eps, alpha, 2, g)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):  # interleaved: load changes on a shared machine hit every runner alike
        for name, (_steps, fn) in runners.items():
            times[name].append(_median_time(fn, device, 1))
    per = {name: statistics.median(t) / runners[name][0] for name, t in times.items()}
    print(f"  {label}: batch {n}, clean accuracy {100 * _acc(model, x, y):.1f}%")
    print(f"    {'runner':<20} {'ms/step':>8} {'vs plain':>9} {'vs torchattacks':>16}")
    for name in runners:
        ref = per["plain PGD@apgd" if "APGD" in name or name == "plain PGD@apgd" else "plain PGD"]
        peer = per.get("torchattacks APGD" if "APGD" in name else "torchattacks PGD")
        vs_peer = f"{per[name] / peer:16.3f}" if peer and name.startswith("ours") else " " * 16
        print(f"    {name:<20} {1000 * per[name]:8.2f} {per[name] / ref:9.3f} {vs_peer}")
    # where the remaining time goes: model passes, then the operators beyond the plain loop's
    counted = _Counter(model)
    rda.PGD(eps, steps=k_pgd, alpha=alpha)(counted, x, y)
    pgd_passes = (counted.grad_calls, counted.nograd_calls, counted.images / n)
    counted = _Counter(model)
    rda.APGDCE(eps, steps=k_apgd)(counted, x, y)
    apgd_passes = (counted.grad_calls, counted.nograd_calls, counted.images / n)
    print(f"    model passes: plain PGD-{k_pgd}: {k_pgd} with gradient + 1 without; ours PGD-{k_pgd}: "
          f"{pgd_passes[0]} + {pgd_passes[1]} ({pgd_passes[2]:.2f} x the batch in images); ours APGD-{k_apgd}: "
          f"{apgd_passes[0]} + {apgd_passes[1]} ({apgd_passes[2]:.2f} x) against plain {k_apgd} + 1")  # fmt: skip
    # operator time split into the model's own forward+backward operators and everything else
    # (the attack's bookkeeping: steps, projections, best-iterate tracking, copies), per step
    generic = {"aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::copy_",
               "aten::fill_", "aten::zero_", "aten::empty", "aten::zeros", "aten::clone", "aten::where",
               "aten::clamp", "aten::sign", "aten::index", "aten::index_put_", "aten::to", "aten::_to_copy",
               "aten::empty_like", "aten::ones_like", "aten::zeros_like", "aten::detach", "aten::sum"}  # fmt: skip
    model_ops = set(_op_times(lambda: _fwd_bwd(model, x, y))) - generic
    for name, steps, fn, ref_fn in (
        ("PGD", k_pgd, runners["ours PGD"][1], runners["plain PGD"][1]),
        ("APGD-CE", k_apgd, runners["ours APGD-CE"][1], runners["plain PGD@apgd"][1]),
    ):
        parts = []
        for who, f in (("ours", fn), ("plain", ref_fn)):
            ops = _op_times(f)
            model_t = sum(t for op, t in ops.items() if op in model_ops)
            other = {op: t for op, t in ops.items() if op not in model_ops}
            top = sorted(other.items(), key=lambda kv: -kv[1])[:4]
            shown = ", ".join(f"{op.replace('aten::', '')} {1000 * t / steps:.2f}" for op, t in top)
            parts.append(f"{who}: model {1000 * model_t / steps:.1f}, other {1000 * sum(other.values()) / steps:.2f} "
                         f"({shown})")  # fmt: skip
        print(f"    {name} ms/step (profiled) - " + "; ".join(parts))


def overhead(device: torch.device, quick: bool) -> None:
    print("\n(a) PGD-k time / (k x one forward+backward to the input)   target <= 1.10")
    print(f"{'model':<28} {'batch':>5} {'k':>3} {'fwd+bwd ms':>11} {'PGD-k ms':>10} {'ratio':>7}")
    vgg_batch = 512 if device.type == "cuda" else 32
    setups: list[tuple[str, Callable[[], tuple[nn.Module, str]], tuple[int, int, int], int]] = [
        ("smallcnn", lambda: _smallcnn(device), (1, 28, 28), 256 if device.type == "cpu" else 1024),
        ("vgg16", lambda: (_frozen(build_model("vgg16").to(device)), "vgg16 (random init)"), (3, 32, 32), vgg_batch),
    ]
    if device.type == "cuda":
        setups.append(
            (
                "resnet18",
                lambda: (_frozen(build_model("resnet18").to(device)), "resnet18 (random init)"),
                (3, 32, 32),
                512,
            )
        )
    for _name, make, shape, batch in setups:
        torch.manual_seed(0)
        model, label = make()
        x, y = _data(shape, batch, device)
        reps = 3 if quick else 5
        _fwd_bwd(model, x, y)  # warm-up
        for k in (10,) if quick else (10, 20):
            pgd = rda.PGD(eps=0.1, steps=k, step_rule="madry")
            pgd(model, x[:2], y[:2])  # warm-up
            # interleave so that load changes on a shared machine hit both alike
            base_t, pgd_t = [], []
            for _ in range(reps if k == 10 else max(2, reps - 2)):
                base_t.append(_median_time(lambda m=model, a=x, b=y: _fwd_bwd(m, a, b), device, 1))
                pgd_t.append(_median_time(lambda m=model, a=x, b=y, p=pgd: p(m, a, b), device, 1))
            base, t = statistics.median(base_t), statistics.median(pgd_t)
            print(f"{label:<28} {batch:>5} {k:>3} {1000 * base:>11.1f} {1000 * t:>10.1f} {t / (k * base):>7.3f}")


def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def peers(device: torch.device, quick: bool, eps: float, eps2: float) -> None:
    have_ta = importlib.util.find_spec("torchattacks") is not None
    have_fb = importlib.util.find_spec("foolbox") is not None
    print("\n(b) side by side (smallcnn); time ratio ours/theirs (target <= 1.0); robust accuracy in %")
    if not (have_ta or have_fb):
        print("    torchattacks and foolbox are not installed: pip install -e '.[bench]' (see pyproject)")
        return
    model, label = _smallcnn(device)
    n = 256 if device.type == "cpu" else 1024
    x, y = _data((1, 28, 28), n, device)
    k = 10
    alpha, alpha2 = 2.5 * eps / k, 2.5 * eps2 / k
    cw_steps = 30 if quick else 100
    print(f"    model {label}, batch {n}, clean accuracy {100 * _acc(model, x, y):.1f}%, L-inf eps {eps}, "
          f"L2 eps {eps2}, PGD k={k} alpha=2.5eps/k random start, C&W 1 x {cw_steps} steps c=1 lr=0.01")  # fmt: skip

    # Each runner returns x_adv and includes in its time whatever gives predictions on x_adv.
    Runner = Callable[[], Tensor]

    def wrap_ours(attack: rda.Attack) -> Runner:
        return lambda: attack(model, x, y).x_adv

    ours: dict[str, Runner] = {
        "FGSM": wrap_ours(rda.FGSM(eps=eps)),
        "PGD-Linf": wrap_ours(rda.PGD(eps=eps, steps=k, alpha=alpha)),
        "PGD-L2": wrap_ours(rda.PGD(eps=eps2, norm="l2", steps=k, alpha=alpha2)),
        "C&W-L2": wrap_ours(rda.CW(c0=1.0, search_steps=1, steps=cw_steps, lr=0.01, abort_early=False)),
    }
    theirs: dict[str, dict[str, Runner]] = {}
    if have_ta:
        import torchattacks as ta

        def wrap_ta(attack: Any) -> Runner:
            def run() -> Tensor:
                adv: Tensor = attack(x, y)
                _acc(model, adv, y)  # the forward for predictions, which ours returns
                return adv

            return run

        theirs["torchattacks"] = {
            "FGSM": wrap_ta(ta.FGSM(model, eps=eps)),
            "PGD-Linf": wrap_ta(ta.PGD(model, eps=eps, alpha=alpha, steps=k, random_start=True)),
            "PGD-L2": wrap_ta(ta.PGDL2(model, eps=eps2, alpha=alpha2, steps=k, random_start=True)),
            "C&W-L2": wrap_ta(ta.CW(model, c=1.0, kappa=0, steps=cw_steps, lr=0.01)),
        }
    if have_fb:
        import foolbox as fb

        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)

        def wrap_fb(attack: Any, epsilon: float | None) -> Runner:
            def run() -> Tensor:
                _raw, adv, _success = attack(fmodel, x, y, epsilons=epsilon)
                return adv  # type: ignore[no-any-return]

            return run

        cw = fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=1, steps=cw_steps, stepsize=0.01, confidence=0, initial_const=1.0, abort_early=False
        )
        theirs["foolbox"] = {
            "FGSM": wrap_fb(fb.attacks.FGSM(), eps),
            "PGD-Linf": wrap_fb(fb.attacks.LinfPGD(abs_stepsize=alpha, steps=k, random_start=True), eps),
            "PGD-L2": wrap_fb(fb.attacks.L2PGD(abs_stepsize=alpha2, steps=k, random_start=True), eps2),
            "C&W-L2": wrap_fb(cw, None),
        }
    # Robust accuracy, computed alike for every library: correct on x_adv, or x_adv outside the
    # budget (C&W is unbounded; it is scored at L2 <= eps2, where a failed search counts as robust).
    budgets = {"FGSM": ("linf", eps), "PGD-Linf": ("linf", eps), "PGD-L2": ("l2", eps2), "C&W-L2": ("l2", eps2)}

    def robust_acc(name: str, adv: Tensor) -> float:
        norm, budget = budgets[name]
        dist = rda.get_threat(norm).distance(adv, x)
        with torch.no_grad():
            correct = model(adv).argmax(1) == y
        return float((correct | (dist > budget + 1e-4)).float().mean())

    libs = list(theirs)
    head = f"    {'attack':<9} {'ours s':>8} {'ours acc':>9}"
    for lib in libs:
        head += f" | {lib + ' s':>15} {'acc':>6} {'ratio':>6} {'Δacc':>6}"
    print(head)
    for name, run_ours in ours.items():
        reps = 1 if name == "C&W-L2" else 3
        if name != "C&W-L2":
            for fn in [run_ours, *(theirs[lib][name] for lib in libs)]:  # warm-up on the real batch
                fn()
        t_ours: list[float] = []
        t_theirs: dict[str, list[float]] = {lib: [] for lib in libs}
        adv_ours, adv_theirs = x, {lib: x for lib in libs}
        for _ in range(reps):  # interleaved, so that load changes hit every library alike
            t0 = _clock()
            adv_ours = run_ours()
            _sync(device)
            t_ours.append(_clock() - t0)
            for lib in libs:
                t0 = _clock()
                adv_theirs[lib] = theirs[lib][name]()
                _sync(device)
                t_theirs[lib].append(_clock() - t0)
        mo, a_ours = statistics.median(t_ours), robust_acc(name, adv_ours)
        line = f"    {name:<9} {mo:>8.2f} {100 * a_ours:>8.1f}%"
        for lib in libs:
            mt, a = statistics.median(t_theirs[lib]), robust_acc(name, adv_theirs[lib])
            line += f" | {mt:>15.2f} {100 * a:>5.1f}% {mo / mt:>6.2f} {100 * (a_ours - a):>+6.1f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, PGD-10 only, C&W 30 steps")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine; use with --threads 1)",
    )
    ap.add_argument("--eps", type=float, default=0.02, help="L-inf budget of (b); small so accuracy is not 0")
    ap.add_argument("--eps-l2", type=float, default=0.3, help="L2 budget of (b), also where C&W is scored")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--only", choices=("s", "a", "b"), help="run one section: s (per step), a (overhead), b (peers)")
    ap.add_argument("--n", type=int, default=600, help="images of section (s)")
    ap.add_argument("--step-eps", type=float, default=0.1, help="L-inf budget of section (s)")
    args = ap.parse_args()
    global _clock
    _clock = _CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}")
    if args.only in (None, "s"):
        per_step(device, args.quick, args.n, args.step_eps)
    if args.only in (None, "a"):
        overhead(device, args.quick)
    if not args.skip_peers and args.only in (None, "b"):
        peers(device, args.quick, args.eps, args.eps_l2)


if __name__ == "__main__":
    main()
