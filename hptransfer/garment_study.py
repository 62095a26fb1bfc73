"""``hptransfer garment-study``: does the appearance flow (ours, not the paper's design) beat an affine
paste once it has converged? Learning curves with seeds.

    hptransfer garment-study --data data/synth_ablation --out runs/garment_study --seeds 3 \\
        --iterations 6000 --eval-every 300 --round-every 1200 --pairs 24 --resolutions 64,128
    hptransfer garment-study --out runs/garment_study --report      # summary and plot as they stand

For each seed the flow network trains on ``configs/garment_flow.yaml`` as the garment demo trains it
(same-person pose pairs of the synthetic train split, no perceptual term; ``train.seed`` = the seed;
overrides after the options apply) and, every
``--eval-every`` iterations, warps the garments of ``--pairs`` held-out try-on pairs (person A of the
test split wearing another test person B's garment, :func:`hptransfer.garment_eval.tryon_inputs`). Its
composite is scored against the exact rendering of A in B's garment: L1 and SSIM inside the ground
truth's garment, and the garment mask's IoU. The affine paste (B's garment mask fitted onto A's own
frontal garment mask, :func:`hptransfer.garment_eval.affine_paste`) is scored on the same pairs; it
does not train, so it is one line. Both composite onto A's *exact* frontal rendering (no transfer
network), so the curves compare the warps alone.

The seeds train in rounds (``--round-every`` iterations each in turn), so a study stopped early has
every seed at the same length. Outputs in ``--out``: ``flow_seed<k>/`` (the training runs, resumable),
``curves.json`` (every
evaluation: per seed, step and resolution, the means and per-pair values; the affine paste's), the
figure ``curves.png`` (L1 and SSIM against iterations, one panel per resolution and metric: each seed's
curve, their mean, the affine line) and ``summary.md`` (final means ± std over seeds and on how many
pairs the flow beats the affine paste). A killed study rerun with the same arguments resumes: finished
evaluations are kept, a training run continues from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from hptransfer.checkpoint import atomic_write_text
from hptransfer.errors import ConfigError, InputError

log = logging.getLogger("hptransfer.garment_study")

GARMENT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "garment_flow.yaml"
# As the garment demo trains it: an untrained VGG is not perceptual (and ~40% of a CPU step)
DEMO_OVERRIDES = ("flow.perceptual_weight=0",)
METRICS = (("l1", "L1 in garment", False), ("ssim", "SSIM in garment", True), ("iou", "mask IoU", True))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="synthetic dataset with parsing maps (hptransfer data synth)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: the summary and curves.png from OUT/curves.json as they stand")
    p.add_argument("--out", required=True, help="study directory (rerun with the same arguments to resume)")
    p.add_argument("--config", default=str(GARMENT_CONFIG),
                   help="flow training config (default: configs/garment_flow.yaml)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds (train.seed = 0 .. N-1)")
    p.add_argument("--iterations", type=int, default=6000, help="flow training iterations per seed")
    p.add_argument("--eval-every", type=int, default=250, help="evaluate (and checkpoint) every N iterations")
    p.add_argument("--round-every", type=int, default=1000,
                   help="train the seeds in turn, this many iterations each, so a stopped study has them all")
    p.add_argument("--pairs", type=int, default=24, help="held-out try-on pairs scored")
    p.add_argument("--resolutions", default="64,128", help="comma list of resolutions the warps are scored at")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the flow config")


def _resolutions(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--resolutions must be a comma list of integers, got {text!r}") from None
    if not out or any(r < 16 or r % 16 for r in out):
        raise ConfigError(f"--resolutions: each must be a multiple of 16 (the flow's 4 levels), got {text!r}")
    return out


def _per_pair(scores: dict) -> dict:
    return {k: [round(float(x), 6) for x in v] for k, v in scores.items()}


def _means(per_pair: dict) -> dict:
    return {k: sum(v) / len(v) for k, v in per_pair.items()}


def study(data, out, seeds: int = 3, iterations: int = 6000, eval_every: int = 250, pairs: int = 24,
          resolutions: tuple = (64, 128), config=GARMENT_CONFIG, overrides: Optional[list] = None,
          round_every: int = 1000) -> dict:
    """Run (or resume) the study; returns curves.json's content."""
    from hptransfer.config import load_config
    from hptransfer.garment_eval import _composite, affine_paste, flow_composite, score_frontal, tryon_inputs
    from hptransfer.models import AppearanceFlow
    from hptransfer.train import train

    from hptransfer.data.synth import PARAMS_FILE, PARSING_DIR

    data, out = Path(data), Path(out)
    if seeds < 1 or iterations < 1 or eval_every < 1 or round_every < 1:
        raise ConfigError("--seeds, --iterations, --eval-every and --round-every must be >= 1")
    if not (data / PARAMS_FILE).is_file() or not (data / PARSING_DIR).is_dir():
        raise InputError(f"{data}: not a synthetic dataset with parsing maps (no {PARAMS_FILE} or {PARSING_DIR}/); "
                         "the study renders its ground truth: use `hptransfer data synth` output")
    curves_path = out / "curves.json"
    settings = {"data": str(data), "iterations": iterations, "eval_every": eval_every, "pairs": pairs,
                "resolutions": list(resolutions), "config": str(config), "overrides": list(overrides or [])}
    doc = json.loads(curves_path.read_text()) if curves_path.is_file() else {"settings": settings, "seeds": {}}
    if doc["settings"] != settings:
        raise ConfigError(f"{curves_path}: this directory holds a study with other settings ({doc['settings']}); "
                          "use another --out")

    inputs, affine = {}, {}  # before anything is written: a dataset without try-on pairs stops here
    for R in resolutions:
        log.info("try-on inputs and the affine paste at %d px (%d held-out pairs)", R, pairs)
        t = tryon_inputs(data, "test", pairs, R)
        inputs[R] = t
        img, alpha = _composite(t["frontal"], *affine_paste(t), t["region"], R)
        affine[str(R)] = _per_pair(score_frontal(img, alpha, t))
    doc["affine"] = affine
    out.mkdir(parents=True, exist_ok=True)

    def save():
        atomic_write_text(curves_path, json.dumps(doc, indent=1))

    def evaluate(model, seed: int, step: int) -> None:
        entry = doc["seeds"].setdefault(str(seed), {})
        if str(step) in entry:
            return
        flow = copy.deepcopy(model).cpu().eval()  # try_on sets its resolution: never the training module's
        entry[str(step)] = {str(R): _per_pair(score_frontal(*flow_composite(flow, inputs[R], inputs[R]["frontal"]),
                                                            inputs[R])) for R in resolutions}
        save()
        m = {R: _means(entry[str(step)][str(R)]) for R in resolutions}
        log.info("seed %d step %d: %s", seed, step, "; ".join(
            f"{R} px L1 {v['l1']:.4f} SSIM {v['ssim']:.4f} IoU {v['iou']:.3f}" for R, v in m.items()))

    configs = {}
    for seed in range(seeds):
        cfg = load_config(config, [f"data.root={data}", f"train.out_dir={out / f'flow_seed{seed}'}",
                                   f"train.seed={seed}", f"stages.0.iterations={iterations}",
                                   f"train.checkpoint_every={eval_every}", "train.sample_every=0",
                                   *DEMO_OVERRIDES, *(overrides or [])])
        if cfg.task != "garment_flow":
            raise ConfigError(f"{config}: not a garment flow config (task: {cfg.task})")
        if len(cfg.stages) != 1:
            raise ConfigError(f"{config}: the study trains one stage, the config has {len(cfg.stages)}")
        f = cfg.flow
        evaluate(AppearanceFlow(cfg.stages[0].resolution, levels=f.levels, channels=f.channels,
                                max_channels=f.max_channels), seed, 0)  # the untrained network: identity warp
        configs[seed] = cfg
    # in rounds, every seed to the round's step before any goes further: a stopped study has all seeds
    # at the same length (each run stops and resumes exactly)
    rounds = sorted({min(k * round_every, iterations) for k in range(1, math.ceil(iterations / round_every) + 1)})
    for target in rounds:
        for seed, cfg in configs.items():
            def callback(info, seed=seed):
                step = info["global_step"] + 1  # info counts the steps before this one
                if step % eval_every == 0 or step == iterations:
                    evaluate(info["generator"], seed, step)

            log.info("seed %d: training to step %d of %d", seed, target, iterations)
            train(cfg, resume="auto", callback=callback, stop_at_step=target)
    save()
    plot(doc, out / "curves.png")
    atomic_write_text(out / "summary.md", summary(doc))
    return doc


