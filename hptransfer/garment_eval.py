"""Try-on measured on synthetic ground truth: person A wearing person B's garment, rendered exactly.

On a synthetic dataset's held-out split, each pair takes A's photo (one of its poses) and B's photo
(another identity, another pose) and compares, inside the ground truth's garment region, three ways
of dressing A in B's garment in the frontal pose:

- ``ours`` ("flow (ours)": its flow network is our design, not the paper's; docs/garment.md): the
  pipeline of :mod:`hptransfer.garment` (transfer network to the frontal pose, appearance flow warp,
  feathered composite);
- ``affine``: B's garment pasted with the best affine fit of its mask onto A's own frontal garment mask
  (moments, then 1 - soft IoU minimised over the six parameters), composited the same way;
- ``transfer_only``: the transfer network alone: it moves B (the wearer) to A's frontal pose, and the
  garment is cut out with B's exact frontal garment mask and composited the same way (no flow).

All three dis-occlude A with the same transfer network and get exact masks from the generator
(B's garment in its photo, A's garment region in the frontal pose), so the table compares how each
moves the garment. Metrics: L1 (images in [0, 1]) and SSIM (11x11 Gaussian window, sigma 1.5, on
uint8 values) averaged over the ground truth's garment pixels, and the IoU of each method's garment
mask with the ground truth's. With ``back_to_pose`` the results also go back to A's own pose through
the transfer network and are compared with A wearing B's garment in that pose (L1, SSIM).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hptransfer.errors import InputError
from hptransfer.garment import dilate, feather, region_tensor, synthetic_frontal, try_on

log = logging.getLogger(__name__)

METHODS = ("ours", "affine", "transfer_only")


def masked_ssim(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean SSIM over ``mask`` (B, 1, H, W) of images (B, 3, H, W) in [-1, 1] (quantised to uint8)."""
    from hptransfer.metrics import to_uint8

    x, y = to_uint8(pred).double(), to_uint8(gt).double()
    r, sigma = 5, 1.5
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum())
    C = x.shape[1]
    kx, ky = k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), k.view(1, 1, -1, 1).repeat(C, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, kx, groups=C), ky, groups=C)  # noqa: E731  (valid window)
    mx, my = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean(1, keepdim=True)
    m = mask[..., r:-r, r:-r].double()
    return (s * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1)


