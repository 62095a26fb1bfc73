"""``hptransfer data synth``: its options and its run."""
from __future__ import annotations

from hptransfer.data.synth.renderer import FRAMINGS
from hptransfer.data.synth.skeleton import VIEW_ORDER, VIEWS
from hptransfer.data.synth.write import MAX_SIZE, MIN_SIZE, synthesize


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--identities", type=int, default=50)
    parser.add_argument("--poses", type=int, default=6, help="images (poses) per identity")
    parser.add_argument("--size", type=int, default=256, help=f"image side in pixels ({MIN_SIZE}..{MAX_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of identities in the test split")
    parser.add_argument("--max-pairs", type=int, default=None, help="cap on pairs per identity (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--views", default=",".join(VIEW_ORDER),
                        help=f"comma-separated views the poses cycle through (of {', '.join(VIEWS)})")
    parser.add_argument("--framing", choices=FRAMINGS, default="random",
                        help="random: random scale/shift and some upper-body crops; centred: whole figure, fixed scale")


def run(args) -> int:
    res = synthesize(args.out, args.identities, args.poses, args.size, seed=args.seed,
                     test_fraction=args.test_fraction, max_pairs_per_identity=args.max_pairs, workers=args.workers,
                     views=tuple(v.strip() for v in args.views.split(",") if v.strip()), framing=args.framing)
    for split, c in res["splits"].items():
        print(f"{split:5s}: {c['identities']} identities, {c['images']} images, {c['pairs']} pairs")
    n = sum(c["images"] for c in res["splits"].values())
    print(f"wrote {args.out} in {res['seconds']:.1f} s ({n / max(res['seconds'], 1e-9):.1f} images/s)")
    return 0
