"""``hptransfer garment``: garment transfer / virtual try-on (paper section 4.5, Fig. 9).

What is the paper's and what is ours (docs/garment.md): the paper gives the two steps (dis-occlude the
person with the transfer network into a pre-defined frontal pose, then an appearance flow network),
the flow network's inputs (the garment image, the reference and target pose masks, from a human
parsing network) and the bilinear sampling layer. Ours: the pose heatmaps as extra flow inputs, the
flow network's pyramid, losses and training pairs (:mod:`hptransfer.models.appearance_flow`), the
feathered composite (step 4), ``--back-to-pose`` (step 5), carrying a parsing map bone by bone
(:func:`transport_labels`) and the synthetic parsing maps.

Person P (image + pose) and a garment photo G (someone else wearing it, + pose and parsing):

1. **dis-occlude**: the transfer network moves P to a pre-defined frontal pose F, where nothing
   hides the torso (``--pose-frontal builtin``: :func:`hptransfer.data.synth.frontal_keypoints`; or a
   pose file);
2. **parse**: G's upper-garment mask (``--garment-parsing`` label PNG, the synthetic generator's map,
   or a plugged ``--parser``) and P's garment region in the frontal pose (clothes and arms): the
   parser run on the frontal image, the synthetic generator's exact frontal map, or P's own map
   (``--person-parsing``) carried to the frontal pose bone by bone (:func:`transport_labels`);
3. **warp**: the appearance flow network predicts a flow from G's garment, its mask and the target
   region (the paper's inputs; both poses' heatmaps are ours); the bilinear sampling layer warps the garment;
4. **composite** (ours): the warped garment replaces P's pixels under a feathered mask (the warped mask
   inside the region);
5. ``--back-to-pose`` (ours): the transfer network returns the result to P's own pose.

``--steps DIR`` writes every intermediate (frontal person, masks, flow as a colour wheel, warped
garment, alpha, composite) so a person can see where a result went wrong. Inputs are fitted to the
transfer network's resolution R as in training; the flow network runs at R (its weights are
resolution-free). A garment map without a garment class, an all-background map, or a person without
a pose is an error naming the file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hptransfer.errors import InputError

log = logging.getLogger(__name__)

# Bones that carry the garment region to another pose: (name, keypoint a, keypoint b) in OpenPose-18.
LIMBS = (("r_upper_arm", 2, 3), ("r_forearm", 3, 4), ("l_upper_arm", 5, 6), ("l_forearm", 6, 7))
TORSO = (1, 2, 5, 8, 11)  # neck, shoulders, hips: the torso's affine fit
NEEDED = {"neck": (1,), "a shoulder": (2, 5), "a hip": (8, 11)}


def check_pose(kp, source) -> None:
    """A pose the pipeline can use: neck, a shoulder and a hip visible; else an InputError naming ``source``."""
    kp = np.asarray(kp)
    vis = (kp >= 0).all(axis=-1)
    lacking = [what for what, idx in NEEDED.items() if not vis[list(idx)].any()]
    if lacking:
        raise InputError(f"{source}: no usable person pose (missing {', '.join(lacking)}; "
                         f"{int(vis.sum())} of 18 keypoints visible)")


# ---------------------------------------------------------------- masks

def feather(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) mask blurred by a Gaussian of ``sigma`` px (soft edges for compositing)."""
    if sigma <= 0:
        return mask
    r = max(1, int(round(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=mask.dtype, device=mask.device)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = k / k.sum()
    m = F.conv2d(F.pad(mask, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1)).clamp(0, 1)


def dilate(mask: torch.Tensor, px: int = 1) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * px + 1, stride=1, padding=px) if px > 0 else mask


def _similarity(a0, a1, b0, b1) -> np.ndarray:
    """2x3 matrix of the similarity (rotation, scale, shift) taking segment a0-a1 onto b0-b1 ((x, y) points)."""
    da, db = a1 - a0, b1 - b0
    za, zb = complex(*da), complex(*db)
    z = zb / za if abs(za) > 1e-6 else 1.0
    m = np.array([[z.real, -z.imag], [z.imag, z.real]])
    return np.concatenate([m, (b0 - m @ a0)[:, None]], 1)


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = b - a
    t = np.clip(((p - a) @ d) / max(float(d @ d), 1e-9), 0, 1)
    return np.linalg.norm(p - (a + t[:, None] * d), axis=1)


def transport_labels(mask: np.ndarray, kp_src, kp_dst) -> np.ndarray:
    """Carry a garment-region mask (R, R) bool from the pose ``kp_src`` to ``kp_dst`` ((18, 2) (y, x)),
    bone by bone: each destination pixel takes the nearest of torso / upper arms / forearms in the
    destination pose and reads the source mask through that bone's transform (torso: least-squares
    affine of neck, shoulders and hips; limbs: the similarity of their two joints). Needs no parser;
    exact for rigid parts, approximate where a sleeve bends at the elbow."""
    R = mask.shape[0]
    src, dst = np.asarray(kp_src, np.float64)[:, ::-1], np.asarray(kp_dst, np.float64)[:, ::-1]  # (x, y)
    vis = (np.asarray(kp_src) >= 0).all(1) & (np.asarray(kp_dst) >= 0).all(1)
    ys, xs = np.mgrid[0:R, 0:R]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    dists, mats = [], []
    torso = [i for i in TORSO if vis[i]]
    if len(torso) >= 3:
        A = np.concatenate([dst[torso], np.ones((len(torso), 1))], 1)
        sol, *_ = np.linalg.lstsq(A, src[torso], rcond=None)  # dst -> src
        mats.append(sol.T)
        poly = dst[torso]
        c = poly.mean(0)
        dists.append(np.maximum(np.linalg.norm(pts - c, axis=1) - 0.5 * np.linalg.norm(poly - c, axis=1).max(), 0))
    for _, a, b in LIMBS:
        if vis[a] and vis[b]:
            mats.append(_similarity(dst[a], dst[b], src[a], src[b]))
            dists.append(_seg_dist(pts, dst[a], dst[b]))
    if not mats:
        return np.zeros_like(mask, bool)
    nearest = np.argmin(np.stack(dists), 0)
    out = np.zeros(R * R, bool)
    for k, m in enumerate(mats):
        sel = nearest == k
        q = np.rint(pts[sel] @ m[:, :2].T + m[:, 2]).astype(int)
        ok = (q[:, 0] >= 0) & (q[:, 0] < R) & (q[:, 1] >= 0) & (q[:, 1] < R)
        idx = np.flatnonzero(sel)[ok]
        out[idx] = mask[q[ok, 1], q[ok, 0]]
    return out.reshape(R, R)


# ---------------------------------------------------------------- the pipeline

@torch.no_grad()
def try_on(transfer, flow, person: torch.Tensor, kp_person: torch.Tensor, garment: torch.Tensor,
           kp_garment: torch.Tensor, garment_mask: torch.Tensor, kp_frontal: torch.Tensor,
           region_of: Callable[[torch.Tensor], torch.Tensor], back_to_pose: bool = False,
           feather_sigma: Optional[float] = None, person_frontal: Optional[torch.Tensor] = None) -> dict:
    """Batched try-on at the transfer network's resolution R. Images (B, 3, R, R) in [-1, 1], keypoints
    (B, 18, 2) (y, x) at R, ``garment_mask`` (B, 1, R, R) 0/1; ``region_of(person_frontal)`` -> the
    person's garment region in the frontal pose (B, 1, R, R). Returns every intermediate:
    person_frontal, region, garment (masked), flow, warped, warped_mask, alpha, composite (frontal) and,
    with ``back_to_pose``, result (P's pose); else result = composite. ``person_frontal`` given (e.g. an
    exact synthetic rendering) replaces step 1's transfer network; ``transfer`` may then be None."""
    from hptransfer.export import generate

    R = person.shape[-1]
    flow.resolution = R
    if person_frontal is None:
        person_frontal = generate(transfer, person, kp_frontal)
    region = region_of(person_frontal).to(person.dtype)
    p = next(flow.parameters())
    g = garment * garment_mask
    out = flow(g.to(p.device), garment_mask.to(p.device), region.to(p.device), kp_garment.to(p.device),
               kp_frontal.to(p.device))
    wm = out["warped_mask"].clamp(0, 1).cpu()
    # un-premultiply: bilinear sampling mixed the garment's edge with the zeros outside its mask
    warped = (out["warped"].cpu() / wm.clamp_min(1e-3)).clamp(-1, 1) * (wm > 1e-3)
    sigma = R / 128 if feather_sigma is None else feather_sigma
    alpha = feather(((wm > 0.5) & (dilate(region, max(1, R // 128)) > 0.5)).to(person.dtype), sigma)
    composite = person_frontal * (1 - alpha) + warped * alpha
    steps = {"person_frontal": person_frontal, "region": region, "garment": g, "garment_mask": garment_mask,
             "flow": out["flow"].cpu(), "warped": warped, "warped_mask": wm, "alpha": alpha, "composite": composite}
    steps["result"] = generate(transfer, composite, kp_person) if back_to_pose else composite
    return steps


def write_steps(steps: dict, directory, index: int = 0) -> list[Path]:
    """One PNG per intermediate of image ``index`` (masks in grey, the flow as a colour wheel)."""
    from PIL import Image

    from hptransfer.flow_task import flow_to_color, image_to_rgb, mask_to_rgb
    from hptransfer.infer import save_image

    directory = Path(directory)
    paths = []
    for i, (name, t) in enumerate(steps.items()):
        x = t[index]
        if name == "flow":
            pic = Image.fromarray(flow_to_color(x))
        elif x.shape[0] == 1:
            pic = Image.fromarray(mask_to_rgb(x))
        else:
            pic = Image.fromarray(image_to_rgb(x))
        path = directory / f"{i:02d}_{name}.png"
        save_image(pic, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- inputs

def region_tensor(labels: np.ndarray, numbering: str) -> torch.Tensor:
    from hptransfer.data.parsing import GARMENT_REGION, mask_of

    return torch.from_numpy(mask_of(labels, numbering, GARMENT_REGION).astype(np.float32))[None]


class _Inputs:
    """One image fitted to R with its pose and (optional) parsing map, every error naming its file."""

    def __init__(self, image_path, R: int, pose_source: Optional[str], parsing: Optional[str], numbering: str,
                 synthetic: Optional[Path]):
        from hptransfer.data.dataset import fit_image, fit_keypoints, load_image, to_tensor
        from hptransfer.data.garment_pairs import fit_labels, parsing_path
        from hptransfer.data.parsing import read_parsing

        self.path = Path(image_path)
        img = load_image(self.path)
        self.size = (img.height, img.width)
        self.image = to_tensor(fit_image(img, R))
        self.name = self.path.name
        if pose_source is None and synthetic is not None:
            pose_source = f"{_annotation_file(synthetic, self.name)}:{self.name}"
        if pose_source is None:
            raise InputError(f"{self.path}: no pose given (--person-pose / --garment-pose, or --synthetic ROOT)")
        from hptransfer.infer import read_pose

        kp, est = read_pose(pose_source)
        check_pose(kp, f"{self.path} (pose {pose_source})")
        size = est or self.size
        self.kp = torch.from_numpy(fit_keypoints(kp, size[0], size[1], R))
        if parsing is None and synthetic is not None:
            parsing = str(parsing_path(synthetic, self.name))
            numbering = "lip"
        self.numbering = numbering
        self.labels = None
        if parsing is not None:
            self.labels = fit_labels(read_parsing(parsing, numbering, self.size), R)
            self.parsing = parsing


def _annotation_file(root: Path, name: str) -> Path:
    from hptransfer.data import read_annotations

    for split in ("train", "test"):
        p = root / f"annotations-{split}.csv"
        if p.is_file() and name in read_annotations(p):
            return p
    raise InputError(f"{name}: not an image of the synthetic dataset {root} (no annotation row)")


def _identity_of(name: str) -> int:
    if not (name.startswith("person") and name[6:11].isdigit()):
        raise InputError(f"{name}: not a synthetic image name (personNNNNN_PP_view.jpg)")
    return int(name[6:11])


def synthetic_frontal(root: Path, name: str, R: int):
    """(frontal kp at R, frontal labels at R) of a synthetic image's identity, rendered exactly."""
    import json

    from hptransfer.data import synth
    from hptransfer.data.dataset import fit_keypoints
    from hptransfer.data.garment_pairs import fit_labels

    params = json.loads((root / synth.PARAMS_FILE).read_text())
    _, kp, labels = synth.render_frontal(params["seed"], _identity_of(name), params["size"])
    S = params["size"]
    return torch.from_numpy(fit_keypoints(kp, S, S, R)), fit_labels(labels, R)


REAL_PHOTOS = """On real photos (nothing below is shipped; docs/own-data.md, "Garment transfer"):
  1. a transfer network trained on photos like these (hptransfer train, its export/);
  2. an appearance-flow network (hptransfer train --config configs/garment_flow.yaml, a
     task: garment_flow run's export/; that config trains on synthetic people, whose parsing
     maps are exact: on real photos it needs a dataset with parsing maps under parsing/);
  3. human-parsing label maps of both photos from an outside parser, at each photo's size,
     8-bit class numbers: SCHP (Self-Correction-Human-Parsing, simple_extractor.py --dataset
     lip or atr: palette PNGs, read as they are) or CIHP_PGN (test_pgn.py: the grey <id>.png in
     output/cihp_parsing_maps, with --parsing-numbering cihp; not the coloured <id>_vis.png);
     SCHP's pascal model has no garment classes. Or --parser module:Class with local weights;
  4. poses with a neck, a shoulder and a hip (a JSON, a CSV row, or MediaPipe on the photo);
  5. photos framed like the training data: one standing person, whole or upper body."""


def add_arguments(p) -> None:
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = ("Garment transfer / virtual try-on (paper section 4.5): person P wearing the upper garment of "
                     "the photo G. Needs a trained flow network and parsing maps from an outside parser.")
    p.epilog = REAL_PHOTOS
    p.add_argument("--person", required=True, help="image of the person P")
    p.add_argument("--garment", required=True, help="image of someone wearing the garment G")
    p.add_argument("--transfer", required=True, help="transfer network export (hptransfer train ... export/)")
    p.add_argument("--flow", required=True, help="appearance flow export (a task: garment_flow run's export/)")
    p.add_argument("--person-pose", default=None, help="P's pose: CSV:NAME, OpenPose/COCO JSON, or image")
    p.add_argument("--garment-pose", default=None, help="G's pose (same forms)")
    p.add_argument("--person-parsing", default=None, help="P's parsing label PNG (carried to the frontal pose)")
    p.add_argument("--garment-parsing", default=None, help="G's parsing label PNG")
    p.add_argument("--parsing-numbering", default="lip", choices=("lip", "cihp", "atr"))
    p.add_argument("--parser", default=None, help="plugged parser module:Class (run on G and the frontal P)")
    p.add_argument("--parser-weights", default=None, help="local weights file for --parser (never downloaded)")
    p.add_argument("--synthetic", default=None, metavar="ROOT",
                   help="images come from this synthetic dataset: poses, parsing maps and P's exact frontal map")
    p.add_argument("--pose-frontal", default="builtin", help="builtin, or a pose file for the frontal pose")
    p.add_argument("--back-to-pose", action="store_true", help="return the result to P's own pose")
    p.add_argument("--feather", type=float, default=None, help="composite edge softness in px (default R/128)")
    p.add_argument("--steps", default=None, metavar="DIR", help="write every intermediate image here")
    p.add_argument("--out", required=True, help="output image (.png)")


def run(args) -> int:
    from hptransfer.data import synth
    from hptransfer.data.parsing import garment_masks, load_parser, run_parser
    from hptransfer.export import load_generator
    from hptransfer.flow_task import load_flow
    from hptransfer.infer import read_pose, save_image

    transfer = load_generator(args.transfer)
    flow = load_flow(args.flow)
    R = transfer.resolution
    if R % (2 ** flow.levels):
        raise InputError(f"{args.flow}: a {flow.levels}-level flow network needs R divisible by {2 ** flow.levels}")
    root = Path(args.synthetic) if args.synthetic else None
    parser = load_parser(args.parser, args.parser_weights) if args.parser else None
    person = _Inputs(args.person, R, args.person_pose, args.person_parsing, args.parsing_numbering, root)
    garment = _Inputs(args.garment, R, args.garment_pose, args.garment_parsing, args.parsing_numbering, root)
    if garment.labels is None and parser is not None:
        from hptransfer.metrics import to_uint8
        img = to_uint8(garment.image[None])[0].permute(1, 2, 0).numpy()
        garment.labels, garment.numbering = run_parser(parser, img, str(garment.path)), parser.numbering
        garment.parsing = f"{garment.path} (parser)"
    if garment.labels is None:
        raise InputError(f"{garment.path}: no parsing map (--garment-parsing, --parser or --synthetic)")
    upper, _ = garment_masks(garment.labels, garment.numbering, garment.parsing)

    frontal_labels = None
    if args.pose_frontal != "builtin":
        kp_f, est = read_pose(args.pose_frontal)
        check_pose(kp_f, args.pose_frontal)
        from hptransfer.data.dataset import fit_keypoints
        kp_frontal = torch.from_numpy(fit_keypoints(kp_f, *(est or (R, R)), R))
    elif root is not None:  # the person's own proportions in the frontal pose, and its exact map there
        kp_frontal, frontal_labels = synthetic_frontal(root, person.name, R)
    else:
        kp_frontal = torch.from_numpy(synth.frontal_keypoints(R))

    def region_of(person_frontal: torch.Tensor) -> torch.Tensor:
        if parser is not None:
            from hptransfer.metrics import to_uint8
            img = to_uint8(person_frontal[:1])[0].permute(1, 2, 0).numpy()
            return region_tensor(run_parser(parser, img, f"{person.path} (frontal)"), parser.numbering)[None]
        if frontal_labels is not None and args.pose_frontal == "builtin":
            return region_tensor(frontal_labels, "lip")[None]
        if person.labels is None:
            raise InputError(f"{person.path}: P's garment region needs --person-parsing, --parser or --synthetic")
        reg = region_tensor(person.labels, person.numbering)[0].numpy() > 0.5
        if not reg.any():
            raise InputError(f"{person.parsing}: no clothes or arms in P's parsing map")
        moved = transport_labels(reg, person.kp.numpy(), kp_frontal.numpy())
        return torch.from_numpy(moved.astype(np.float32))[None, None]

    gm = torch.from_numpy(upper.astype(np.float32))[None, None]
    steps = try_on(transfer, flow, person.image[None], person.kp[None], garment.image[None], garment.kp[None], gm,
                   kp_frontal[None], region_of, back_to_pose=args.back_to_pose, feather_sigma=args.feather)
    save_image(steps["result"][0], args.out)
    msg = f"wrote {args.out} ({R}x{R}{', back in the person pose' if args.back_to_pose else ', frontal pose'})"
    if args.steps:
        paths = write_steps({"person": person.image[None], "garment_photo": garment.image[None], **steps}, args.steps)
        msg += f"; {len(paths)} intermediate images in {args.steps}"
    print(msg)
    return 0