def masked_l1(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean |pred - gt| in [0, 1] units over the mask's pixels."""
    m = mask.double()
    d = ((pred.double() - gt.double()).abs() / 2).mean(1, keepdim=True)
    return (d * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a > 0.5, b > 0.5
    return (a & b).sum(dim=(1, 2, 3)).double() / (a | b).sum(dim=(1, 2, 3)).double().clamp_min(1)


def _moments(mask: torch.Tensor):
    """Centroid (2,) and covariance (2, 2) of a (H, W) mask in normalised (x, y) coordinates."""
    H, W = mask.shape
    ys = (2 * torch.arange(H, dtype=torch.float64) + 1) / H - 1
    xs = (2 * torch.arange(W, dtype=torch.float64) + 1) / W - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    w = mask.double() / mask.double().sum().clamp_min(1)
    mu = torch.stack([(gx * w).sum(), (gy * w).sum()])
    d = torch.stack([gx - mu[0], gy - mu[1]])
    cov = torch.einsum("ihw,jhw,hw->ij", d, d, w)
    return mu, cov + 1e-6 * torch.eye(2, dtype=torch.float64)


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh(c)
    return v @ torch.diag(e.clamp_min(1e-9).sqrt()) @ v.T


def fit_affine(source: torch.Tensor, target: torch.Tensor, steps: int = 150) -> torch.Tensor:
    """The (2, 3) ``affine_grid`` matrix (output -> input coordinates) that best lays the (H, W) mask
    ``source`` onto ``target``: moment matching, then Adam on 1 - soft IoU (masks slightly blurred)."""
    mu_s, c_s = _moments(source)
    mu_t, c_t = _moments(target)
    A = _sqrtm(c_s) @ torch.linalg.inv(_sqrtm(c_t))
    theta = torch.cat([A, (mu_s - A @ mu_t)[:, None]], 1).float().requires_grad_(True)
    src = feather(source[None, None].float(), 1.0)
    tgt = feather(target[None, None].float(), 1.0)
    opt = torch.optim.Adam([theta], lr=0.01)
    best, best_loss = theta.detach().clone(), float("inf")
    with torch.enable_grad():  # callers may run under no_grad
        for _ in range(steps):
            grid = F.affine_grid(theta[None], list(src.shape), align_corners=False)
            w = F.grid_sample(src, grid, align_corners=False)
            loss = 1 - torch.minimum(w, tgt).sum() / torch.maximum(w, tgt).sum().clamp_min(1e-6)
            if loss.item() < best_loss:
                best_loss, best = loss.item(), theta.detach().clone()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return best


def _composite(person_frontal, image, mask, region, R):
    alpha = feather(((mask > 0.5) & (dilate(region, max(1, R // 128)) > 0.5)).float(), R / 128)
    return person_frontal * (1 - alpha) + image * alpha, alpha


def _pairs(root: Path, split: str, count: int):
    from hptransfer.data import read_annotations

    names = sorted(read_annotations(root / f"annotations-{split}.csv"))
    by_id: dict[int, list[str]] = {}
    for n in names:
        by_id.setdefault(int(n[6:11]), []).append(n)
    ids = sorted(by_id)
    if len(ids) < 2:
        raise InputError(f"{root}: the {split} split needs two identities for try-on pairs, has {len(ids)}")
    out = []
    for k in range(count):
        a, b = ids[k % len(ids)], ids[(k + 1 + k // len(ids)) % len(ids)]
        if a == b:
            b = ids[(ids.index(a) + 1) % len(ids)]
        pa, pb = by_id[a], by_id[b]
        out.append((pa[(k // len(ids)) % len(pa)], pb[(k // len(ids) + 1) % len(pb)]))
    return out


@torch.no_grad()
def tryon_inputs(root, split: str, count: int, R: int) -> dict:
    """The tensors of ``count`` held-out try-on pairs at ``R`` px (see :func:`_pairs`): A's photo and
    pose, B's photo, pose and garment mask, A's frontal pose, garment region and own garment mask, the
    ground truth (A in B's garment, frontal and in A's pose, with garment masks), B's frontal garment
    mask, and ``frontal``: A in its own garment in the frontal pose, rendered exactly (the dis-occlusion
    a perfect transfer network would give)."""
    from hptransfer.data import read_annotations, synth
    from hptransfer.data.dataset import fit_image, fit_keypoints, load_image, to_tensor
    from hptransfer.data.garment_pairs import fit_labels, parsing_path
    from hptransfer.data.parsing import UPPER_GARMENT, garment_masks, mask_of, read_parsing

    root = Path(root)
    params = json.loads((root / synth.PARAMS_FILE).read_text())
    S, seed = params["size"], params["seed"]
    ann = read_annotations(root / f"annotations-{split}.csv")
    pairs = _pairs(root, split, count)
    as_mask = lambda m: torch.from_numpy(np.asarray(m, np.float32))[None]  # noqa: E731
    rows = {k: [] for k in ("person", "kp_person", "garment", "kp_garment", "garment_mask", "kp_frontal", "region",
                            "own_upper", "gt", "gt_mask", "gt_pose", "gt_pose_mask", "wearer_frontal_mask",
                            "frontal")}
    for pa, pb in pairs:
        a, b = int(pa[6:11]), int(pb[6:11])
        for key, name in (("person", pa), ("garment", pb)):
            img = load_image(root / "images" / name)
            rows[key].append(to_tensor(fit_image(img, R)))
            rows["kp_" + key].append(torch.from_numpy(fit_keypoints(ann[name], S, S, R)))
        labels = fit_labels(read_parsing(parsing_path(root, pb), "lip", (S, S)), R)
        rows["garment_mask"].append(as_mask(garment_masks(labels, "lip", str(parsing_path(root, pb)))[0]))
        kp_f, lab_f = synthetic_frontal(root, pa, R)
        rows["kp_frontal"].append(kp_f)
        rows["region"].append(region_tensor(lab_f, "lip"))
        rows["own_upper"].append(as_mask(mask_of(lab_f, "lip", UPPER_GARMENT)))
        frontal_img, _, _ = synth.render_frontal(seed, a, S)
        rows["frontal"].append(to_tensor(fit_image(frontal_img, R)))
        gt_img, _, gt_lab = synth.render_frontal(seed, a, S, garment_from=b)
        rows["gt"].append(to_tensor(fit_image(gt_img, R)))
        rows["gt_mask"].append(as_mask(mask_of(fit_labels(gt_lab, R), "lip", UPPER_GARMENT)))
        _, _, wearer_lab = synth.render_frontal(seed, b, S)
        rows["wearer_frontal_mask"].append(as_mask(mask_of(fit_labels(wearer_lab, R), "lip", UPPER_GARMENT)))
        p = int(pa.split("_")[1])
        rendered = synth.render_identity(seed, a, p + 1, S, views=tuple(params["views"]), framing=params["framing"],
                                         with_labels=True, garment_from=b)[p]
        rows["gt_pose"].append(to_tensor(fit_image(rendered[1], R)))
        rows["gt_pose_mask"].append(as_mask(mask_of(fit_labels(rendered[4], R), "lip", UPPER_GARMENT)))
    return {k: torch.stack(v) for k, v in rows.items()}


@torch.no_grad()
def affine_paste(t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(warped garment, warped mask): each B's garment laid onto A's own frontal garment mask by the
    best affine fit of the masks (:func:`fit_affine`). Deterministic: no seed."""
    R = t["garment"].shape[-1]
    warped, wmask = [], []
    for i in range(t["garment"].shape[0]):
        theta = fit_affine(t["garment_mask"][i, 0], t["own_upper"][i, 0])
        grid = F.affine_grid(theta[None], [1, 3, R, R], align_corners=False)
        wm = F.grid_sample(t["garment_mask"][i:i + 1], grid, align_corners=False)
        wg = F.grid_sample(t["garment"][i:i + 1] * t["garment_mask"][i:i + 1], grid, align_corners=False)
        warped.append((wg / wm.clamp_min(1e-3)).clamp(-1, 1))
        wmask.append(wm)
    return torch.cat(warped), torch.cat(wmask)


def score_frontal(img: torch.Tensor, alpha: torch.Tensor, t: dict) -> dict:
    """Per-pair (B,) L1 and SSIM inside the ground truth's garment, and the IoU of ``alpha`` with it."""
    return {"l1": masked_l1(img, t["gt"], t["gt_mask"]), "ssim": masked_ssim(img, t["gt"], t["gt_mask"]),
            "iou": mask_iou(alpha, t["gt_mask"])}


@torch.no_grad()
def flow_composite(flow, t: dict, person_frontal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(composite, alpha) of the appearance flow's warp onto ``person_frontal`` (see :func:`try_on`)."""
    steps = try_on(None, flow, t["person"], t["kp_person"], t["garment"], t["kp_garment"], t["garment_mask"],
                   t["kp_frontal"], lambda _: t["region"], person_frontal=person_frontal)
    return steps["composite"], steps["alpha"]


@torch.no_grad()
def evaluate_tryon(transfer, flow, root, split: str = "test", count: int = 24, back_to_pose: bool = True) -> dict:
    """Scores of :data:`METHODS` (see the module docstring) and the tensors for a figure."""
    from hptransfer.export import generate

    R = transfer.resolution
    t = tryon_inputs(root, split, count, R)
    pf = generate(transfer, t["person"], t["kp_frontal"])
    steps = try_on(transfer, flow, t["person"], t["kp_person"], t["garment"], t["kp_garment"], t["garment_mask"],
                   t["kp_frontal"], lambda _: t["region"], person_frontal=pf)
    results = {"ours": (steps["composite"], steps["alpha"])}
    results["affine"] = _composite(pf, *affine_paste(t), t["region"], R)
    # (c) the transfer network alone: the wearer moved to A's frontal pose, garment cut with B's frontal mask
    wearer = generate(transfer, t["garment"], t["kp_frontal"])
    results["transfer_only"] = _composite(pf, wearer, t["wearer_frontal_mask"], t["region"], R)

    scores = {}
    for name, (img, alpha) in results.items():
        s = score_frontal(img, alpha, t)
        if back_to_pose:
            back = generate(transfer, img, t["kp_person"])
            s["l1_pose"] = masked_l1(back, t["gt_pose"], t["gt_pose_mask"])
            s["ssim_pose"] = masked_ssim(back, t["gt_pose"], t["gt_pose_mask"])
        scores[name] = {k: float(v.mean()) for k, v in s.items()}
    return {"scores": scores, "pairs": t["person"].shape[0], "resolution": R, "tensors": t, "results": results,
            "steps": steps}


def format_table(scores: dict) -> str:
    cols = [("l1", "L1 in garment (lower better)"), ("ssim", "SSIM in garment"), ("iou", "mask IoU"),
            ("l1_pose", "L1, back in A's pose"), ("ssim_pose", "SSIM, back in A's pose")]
    cols = [c for c in cols if c[0] in next(iter(scores.values()))]
    lines = ["| method | " + " | ".join(h for _, h in cols) + " |", "| --- |" + " --- |" * len(cols)]
    names = {"ours": "(a) flow (ours): transfer + appearance flow", "affine": "(b) best affine fit of the mask",
             "transfer_only": "(c) transfer network alone"}
    for m, s in scores.items():
        lines.append(f"| {names.get(m, m)} | " + " | ".join(f"{s[k]:.3f}" for k, _ in cols) + " |")
    return "\n".join(lines)


def save_figure(res: dict, path, rows: int = 4) -> Path:
    """PNG rows: person | garment | ours | affine | transfer alone | ground truth (frontal)."""
    from hptransfer.flow_task import image_to_rgb, save_grid

    t, r = res["tensors"], res["results"]
    n = min(rows, t["person"].shape[0])
    picks = sorted({round(i * (t["person"].shape[0] - 1) / max(n - 1, 1)) for i in range(n)})
    grid = [[image_to_rgb(x) for x in (t["person"][i], t["garment"][i], r["ours"][0][i], r["affine"][0][i],
                                        r["transfer_only"][0][i], t["gt"][i])] for i in picks]
    return save_grid(path, grid)
