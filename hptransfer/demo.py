"""``hptransfer demo`` (behind ``make demo``): the whole method end to end on the CPU in minutes.

1. synthesize a small people dataset in ``--data`` unless one is there (``hptransfer.data`` synth);
2. train ``configs/synth_demo.yaml`` (64 -> 128 px, reduced width, local discriminators at 128);
3. evaluate the exported generator on the test split (``hptransfer.evaluate``: SSIM under both
   protocols, MS-SSIM where the image size allows, local-SSIM, and on synthetic data the
   pose-following errors ``vacated_l1`` / ``new_body_l1``) next to the copy-the-reference baseline;
4. print where the sample grids, the export and the log are.

``hptransfer demo --garment`` (behind ``make demo-garment``): garment transfer (section 4.5) end to end:
the dataset gets its parsing maps, the main demo's transfer export is reused (``--transfer``, default
``<--out>/export``; without it a small 64-px stand-in is trained first and the demo says so), a small
appearance flow network trains on the synthetic people (``configs/garment_flow.yaml``, the same
trainer), the pipeline runs once with ``--steps``, and the try-on table (ours vs the best affine
paste vs the transfer network alone, on exact "A wearing B's garment" renders of held-out people)
and the figure ``garment_grid.png`` are written to ``--garment-out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


log = logging.getLogger("hptransfer.demo")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synth_demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/synth_demo", help="dataset directory (synthesized when absent)")
    parser.add_argument("--out", default="runs/synth_demo", help="run directory")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: configs/synth_demo.yaml)")
    parser.add_argument("--identities", type=int, default=40, help="synthetic identities when synthesizing")
    parser.add_argument("--poses", type=int, default=6, help="poses per identity when synthesizing")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side in pixels")
    parser.add_argument("--views", default="front,three-quarter",
                        help="views the synthetic poses cycle through (hptransfer data synth --views)")
    parser.add_argument("--framing", default="centred", choices=("centred", "random"),
                        help="synthetic framing (hptransfer data synth --framing)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume the demo run (auto; the default when --out holds checkpoints)")
    parser.add_argument("--overwrite", action="store_true", help="train afresh, deleting the checkpoints in --out")
    parser.add_argument("--garment", action="store_true",
                        help="the garment transfer demo instead (make demo-garment): flow network + try-on pipeline")
    parser.add_argument("--garment-out", default="runs/garment_demo", help="--garment: its run directory")
    parser.add_argument("--transfer", default=None,
                        help="--garment: transfer export to reuse (default: <--out>/export, the main demo's)")
    parser.add_argument("--flow-iterations", type=int, default=300, help="--garment: flow network iterations")
    parser.add_argument("--transfer-iterations", type=int, default=150,
                        help="--garment: iterations of the 64-px stand-in transfer network (only without an export)")
    parser.add_argument("--pairs", type=int, default=16, help="--garment: held-out try-on pairs to score")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def _has_dataset(root: Path) -> bool:
    return all((root / f).is_file() for f in ("annotations-train.csv", "pairs-train.csv", "annotations-test.csv",
                                               "pairs-test.csv"))


def synthesize(root: Path, identities: int, poses: int, size: int, seed: int = 0,
               views: tuple = ("front", "three-quarter"), framing: str = "centred") -> None:
    """Write a synthetic people dataset in the benchmark format (hptransfer.data's generator).

    The demo's default is the easy end of the generator (front and three-quarter views, whole
    figures at a fixed scale, as in DeepFashion) so that a few CPU minutes of training show the
    person following the target pose; ``hptransfer data synth`` makes the harder mixes."""
    from hptransfer.data import synth

    synth.synthesize(root, identities=identities, poses=poses, size=size, seed=seed, views=views, framing=framing)


def _evaluate(export_dir: Path, data_root: Path, split: str) -> dict:
    """SSIM (both protocols), MS-SSIM where the size allows, local-SSIM: model vs copy-the-reference."""
    from hptransfer.data.synth import PARAMS_FILE
    from hptransfer.evaluate import evaluate_export, pose_following

    scored = evaluate_export(export_dir, data_root, split)
    flat = {}
    for who, results in scored.items():
        for name, r in results.items():
            flat[f"{who}/{name}"] = r.get("value", f"unavailable ({r.get('unavailable')})")
            flat["pairs"] = r.get("n", flat.get("pairs"))
    if (data_root / PARAMS_FILE).is_file():  # synthetic data: body masks say whether the pose was followed
        following = pose_following(export_dir, data_root, split)
        for who in ("model", "copy_reference"):
            for name, v in following[who].items():
                flat[f"{who}/{name}"] = v
    return flat


def run(args: argparse.Namespace) -> int:
    from hptransfer import checkpoint as ckpt
    from hptransfer.config import load_config

    if args.garment:
        return run_garment(args)
    t0 = time.perf_counter()
    data, out = Path(args.data), Path(args.out)
    if _has_dataset(data):
        print(f"[demo] using the dataset in {data}")
    else:
        views = tuple(v.strip() for v in args.views.split(",") if v.strip())
        print(f"[demo] synthesizing {args.identities} identities x {args.poses} poses at {args.size} px "
              f"({', '.join(views)} views, {args.framing} framing) into {data}")
        synthesize(data, args.identities, args.poses, args.size, views=views, framing=args.framing)
    cfg = load_config(args.config, [f"data.root={data}", f"train.out_dir={out}", *args.overrides])
    print(f"[demo] training {args.config}: stages {[s.resolution for s in cfg.stages]} px, width {cfg.model.width} "
          f"(the paper uses 1.0), VGG weights: {cfg.loss.vgg_weights or 'ImageNet'}; log: {out / 'train.log'}")
    resume = args.resume
    if resume is None and not args.overwrite and ckpt.find_latest(out / "checkpoints") is not None:
        resume = "auto"  # a rerun (make demo twice) continues the run, or re-evaluates a finished one
        print(f"[demo] {out} holds checkpoints: resuming from the latest (--overwrite to train afresh)")
    t_train = time.perf_counter()
    result = _train(cfg, resume=resume, overwrite=args.overwrite)
    t_train = time.perf_counter() - t_train
    metrics = _evaluate(Path(result["export"]), data, cfg.data.test_split)
    metrics.update({"train_seconds": round(t_train, 1), "total_seconds": round(time.perf_counter() - t0, 1),
                    "skipped_steps": result["skipped"]})
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=1))
    grids = sorted((out / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
    print(result["summary"])
    print(f"[demo] test split ({metrics.get('pairs', '?')} pairs): " +
          ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print(f"[demo] sample grids (reference | target pose | generated | ground truth): {out / 'samples'}"
          + (f", last: {grids[-1]}" if grids else ""))
    print(f"[demo] export: {result['export']} (load with hptransfer.load_generator)")
    print(f"[demo] done in {metrics['total_seconds']:.0f} s")
    return 0


def _train(cfg, **kwargs) -> dict:
    """``train.train``, but a run stopped by SIGTERM/SIGUSR1 (checkpoint written) ends the demo with the
    trainer's preemption status instead of evaluating an unfinished run; rerunning the demo resumes it."""
    from hptransfer.distributed.signals import EXIT_PREEMPTED
    from hptransfer.train import train

    result = train(cfg, **kwargs)
    if result.get("preempted"):
        print(f"[demo] stopped by {result['preempted']} after a checkpoint; run the same command again to resume")
        raise SystemExit(EXIT_PREEMPTED)
    return result


