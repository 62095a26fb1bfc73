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
    OUT/report.md                     the readings: every pair of rows a Table 1 claim compares (and
                                      the fade rows against the paper's), each metric's difference in
                                      pooled seed spreads and a verdict (:data:`RULE`); also
                                      ``hptransfer ablate --out OUT --report [--pairs A:B,...]``
    OUT/figure.png                    Fig. 7: a few test pairs, every variant's output (seed 0) and
                                      zoomed crops at two descriptors
    OUT/figure_descriptors.png        with ``--descriptors 0,18,31,44`` (Fig. 4's sweep: every variant
                                      once per count, rows ``<variant>_d<count>``): Fig. 4 right, the
                                      chest zoomed in each count's output

Progressive variants train in two jobs: the *trunk* (every stage below the top) and the *top*
stage, started from the trunk's final weights (``train --init-from``: weights only, fresh
optimisers, as at any growth). Variants whose trunks are the same training (same config once the
settings that act only at the discriminator stage are set aside, e.g. PT+LPL and PT+LPL+LD, and, for a
one-stage trunk, the fades, which act only at a growth: PT and PT with fades) share one trunk run.
Resuming: a job with ``done.json`` is skipped, an unfinished one continues from its
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
DEFAULT_SWEEP_VARIANTS = "pt_lpl"
DESCRIPTOR_COUNTS = (0, 18, 31, 44)
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
    p.add_argument("--base", default=None, help="base config (e.g. configs/synth_ablation.yaml); not with --report")
    p.add_argument("--variants", default=None,
                   help=f"comma list of overlays: names in configs/ablation/ or YAML paths "
                        f"(default: {DEFAULT_VARIANTS}; with --descriptors: {DEFAULT_SWEEP_VARIANTS})")
    p.add_argument("--descriptors", default=None, metavar="N,N,...",
                   help="Fig. 4: every variant once per descriptor count (loss.descriptors; from 0, 18, 31, 44), "
                        "and the figure of zoomed crops per count")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (train.seed = 0 .. N-1)")
    p.add_argument("--out", required=True, help="ablation directory (rerun with the same arguments to resume)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: compare rows of OUT/table.json (the Table 1 pairs, the fade rows against "
                        "the paper's, descriptor counts in turn, and --pairs) and print the verdicts")
    p.add_argument("--pairs", default=None, metavar="A:B,...",
                   help="with --report: also compare these rows (table row names, e.g. lpl:pt)")
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


@dataclasses.dataclass(frozen=True)
class Variant:
    """A table row: an overlay (``configs/ablation/<overlay>.yaml`` or a path), with extra overrides
    (``loss.descriptors=N`` in a descriptor sweep)."""
    name: str  # the row's name (and its jobs' prefix)
    overlay: str  # as given: a name in configs/ablation/ or a YAML path
    overrides: tuple = ()
    descriptors: Optional[int] = None

    @property
    def kind(self) -> str:
        """The overlay's name (pt_lpl_ld for pt_lpl_ld_d44): its Table 1 row."""
        return variant_name(self.overlay)

    @property
    def label(self) -> str:
        text = LABELS.get(self.kind, self.kind)
        return text if self.descriptors is None else f"{text}, {self.descriptors} descriptors"


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--descriptors must be a comma list of counts from {DESCRIPTOR_COUNTS}, "
                          f"got {text!r}") from None
    bad = [c for c in counts if c not in DESCRIPTOR_COUNTS]
    if not counts or bad or len(set(counts)) != len(counts):
        raise ConfigError(f"--descriptors: counts from {DESCRIPTOR_COUNTS}, each once, got {text!r}")
    return counts


def make_variants(names: list[str], descriptors: Optional[list[int]] = None) -> tuple[list[Variant], dict]:
    """The rows to train: each overlay once, or (a sweep) once per descriptor count. Returns (rows,
    {row name: why it is skipped}): with 0 descriptors there are no local discriminators, so an
    ``_ld`` variant has nothing to differ by and is skipped, not run as a mislabelled row."""
    if descriptors is None:
        return [Variant(variant_name(n), n) for n in names], {}
    rows, skipped = [], {}
    for count in descriptors:
        for n in names:
            name = f"{variant_name(n)}_d{count}"
            if count == 0 and variant_name(n).endswith("_ld"):
                skipped[name] = ("loss.descriptors=0 leaves no local discriminator (nor local perceptual loss): "
                                 f"{variant_name(n)} would train as PT alone")
                continue
            rows.append(Variant(name, n, (f"loss.descriptors={count}",), count))
    return rows, skipped


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


