"""``hptransfer ablate``: the paper's Table 1 (and Fig. 7) as one resumable command.

    hptransfer ablate --base configs/synth_ablation.yaml --variants baseline,lpl,pt,pt_lpl,pt_lpl_ld \\
        --seeds 3 --out runs/ablation

A variant is a config overlay (``configs/ablation/<name>.yaml``, or a path to any YAML) applied on
the base config (``load_config([base, overlay])``, later wins); ``train.seed`` is the seed index.
Every variant x seed is trained in its own ``hptransfer.train`` subprocess, evaluated on the test
split, and the table is written from the per-run results:

    OUT/plan.json                     the base, variants, seeds and every job (for a rerun to check)
    OUT/configs/<job>.yaml            each job's resolved config (what the subprocess trains)
    OUT/runs/<job>/                   the job's run directory (train.log, checkpoints, export)
    OUT/runs/<job>/done.json          written when its training finished (wall time)
    OUT/eval/<variant>_seed<k>.json   its scores on the test split
    OUT/table.md, OUT/table.json      mean +- std over seeds per variant (Table 1 layout)
    OUT/figure.png                    Fig. 7: a few test pairs, every variant's output (seed 0) and
                                      zoomed crops at two descriptors

Progressive variants train in two jobs: the *trunk* (every stage below the top) and the *top*
stage, started from the trunk's final weights (``train --init-from``: weights only, fresh
optimisers, as at any growth). Variants whose trunks are the same training (same config once the
settings that act only at the discriminator stage are set aside, e.g. PT+LPL and PT+LPL+LD) share
one trunk run. Resuming: a job with ``done.json`` is skipped, an unfinished one continues from its
latest checkpoint (``--resume auto``), an evaluation with its JSON is not redone; a killed ablation
rerun with the same arguments continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from hptransfer.config import Config, ConfigError, load_config, save_config
from hptransfer.checkpoint import atomic_write_text
from hptransfer.errors import UserError

log = logging.getLogger("hptransfer.ablate")

ABLATION_DIR = Path(__file__).resolve().parents[1] / "configs" / "ablation"
DEFAULT_VARIANTS = "baseline,lpl,pt,pt_lpl,pt_lpl_ld"
LABELS = {"baseline": "Baseline", "lpl": "LPL", "pt": "PT", "pt_lpl": "PT + LPL", "pt_lpl_ld": "PT + LPL + LD",
          "pt_lpl_ld_both": "PT + LPL + LD + LPL at top", "pt_fade": "PT, fades (ours)",
          "pt_fade_lpl": "PT + LPL, fades (ours)", "pt_fade_lpl_ld": "PT + LPL + LD, fades (ours)"}
# table columns: (key in a run's flat scores, header, higher is better)
COLUMNS = (
    ("ssim_gaussian", "SSIM", True),
    ("ssim_uniform51", "SSIM (51-px uniform)", True),
    ("local_ssim", "local-SSIM", True),
    ("ms_ssim", "MS-SSIM", True),
    ("lpips_alex", "LPIPS", False),
    ("vacated_l1", "vacated L1", False),
    ("new_body_l1", "new-body L1", False),
)
# Settings read only at the discriminator stage: set aside when comparing trunks below it.
_TOP_ONLY_LOSS = ("adv_weight", "disc_lr", "disc_at_resolution", "local_perceptual_at_top")
_TOP_ONLY_MODEL = ("disc_channels", "disc_shared")
# Settings read only at a grown stage (the fades start at a growth): set aside for a one-stage trunk.
_GROWTH_ONLY_MODEL = ("input_fade", "output_fade")


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base config (e.g. configs/synth_ablation.yaml)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of overlays: names in configs/ablation/ or YAML paths (default: {DEFAULT_VARIANTS})")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (train.seed = 0 .. N-1)")
    p.add_argument("--out", required=True, help="ablation directory (rerun with the same arguments to resume)")
    p.add_argument("--split", default=None, help="evaluation split (default: the config's data.test_split)")
    p.add_argument("--figure-pairs", type=int, default=4, help="test pairs in the Fig. 7 figure")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda when present)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every variant")


# ---------------------------------------------------------------- the plan

@dataclasses.dataclass
class Job:
    name: str  # run directory name under OUT/runs
    cfg: Config
    seed: int
    init_from: Optional[str] = None  # name of the job whose final weights start this one


def variant_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"variant overlay not found: {p}")
        return p
    p = ABLATION_DIR / f"{name}.yaml"
    if not p.is_file():
        known = sorted(q.stem for q in ABLATION_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown variant {name!r}: no {p} (known: {', '.join(known)}; or pass a YAML path)")
    return p


def variant_name(name: str) -> str:
    return Path(name).stem


def _trunk_key(cfg: Config) -> str:
    """Identity of a trunk's training: its config without out_dir, without the settings that act
    only at the discriminator stage when that stage is above the trunk, and without the fades when the
    trunk never grows (one stage, trained from scratch: nothing to fade from)."""
    d = cfg.to_dict()
    d["train"].pop("out_dir")
    if len(cfg.stages) == 1:
        for k in _GROWTH_ONLY_MODEL:
            d["model"].pop(k)
    if cfg.loss.disc_at_resolution > cfg.stages[-1].resolution:
        for k in _TOP_ONLY_LOSS:
            d["loss"].pop(k)
        for k in _TOP_ONLY_MODEL:
            d["model"].pop(k)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def plan(base: str, variants: list[str], seeds: int, out: Path, overrides: list[str]) -> tuple[dict, list[Job]]:
    """Resolve every variant x seed into jobs. Returns ({variant: {seed: final job name}}, jobs in run order)."""
    finals: dict = {}
    jobs: dict[str, Job] = {}
    trunks: dict[str, str] = {}  # trunk key -> job name
    for v in variants:
        name = variant_name(v)
        finals[name] = {}
        for seed in range(seeds):
            cfg = load_config([base, variant_path(v)], [*overrides, f"train.seed={seed}"])
            if len(cfg.stages) == 1:
                job = f"{name}_seed{seed}"
                jobs[job] = Job(job, _with(cfg, out / "runs" / job), seed)
            else:
                trunk_cfg = _with(cfg, None, stages=cfg.stages[:-1])
                key = _trunk_key(trunk_cfg)
                if key not in trunks:
                    trunks[key] = f"trunk_{name}_seed{seed}"
                    jobs[trunks[key]] = Job(trunks[key], _with(trunk_cfg, out / "runs" / trunks[key]), seed)
                job = f"{name}_seed{seed}"
                jobs[job] = Job(job, _with(cfg, out / "runs" / job, stages=cfg.stages[-1:]), seed, trunks[key])
            finals[name][seed] = job
    # seed by seed (a trunk before the jobs it starts): a stopped ablation has every variant at fewer seeds
    order = sorted(jobs.values(), key=lambda j: j.seed)
    return finals, order


def _with(cfg: Config, out_dir: Optional[Path], stages=None) -> Config:
    c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train), stages=list(stages or cfg.stages))
    if out_dir is not None:
        c.train.out_dir = str(out_dir)
    if stages is not None:  # a trunk or a top stage of a progressive variant: keep it as cut
        c.train.progressive = True
    return c


# ---------------------------------------------------------------- running

class _Child:
    """The running training subprocess, terminated with us (SIGTERM / Ctrl-C / an error)."""
    proc: Optional[subprocess.Popen] = None


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run_job(job: Job, out: Path, jobs: dict[str, Job]) -> dict:
    """Train ``job`` in a subprocess unless its done.json exists; returns done.json's content."""
    run_dir = Path(job.cfg.train.out_dir)
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg_path = out / "configs" / f"{job.name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(job.cfg, cfg_path)
    cmd = [sys.executable, "-m", "hptransfer.train", "--config", str(cfg_path), "--resume", "auto"]
    if job.init_from:
        cmd += ["--init-from", jobs[job.init_from].cfg.train.out_dir]
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = (run_dir / "checkpoints").is_dir()
    log.info("%s job %s: %s", "resuming" if resumed else "training", job.name, " ".join(cmd))
    t0 = time.perf_counter()
    with open(run_dir / "subprocess.log", "a") as logf:
        _Child.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        rc = _Child.proc.wait()
        _Child.proc = None
    wall = time.perf_counter() - t0
    if rc != 0:  # its own error is in its log; rerunning the ablation retries (resumes) it
        raise UserError(f"job {job.name} failed (exit {rc}); see {run_dir / 'subprocess.log'}")
    info = {"job": job.name, "wall_s": round(wall, 1), "resumed": resumed,
            "iterations": sum(s.iterations for s in job.cfg.stages), "time": time.time()}
    atomic_write_text(done, json.dumps(info, indent=1))
    return info