GARMENT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "garment_flow.yaml"


def run_garment(args: argparse.Namespace) -> int:
    """The garment transfer demo (see the module docstring)."""
    from hptransfer.config import load_config
    from hptransfer.data.synth import PARSING_DIR
    from hptransfer.export import load_generator
    from hptransfer.flow_task import load_flow
    from hptransfer.garment_eval import evaluate_tryon, format_table, save_figure

    t0 = time.perf_counter()
    data, out = Path(args.data), Path(args.garment_out)
    views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    if not (_has_dataset(data) and (data / PARSING_DIR).is_dir()):  # same seed: same images, plus parsing maps
        print(f"[demo] synthesizing {args.identities} identities x {args.poses} poses at {args.size} px with parsing "
              f"maps into {data}")
        synthesize(data, args.identities, args.poses, args.size, views=views, framing=args.framing)
    transfer_dir = Path(args.transfer) if args.transfer else Path(args.out) / "export"
    if not (transfer_dir / "model.safetensors").is_file():
        transfer_dir = out / "transfer" / "export"
        print(f"[demo] no transfer export in {args.transfer or Path(args.out) / 'export'} (run `make demo` first for "
              f"the real one); training a small 64-px stand-in into {transfer_dir.parent}")
        cfg = load_config(DEFAULT_CONFIG, [f"data.root={data}", f"train.out_dir={out / 'transfer'}",
                                           f"stages=[{{resolution: 64, iterations: {args.transfer_iterations}, "
                                           "batch_size: 8}]",
                                           "loss.disc_at_resolution=1024"])
        _train(cfg, resume="auto")
    else:
        print(f"[demo] reusing the transfer network in {transfer_dir}")
    t_flow = time.perf_counter()
    cfg = load_config(GARMENT_CONFIG, [f"data.root={data}", f"train.out_dir={out / 'flow'}",
                                       f"stages.0.iterations={args.flow_iterations}",
                                       # an untrained VGG is not perceptual, and on the CPU it is ~40% of a step
                                       "flow.perceptual_weight=0", *args.overrides])
    print(f"[demo] training the appearance flow network ({GARMENT_CONFIG.name}, {args.flow_iterations} iterations "
          f"at {cfg.stages[0].resolution} px); log: {out / 'flow' / 'train.log'}")
    result = _train(cfg, resume="auto")
    t_flow = time.perf_counter() - t_flow
    transfer, flow = load_generator(transfer_dir), load_flow(result["export"])

    # the pipeline once, as a user runs it, with every intermediate written
    from hptransfer import garment
    from hptransfer.data import read_annotations

    names = sorted(read_annotations(data / f"annotations-{cfg.data.test_split}.csv"))
    person, wearer = names[0], next(n for n in names if n[:11] != names[0][:11])
    steps_dir = out / "steps"
    cli = argparse.Namespace(person=str(data / "images" / person), garment=str(data / "images" / wearer),
                             transfer=str(transfer_dir), flow=str(result["export"]), person_pose=None,
                             garment_pose=None, person_parsing=None, garment_parsing=None, parsing_numbering="lip",
                             parser=None, parser_weights=None, synthetic=str(data), pose_frontal="builtin",
                             back_to_pose=True, feather=None, steps=str(steps_dir), out=str(out / "tryon.png"))
    garment.run(cli)

    t_eval = time.perf_counter()
    res = evaluate_tryon(transfer, flow, data, cfg.data.test_split, count=args.pairs)
    t_eval = time.perf_counter() - t_eval
    figure = save_figure(res, out / "garment_grid.png")
    metrics = {"scores": res["scores"], "pairs": res["pairs"], "resolution": res["resolution"],
               "transfer": str(transfer_dir), "flow": str(result["export"]), "flow_train_seconds": round(t_flow, 1),
               "eval_seconds": round(t_eval, 1), "total_seconds": round(time.perf_counter() - t0, 1)}
    (out / "garment_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(format_table(res["scores"]))
    print(f"[demo] {res['pairs']} held-out try-on pairs at {res['resolution']} px; figure (person | garment | ours | "
          f"affine | transfer alone | ground truth): {figure}")
    print(f"[demo] pipeline intermediates: {steps_dir}; result: {out / 'tryon.png'}")
    print(f"[demo] done in {metrics['total_seconds']:.0f} s (flow training {t_flow:.0f} s, scoring {t_eval:.0f} s)")
    return 0