def plan(base: str, variants: list, seeds: int, out: Path, overrides: list[str]) -> tuple[dict, list[Job]]:
    """Resolve every variant (an overlay name or path, or a :class:`Variant`) x seed into jobs.
    Returns ({variant: {seed: final job name}}, jobs in run order)."""
    finals: dict = {}
    jobs: dict[str, Job] = {}
    trunks: dict[str, str] = {}  # trunk key -> job name
    for v in variants:
        v = v if isinstance(v, Variant) else Variant(variant_name(v), v)
        name = v.name
        finals[name] = {}
        for seed in range(seeds):
            cfg = load_config([base, variant_path(v.overlay)], [*overrides, *v.overrides, f"train.seed={seed}"])
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


def format_markdown(rows: dict, seeds: int, note: str = "", labels: Optional[dict] = None) -> str:
    cols = [(k, h, up) for k, h, up in COLUMNS if any(k in r for r in rows.values())]
    head = "| Method | seeds | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, up in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    labels = {**LABELS, "copy_reference": "copy the reference", **(labels or {})}
    for variant, r in rows.items():
        label = labels.get(variant, variant)
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


def _spread_pairs(ds, n_pairs: int):
    """(reference, target, kp_reference, kp_target) of ``n_pairs`` pairs spread over ``ds`` (different
    people, not one person's pairs); keypoints float."""
    import torch

    picks = sorted({round(i * (len(ds) - 1) / max(n_pairs - 1, 1)) for i in range(n_pairs)})
    items = [ds[i] for i in picks]
    stack = lambda key: torch.stack([torch.as_tensor(it[key]) for it in items])  # noqa: E731
    return stack("reference"), stack("target"), stack("kp_reference").float(), stack("kp_target").float()


def make_figure(finals: dict, jobs: dict[str, Job], out_path: Path, split: str, n_pairs: int = 4,
                labels: Optional[dict] = None, zoom: int = 4) -> Optional[Path]:
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
    ref, tgt, kp_ref, kp = _spread_pairs(PairDataset(any_job.cfg.data.root, split, R), n_pairs)
    # (label, images, keypoints where its boxes go): the reference at its own pose, the rest at the target's
    columns = [("reference", ref, kp_ref), ("ground truth", tgt, kp)]
    labels = {**LABELS, **(labels or {})}
    columns += [(labels.get(v, v), generate(g, ref, kp).float().cpu(), kp) for v, g in shown.items()]
    s = pose.crop_size(R)
    z = s * zoom
    cell_w = max(R, 2 * z)
    label_h, gap = 14, 4
    row_h = R + z + gap
    W, H = cell_w * len(columns), label_h + row_h * len(ref)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    colours = ((255, 0, 0), (0, 160, 255))
    for c, (label, _, _) in enumerate(columns):
        draw.text((c * cell_w + 2, 1), label.replace(" + ", "+"), fill=(0, 0, 0))  # fits a 128-px column
    for r in range(len(ref)):
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


# ---------------------------------------------------------------- Fig. 4 (right)