def evaluate_job(job: Job, split: str, device, with_copy: bool = True) -> dict:
    """Flat scores of a finished job's export on ``split``: SSIM (both protocols), local-SSIM, MS-SSIM
    and LPIPS where possible, and on synthetic data the pose-following errors; with ``with_copy`` the
    copy-the-reference baseline too, under ``copy_reference/`` (the same for every model)."""
    from hptransfer.data.synth import PARAMS_FILE
    from hptransfer.evaluate import evaluate_export, pose_following

    export = Path(job.cfg.train.out_dir) / "export"
    root = Path(job.cfg.data.root)
    scored = evaluate_export(export, root, split, metrics=("ssim", "ms_ssim", "local_ssim", "lpips"), device=device,
                             baseline=with_copy)
    flat: dict = {}
    for who, results in scored.items():
        prefix = "" if who == "model" else f"{who}/"
        for name, r in results.items():
            if "value" in r:
                flat[prefix + name] = r["value"]
                flat["pairs"] = r["n"] if name.startswith("ssim") else flat.get("pairs", r["n"])
            else:
                flat[f"{prefix}{name}_unavailable"] = r["unavailable"]
    if (root / PARAMS_FILE).is_file():
        following = pose_following(export, root, split, device=device)
        for who in ("model", "copy_reference") if with_copy else ("model",):
            prefix = "" if who == "model" else f"{who}/"
            for name, v in following[who].items():
                flat[prefix + name] = v
    return flat