def last_common_step(doc: dict) -> str:
    """The last step every seed has been evaluated at (a study stopped mid-round has seeds at several)."""
    return str(max(set.intersection(*(set(int(k) for k in v) for v in doc["seeds"].values()))))


def summary(doc: dict, step: Optional[str] = None) -> str:
    """Means ± std over seeds at ``step`` (default: :func:`last_common_step`), the affine paste's, and
    per-pair wins of the flow (every seed's pairs)."""
    lines = []
    seeds = sorted(doc["seeds"], key=int)
    step = str(step) if step is not None else last_common_step(doc)
    for R in doc["settings"]["resolutions"]:
        R = str(R)
        aff = doc["affine"][R]
        lines += [f"**{R} px** ({len(aff['l1'])} held-out pairs, seeds {', '.join(seeds)}, flow after {step} of "
                  f"{doc['settings']['iterations']} iterations; mean ± sample std over seeds)", "",
                  "| | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, up in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        cells_flow, cells_aff, wins = [], [], []
        for k, _, up in METRICS:
            finals = [doc["seeds"][s][step][R][k] for s in seeds]
            means = [sum(v) / len(v) for v in finals]
            m = sum(means) / len(means)
            sd = math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1)) if len(means) > 1 else 0.0
            cells_flow.append(f"{m:.4f} ± {sd:.4f}")
            cells_aff.append(f"{sum(aff[k]) / len(aff[k]):.4f}")
            better = sum((f > a) if up else (f < a) for v in finals for f, a in zip(v, aff[k]))
            wins.append(f"{better}/{sum(len(v) for v in finals)}")
        lines += [f"| flow (ours), step {step} | " + " | ".join(cells_flow) + " |",
                  "| affine paste | " + " | ".join(cells_aff) + " |",
                  "| pairs where the flow is better (all seeds) | " + " | ".join(wins) + " |", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path:
    """L1 and SSIM against iterations: rows = resolutions, columns = metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [str(r) for r in doc["settings"]["resolutions"]]
    shown = [m for m in METRICS if m[0] in ("l1", "ssim")]
    fig, axes = plt.subplots(len(res), len(shown), figsize=(5.2 * len(shown), 3.4 * len(res)), squeeze=False)
    seeds = sorted(doc["seeds"], key=int)
    for i, R in enumerate(res):
        for j, (k, head, up) in enumerate(shown):
            ax = axes[i][j]
            curves = []
            for s in seeds:
                steps = sorted(int(x) for x in doc["seeds"][s])
                ys = [sum(doc["seeds"][s][str(x)][R][k]) / len(doc["seeds"][s][str(x)][R][k]) for x in steps]
                ax.plot(steps, ys, color="tab:blue", alpha=0.35, lw=1)
                curves.append(dict(zip(steps, ys)))
            common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if common:
                ax.plot(common, [sum(c[x] for c in curves) / len(curves) for x in common], color="tab:blue", lw=2,
                        label=f"flow (ours), mean of {len(curves)} seeds")
            a = doc["affine"][R][k]
            ax.axhline(sum(a) / len(a), color="tab:orange", lw=2, ls="--", label="affine paste")
            ax.set_title(f"{head} ({'higher' if up else 'lower'} is better), {R} px")
            ax.set_xlabel("flow training iterations")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def run(args) -> int:
    out = Path(args.out)
    if args.report:
        path = out / "curves.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no study here (run hptransfer garment-study --data ... --out {out} first)")
        doc = json.loads(path.read_text())
        plot(doc, out / "curves.png")
        atomic_write_text(out / "summary.md", summary(doc))
    else:
        if not args.data:
            raise ConfigError("--data is required (or --report to summarise an existing study)")
        doc = study(args.data, out, args.seeds, args.iterations, args.eval_every, args.pairs,
                    tuple(_resolutions(args.resolutions)), args.config, args.overrides, args.round_every)
    print(summary(doc))
    print(f"curves: {Path(args.out) / 'curves.png'}; every evaluation: {Path(args.out) / 'curves.json'}")
    return 0