def chest_box(kp, resolution: int) -> Optional[tuple[int, int, int]]:
    """(top, left, side) of a R/4 square on the chest (halfway from the neck to the hips' midpoint),
    where Fig. 4's zoomed logo sits; None without a neck or a hip."""
    from hptransfer import pose

    present = ~pose.is_missing(kp)
    hips = [kp[i] for i in (8, 11) if bool(present[i])]
    if not bool(present[1]) or not hips:
        return None
    cy, cx = (float(v) for v in (kp[1] + sum(hips) / len(hips)) / 2)
    side = max(resolution // 4, 4)
    top = min(max(int(round(cy - side / 2)), 0), resolution - side)
    left = min(max(int(round(cx - side / 2)), 0), resolution - side)
    return top, left, side


def make_descriptor_figure(finals: dict, jobs: dict[str, Job], info: dict, out_path: Path, split: str,
                           n_pairs: int = 4) -> Optional[Path]:
    """Fig. 4 (right) for a descriptor sweep: per test pair the ground truth with the chest box, its
    zoom, and the zoom of each count's output (seed 0), in the sweep's order."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from hptransfer import metrics as M
    from hptransfer.data import PairDataset
    from hptransfer.export import generate, load_generator

    shown = {}
    for variant, by_seed in finals.items():
        run_dir = Path(jobs[by_seed[0]].cfg.train.out_dir) if 0 in by_seed else None
        if run_dir is not None and (run_dir / "done.json").is_file():
            shown[variant] = load_generator(run_dir / "export")
    if not shown:
        return None
    any_job = jobs[next(iter(next(iter(finals.values())).values()))]
    R = next(iter(shown.values())).resolution
    ref, tgt, _, kp = _spread_pairs(PairDataset(any_job.cfg.data.root, split, R), n_pairs)
    outputs = {v: M.to_uint8(generate(g, ref, kp).float().cpu()) for v, g in shown.items()}
    truth = M.to_uint8(tgt)
    label_h, gap = 14, 4
    columns = ["ground truth", "zoom"] + [f"{info.get(v, {}).get('kind', v)} {info.get(v, {}).get('descriptors', '')}"
                                          for v in shown]
    W, H = R * len(columns) + gap * (len(columns) - 1), label_h + (R + gap) * len(ref)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(columns):
        draw.text((c * (R + gap) + 2, 1), text, fill=(0, 0, 0))
    as_image = lambda t: Image.fromarray(np.ascontiguousarray(t.permute(1, 2, 0).numpy()))  # noqa: E731
    for r in range(len(ref)):
        y0 = label_h + r * (R + gap)
        full = as_image(truth[r])
        canvas.paste(full, (0, y0))
        box = chest_box(kp[r], R)
        if box is None:
            continue
        top, left, side = box
        draw.rectangle((left, y0 + top, left + side - 1, y0 + top + side - 1), outline=(255, 0, 0))
        crops = [full] + [as_image(outputs[v][r]) for v in shown]
        for c, im in enumerate(crops, start=1):
            zoomed = im.crop((left, top, left + side, top + side)).resize((R, R), Image.NEAREST)
            canvas.paste(zoomed, (c * (R + gap), y0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    canvas.save(tmp)
    os.replace(tmp, out_path)
    return out_path


# ---------------------------------------------------------------- the report (readings computed from the table)

# The comparisons a Table 1 claim makes (section 4.2: each component, alone and added), then ours.
TABLE1_PAIRS = (("baseline", "lpl"), ("baseline", "pt"), ("pt", "pt_lpl"), ("pt_lpl", "pt_lpl_ld"), ("lpl", "pt_lpl"))
FADE_PAIRS = (("pt", "pt_fade"), ("pt_lpl", "pt_fade_lpl"), ("pt_lpl_ld", "pt_fade_lpl_ld"))
OTHER_PAIRS = (("pt_lpl_ld", "pt_lpl_ld_both"),)
SIGNIFICANCE = 0.05
RULE = ("Verdict rule: B is *better* (or *worse*) than A on a metric when a two-sided two-sample t-test with "
        f"pooled variance over the seeds rejects equal means at {SIGNIFICANCE:.0%}, i.e. when |Δ| / s_pooled > "
        "t(0.975; n_A + n_B − 2) · sqrt(1/n_A + 1/n_B) (2.27 with 3 seeds each); otherwise *within noise*. "
        "Δ = mean(B) − mean(A); s_pooled = sqrt(((n_A − 1) s_A² + (n_B − 1) s_B²) / (n_A + n_B − 2)), s the "
        "sample std over seeds. Better means higher for ↑ columns and lower for ↓ columns.")


def parse_pairs(text: Optional[str]) -> list[tuple[str, str]]:
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        a, sep, b = item.strip().partition(":")
        if not sep or not a or not b:
            raise ConfigError(f"--pairs: {item!r} must look like A:B (two table row names)")
        out.append((a, b))
    return out


def default_pairs(doc: dict) -> list[tuple[str, str]]:
    """The comparisons of the rows present: Table 1's claims, each fade row against the paper's row, LD
    keeping LPL against LD replacing it; in a descriptor sweep the same within each count, and each
    variant's counts in increasing order."""
    rows = set(doc["rows"]) - {"copy_reference"}
    info = doc.get("variants") or {}
    by_count: dict = {}
    for name in rows:
        i = info.get(name, {})
        by_count.setdefault(i.get("descriptors"), {})[i.get("kind", name)] = name
    pairs = []
    for count, kinds in sorted(by_count.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        pairs += [(kinds[a], kinds[b]) for a, b in TABLE1_PAIRS + FADE_PAIRS + OTHER_PAIRS if a in kinds and b in kinds]
    counts = sorted(c for c in by_count if c is not None)
    for kind in sorted({k for c in counts for k in by_count[c]}):
        have = [by_count[c][kind] for c in counts if kind in by_count[c]]
        pairs += list(zip(have, have[1:]))
    return pairs


def compare(a: dict, b: dict, higher_better: bool) -> Optional[dict]:
    """One metric of rows A and B ({"mean", "std", "values"}): Δ, Δ / s_pooled, the t threshold and
    the verdict of :data:`RULE`; None without two seeds on each side."""
    from scipy import stats

    na, nb = len(a.get("values", [])), len(b.get("values", []))
    if na < 2 or nb < 2:
        return None
    delta = b["mean"] - a["mean"]
    pooled = math.sqrt(((na - 1) * a["std"] ** 2 + (nb - 1) * b["std"] ** 2) / (na + nb - 2))
    threshold = float(stats.t.ppf(1 - SIGNIFICANCE / 2, na + nb - 2)) * math.sqrt(1 / na + 1 / nb)
    units = delta / pooled if pooled > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    if abs(units) <= threshold:
        verdict = "within noise"
    else:
        verdict = "better" if (delta > 0) == higher_better else "worse"
    return {"delta": delta, "pooled_std": pooled, "units": units, "threshold": threshold, "verdict": verdict,
            "n": (na, nb)}


def format_report(doc: dict, extra: Optional[list[tuple[str, str]]] = None) -> str:
    """Every default pair (:func:`default_pairs`) and ``extra``: per metric A, B, Δ, Δ in pooled seed
    spreads, the verdict; the rule once at the top."""
    rows = doc["rows"]
    labels = {**LABELS, **{k: v.get("label", k) for k, v in (doc.get("variants") or {}).items()}}
    for a, b in extra or []:
        for n in (a, b):
            if n not in rows or n == "copy_reference":
                known = ", ".join(sorted(set(rows) - {"copy_reference"}))
                raise ConfigError(f"--pairs: no row {n!r} in the table (rows: {known})")
    pairs = list(dict.fromkeys(default_pairs(doc) + list(extra or [])))
    lines = [RULE, ""]
    for a, b in pairs:
        lines += [f"**{labels.get(a, a)} → {labels.get(b, b)}** (`{a}` → `{b}`)", "",
                  "| metric | A | B | Δ (B − A) | Δ / s_pooled | verdict |", "|---|---|---|---|---|---|"]
        for key, head, up in COLUMNS:
            if key not in rows[a] or key not in rows[b]:
                continue
            ra, rb = rows[a][key], rows[b][key]
            c = compare(ra, rb, up)
            cell = (lambda r: f"{r['mean']:.4f} ± {r['std']:.4f}")
            if c is None:
                lines.append(f"| {head} {'↑' if up else '↓'} | {cell(ra)} | {cell(rb)} | "
                             f"{rb['mean'] - ra['mean']:+.4f} | | too few seeds |")
                continue
            lines.append(f"| {head} {'↑' if up else '↓'} | {cell(ra)} | {cell(rb)} | {c['delta']:+.4f} | "
                         f"{c['units']:+.2f} (threshold {c['threshold']:.2f}) | {c['verdict']} |")
        lines.append("")
    if not pairs:
        lines.append("No pair of rows to compare (give --pairs A:B).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command

def ablate(base: str, variants: list[str], seeds: int, out: str | Path, overrides: Optional[list[str]] = None,
           split: Optional[str] = None, figure_pairs: int = 4, device=None,
           descriptors: Optional[list[int]] = None) -> dict:
    """Run (or resume) the ablation; returns table.json's content. ``descriptors``: Fig. 4's sweep,
    every variant once per count (rows ``<variant>_d<count>``; see :func:`make_variants`)."""
    import torch

    out = Path(out)
    overrides = list(overrides or [])
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    rows, skipped = make_variants(variants, descriptors)
    for name, why in skipped.items():
        log.warning("skipping %s: %s", name, why)
    if not rows:
        raise ConfigError("nothing to train: every variant was skipped (" + "; ".join(skipped.values()) + ")")
    finals, order = plan(base, rows, seeds, out, overrides)
    jobs = {j.name: j for j in order}
    _check_variants(finals, jobs, {v.name: v.kind for v in rows})
    info = {v.name: {"label": v.label, "kind": v.kind, "descriptors": v.descriptors} for v in rows}
    out.mkdir(parents=True, exist_ok=True)
    plan_doc = {"base": str(base), "variants": [v.name for v in rows], "seeds": seeds, "overrides": overrides,
                "descriptors": descriptors, "skipped": skipped,
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
            table = write_table(out, finals, jobs, scores, seeds, split, walls, info, skipped)
            if seed == 0 and all(0 in scores[v] for v in finals):
                make_figure(finals, jobs, out / "figure.png", split, figure_pairs,
                            {v: i["label"] for v, i in info.items()})
                if descriptors is not None:
                    make_descriptor_figure(finals, jobs, info, out / "figure_descriptors.png", split, figure_pairs)
    except KeyboardInterrupt:
        if _Child.proc is not None:
            _Child.proc.terminate()
            _Child.proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("wrote %s, %s and %s", out / "table.md", out / "table.json", out / "figure.png")
    return table


def _check_variants(finals: dict, jobs: dict[str, Job], kinds: Optional[dict] = None) -> None:
    """A variant whose overlay is named *_ld must run the local discriminators at its top stage."""
    from hptransfer import losses

    for variant, by_seed in finals.items():
        cfg = jobs[by_seed[0]].cfg
        top = cfg.stages[-1].resolution
        adv = losses.active_terms(cfg.loss, top)["adv"]
        if (kinds or {}).get(variant, variant).endswith("_ld") and not adv:
            raise ConfigError(f"variant {variant}: no local discriminators at its top stage ({top} px): the config "
                              f"has loss.disc_at_resolution={cfg.loss.disc_at_resolution}, "
                              f"loss.adv_weight={cfg.loss.adv_weight}")


def write_table(out: Path, finals: dict, jobs: dict[str, Job], scores: dict, seeds: int, split: str,
                walls: dict, info: Optional[dict] = None, skipped: Optional[dict] = None) -> dict:
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
    if skipped:
        note += " Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."
    info = info or {v: {"label": LABELS.get(v, v), "kind": v, "descriptors": None} for v in finals}
    doc = {"split": split, "seeds": seeds, "rows": rows, "variants": info, "skipped": skipped or {},
           "stages_and_terms": terms, "job_wall_s": walls,
           "total_train_wall_s": round(total_wall, 1), "columns": {k: h for k, h, _ in COLUMNS}}
    atomic_write_text(out / "table.json", json.dumps(doc, indent=1))
    atomic_write_text(out / "table.md", format_markdown(rows, seeds, note, {v: i["label"] for v, i in info.items()}))
    atomic_write_text(out / "report.md", format_report(doc))
    return doc


def run(args) -> int:
    out = Path(args.out)
    if args.report:
        if args.base or args.variants or args.descriptors or args.overrides:
            raise ConfigError("--report reads OUT/table.json and trains nothing: drop --base, --variants, "
                              "--descriptors and overrides")
        table = out / "table.json"
        if not table.is_file():
            raise ConfigError(f"{table}: no ablation table here (run hptransfer ablate --base ... --out {out} first)")
        text = format_report(json.loads(table.read_text()), parse_pairs(args.pairs))
        atomic_write_text(out / "report.md", text)
        print(text)
        return 0
    if args.pairs:
        raise ConfigError("--pairs goes with --report")
    if not args.base:
        raise ConfigError("--base is required (or --report to compare the rows of an existing table)")
    descriptors = parse_counts(args.descriptors) if args.descriptors else None
    names = args.variants or (DEFAULT_SWEEP_VARIANTS if descriptors else DEFAULT_VARIANTS)
    variants = [v.strip() for v in names.split(",") if v.strip()]
    if not variants:
        raise ConfigError("--variants is empty")
    ablate(args.base, variants, args.seeds, out, args.overrides, args.split, args.figure_pairs, args.device,
           descriptors)
    print((out / "table.md").read_text())
    print((out / "report.md").read_text())
    print(f"figure: {out / 'figure.png'}" + (f", {out / 'figure_descriptors.png'}" if descriptors else ""))
    return 0