# ---------------------------------------------------------------- the table

def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(scores: dict[str, dict[int, dict]], seeds: int) -> dict:
    """{variant: {seed: flat scores}} -> table.json's "rows": per variant, per column: mean, std (sample,
    ddof 1), the per-seed values and the seeds that finished; plus a copy-the-reference row."""
    rows = {}
    for variant, by_seed in scores.items():
        row = {"seeds_done": sorted(by_seed), "seeds_planned": seeds}
        for key, _, _ in COLUMNS:
            vals = [by_seed[s][key] for s in sorted(by_seed) if key in by_seed[s]]
            if vals:
                m, sd = _mean_std(vals)
                row[key] = {"mean": m, "std": sd, "values": vals}
        rows[variant] = row
    copy = next((s for by_seed in scores.values() for s in by_seed.values()
                 if any(k.startswith("copy_reference/") for k in s)), None)
    if copy is not None:  # the same for every run (it does not depend on the model)
        rows["copy_reference"] = {key: {"mean": copy[f"copy_reference/{key}"], "std": 0.0, "values": []}
                                  for key, _, _ in COLUMNS if f"copy_reference/{key}" in copy}
        rows["copy_reference"]["seeds_done"] = []
    return rows


def format_markdown(rows: dict, seeds: int, note: str = "") -> str:
    cols = [(k, h, up) for k, h, up in COLUMNS if any(k in r for r in rows.values())]
    head = "| Method | seeds | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, up in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for variant, r in rows.items():
        label = LABELS.get(variant, "copy the reference" if variant == "copy_reference" else variant)
        done = "-" if variant == "copy_reference" else f"{len(r['seeds_done'])}/{seeds}"
        cells = []
        for k, _, _ in cols:
            c = r.get(k)
            cells.append("" if c is None else f"{c['mean']:.4f}" if variant == "copy_reference" or len(c["values"]) < 2
                         else f"{c['mean']:.4f} ± {c['std']:.4f}")
        lines.append(f"| {label} | {done} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


# ---------------------------------------------------------------- Fig. 7

def _pick_descriptors(kp, count: int = 2) -> list[int]:
    """Two descriptors to zoom into, valid in the target: the face first, then a wrist or an ankle."""
    from hptransfer import pose

    present = ~pose.is_missing(kp)
    picks = [d for d in (0, 4, 7, 10, 13, 1) if bool(present[d])]
    return picks[:count]


def make_figure(finals: dict, jobs: dict[str, Job], out_path: Path, split: str, n_pairs: int = 4,
                zoom: int = 4) -> Optional[Path]:
    """Fig. 7 layout: per test pair a row of reference, ground truth and each variant's output (its
    first finished seed); two descriptors boxed (R/8 side) and zoomed ``zoom`` x beneath each image."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from hptransfer import metrics as M
    from hptransfer import pose
    from hptransfer.data import PairDataset
    from hptransfer.export import generate, load_generator

    shown = {}
    for variant, by_seed in finals.items():
        for seed in sorted(by_seed):
            export = Path(jobs[by_seed[seed]].cfg.train.out_dir) / "export"
            if (Path(jobs[by_seed[seed]].cfg.train.out_dir) / "done.json").is_file() and (export / "config.json").is_file():
                shown[variant] = load_generator(export)
                break
    if not shown:
        return None
    any_job = jobs[next(iter(next(iter(finals.values())).values()))]
    R = next(iter(shown.values())).resolution
    ds = PairDataset(any_job.cfg.data.root, split, R)
    # different people: spread over the split
    picks = sorted({round(i * (len(ds) - 1) / max(n_pairs - 1, 1)) for i in range(n_pairs)})
    items = [ds[i] for i in picks]
    ref = torch.stack([torch.as_tensor(it["reference"]) for it in items])
    tgt = torch.stack([torch.as_tensor(it["target"]) for it in items])
    kp = torch.stack([torch.as_tensor(it["kp_target"]) for it in items]).float()
    kp_ref = torch.stack([torch.as_tensor(it["kp_reference"]) for it in items]).float()
    # (label, images, keypoints where its boxes go): the reference at its own pose, the rest at the target's
    columns = [("reference", ref, kp_ref), ("ground truth", tgt, kp)]
    columns += [(LABELS.get(v, v), generate(g, ref, kp).float().cpu(), kp) for v, g in shown.items()]
    s = pose.crop_size(R)
    z = s * zoom
    cell_w = max(R, 2 * z)
    label_h, gap = 14, 4
    row_h = R + z + gap
    W, H = cell_w * len(columns), label_h + row_h * len(items)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    colours = ((255, 0, 0), (0, 160, 255))
    for c, (label, _, _) in enumerate(columns):
        draw.text((c * cell_w + 2, 1), label.replace(" + ", "+"), fill=(0, 0, 0))  # fits a 128-px column
    for r, it in enumerate(items):
        ds_ids = _pick_descriptors(kp[r])
        for c, (_, imgs, kps) in enumerate(columns):
            centres = kps[r]
            a = M.to_uint8(imgs[r:r + 1])[0].permute(1, 2, 0).numpy()
            im = Image.fromarray(np.ascontiguousarray(a))
            x0, y0 = c * cell_w + (cell_w - R) // 2, label_h + r * row_h
            canvas.paste(im, (x0, y0))
            for k, d in enumerate(ds_ids):
                if bool((centres[d] < 0).any()):  # not visible in the reference
                    continue
                cy, cx = (float(v) for v in centres[d])
                top, left = int(round(cy - s / 2)), int(round(cx - s / 2))
                crop = im.crop((left, top, left + s, top + s)).resize((z, z), Image.NEAREST)
                draw.rectangle((x0 + left, y0 + top, x0 + left + s - 1, y0 + top + s - 1), outline=colours[k])
                zx = c * cell_w + k * z + (cell_w - 2 * z) // 2
                canvas.paste(crop, (zx, y0 + R + 1))
                draw.rectangle((zx, y0 + R + 1, zx + z - 1, y0 + R + z), outline=colours[k])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    canvas.save(tmp)
    os.replace(tmp, out_path)
    return out_path


# ---------------------------------------------------------------- the command

def ablate(base: str, variants: list[str], seeds: int, out: str | Path, overrides: Optional[list[str]] = None,
           split: Optional[str] = None, figure_pairs: int = 4, device=None) -> dict:
    """Run (or resume) the ablation; returns table.json's content."""
    import torch

    out = Path(out)
    overrides = list(overrides or [])
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    finals, order = plan(base, variants, seeds, out, overrides)
    jobs = {j.name: j for j in order}
    _check_variants(finals, jobs)
    out.mkdir(parents=True, exist_ok=True)
    plan_doc = {"base": str(base), "variants": variants, "seeds": seeds, "overrides": overrides,
                "jobs": {j.name: {"init_from": j.init_from, "stages": [dataclasses.asdict(s) for s in j.cfg.stages]}
                         for j in order}}
    plan_file = out / "plan.json"
    if plan_file.is_file():  # more variants or seeds may join; a job that changed may not
        old = json.loads(plan_file.read_text())
        changed = [n for n, j in old.get("jobs", {}).items() if n in plan_doc["jobs"] and plan_doc["jobs"][n] != j]
        if changed or old.get("base") != plan_doc["base"] or old.get("overrides") != overrides:
            raise ConfigError(f"{plan_file}: this directory holds an ablation with other settings "
                              f"({', '.join(changed) or 'base or overrides'} differ); use another --out")
        plan_doc["variants"] = list(dict.fromkeys(old.get("variants", []) + variants))
        plan_doc["jobs"] = {**old.get("jobs", {}), **plan_doc["jobs"]}
    atomic_write_text(plan_file, json.dumps(plan_doc, indent=1))
    split = split or next(iter(jobs.values())).cfg.data.test_split
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    final_of = {name: (variant, seed) for variant, by_seed in finals.items() for seed, name in by_seed.items()}
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    walls: dict[str, float] = {}
    scores: dict = {v: {} for v in finals}
    table: dict = {}
    try:
        for i, job in enumerate(order, 1):
            log.info("[%d/%d] %s", i, len(order), job.name)
            walls[job.name] = run_job(job, out, jobs)["wall_s"]
            if job.name not in final_of:
                continue
            # scored as soon as it is trained, the table rewritten: a stopped ablation leaves a partial table
            variant, seed = final_of[job.name]
            path = out / "eval" / f"{variant}_seed{seed}.json"
            if not path.is_file():
                log.info("evaluating %s seed %d on %s", variant, seed, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                first = next(iter(final_of)) == job.name  # the copy-the-reference row once
                atomic_write_text(path, json.dumps(evaluate_job(job, split, dev, with_copy=first), indent=1))
            scores[variant][seed] = json.loads(path.read_text())
            table = write_table(out, finals, jobs, scores, seeds, split, walls)
            if seed == 0 and all(0 in scores[v] for v in finals):
                make_figure(finals, jobs, out / "figure.png", split, figure_pairs)
    except KeyboardInterrupt:
        if _Child.proc is not None:
            _Child.proc.terminate()
            _Child.proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("wrote %s, %s and %s", out / "table.md", out / "table.json", out / "figure.png")
    return table


def _check_variants(finals: dict, jobs: dict[str, Job]) -> None:
    """A variant named *_ld must run the local discriminators at its top stage; one without must not."""
    from hptransfer import losses

    for variant, by_seed in finals.items():
        cfg = jobs[by_seed[0]].cfg
        top = cfg.stages[-1].resolution
        adv = losses.active_terms(cfg.loss, top)["adv"]
        if variant.endswith("_ld") and not adv:
            raise ConfigError(f"variant {variant}: no local discriminators at its top stage ({top} px): the config "
                              f"has loss.disc_at_resolution={cfg.loss.disc_at_resolution}, "
                              f"loss.adv_weight={cfg.loss.adv_weight}")


def write_table(out: Path, finals: dict, jobs: dict[str, Job], scores: dict, seeds: int, split: str,
                walls: dict) -> dict:
    from hptransfer import losses

    rows = summarize({v: s for v, s in scores.items() if s}, seeds)
    terms = {}
    for variant, by_seed in finals.items():
        cfg = jobs[by_seed[0]].cfg
        trunk = jobs[jobs[by_seed[0]].init_from].cfg if jobs[by_seed[0]].init_from else None
        stages = (trunk.stages if trunk else []) + cfg.stages
        terms[variant] = [{"resolution": s.resolution, "iterations": s.iterations, "batch_size": s.batch_size,
                           **losses.active_terms((trunk.loss if trunk and s in trunk.stages else cfg.loss), s.resolution)}
                          for s in stages]
    total_wall = sum(walls.values())
    first = jobs[next(iter(finals.values()))[0]].cfg
    pairs = next((s.get("pairs") for by_seed in scores.values() for s in by_seed.values()), "?")
    note = (f"Test split `{split}` of `{first.data.root}` ({pairs} pairs); mean ± sample std over the seeds "
            f"that finished; training wall time of the jobs so far {total_wall / 60:.1f} min. "
            f"↑ higher is better, ↓ lower is better.")
    doc = {"split": split, "seeds": seeds, "rows": rows, "stages_and_terms": terms, "job_wall_s": walls,
           "total_train_wall_s": round(total_wall, 1), "columns": {k: h for k, h, _ in COLUMNS}}
    atomic_write_text(out / "table.json", json.dumps(doc, indent=1))
    atomic_write_text(out / "table.md", format_markdown(rows, seeds, note))
    return doc


def run(args) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants:
        raise ConfigError("--variants is empty")
    ablate(args.base, variants, args.seeds, args.out, args.overrides, args.split, args.figure_pairs, args.device)
    print((Path(args.out) / "table.md").read_text())
    print(f"figure: {Path(args.out) / 'figure.png'}")
    return 0
