"""One training iteration (the body of ``hptransfer.train._train_stage``'s loop) as a reusable function.

G forward; the discriminator's loss (when a discriminator engine is given) and the generator's losses,
both from the same discriminator weights; ONE host read of both losses' finite flags (all-reduced, so
every rank decides alike); then the generator's backward and step, then the discriminator's (the
update order of pix2pixHD: simultaneous updates). With gradient accumulation this is one micro-batch
and the engines step after the window's last (``backend.Engine``). A non-finite loss skips its own
network's step (the whole window's), and the engine restores that network's BatchNorm buffers as they
were before the window. Each part runs in its own
:func:`hptransfer.profiling.phase` (``losses.generator_loss`` marks its terms): generator_forward,
discriminator (D's loss, its backward and step, and the adversarial term), global_vgg, local_vgg,
backward, optimizer.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from hptransfer import losses
from hptransfer.profiling import phase

log = logging.getLogger(__name__)

PHASES = ("generator_forward", "discriminator", "global_vgg", "local_vgg", "backward", "optimizer")


def read_nonfinite(backend, *values: torch.Tensor, agree: Optional[torch.Tensor] = None) -> list:
    """For each value: non-finite on any rank (a bool); then, for each entry of ``agree`` (the caller's own
    flags, a float tensor on the device), its maximum over the ranks (a float). The step's one agreed host
    read: the flags are made and all-reduced on the device, then read together."""
    flags = [torch.stack([~torch.isfinite(v.detach()).all() for v in values]).to(torch.float32)] if values else []
    if agree is not None:
        flags.append(agree.detach().reshape(-1).to(torch.float32))
    reduced = backend.max_over_ranks(torch.cat(flags)).tolist()
    return [flag > 0 for flag in reduced[:len(values)]] + reduced[len(values):]


def train_step(g_engine, generator, vgg, cfg, reference: torch.Tensor, target: torch.Tensor, kp_ref: torch.Tensor,
               kp_tgt: torch.Tensor, criterion: str, impl: str, backend, *, d_engine=None,
               loss_hook: Optional[Callable[[dict, dict], dict]] = None, info: Optional[dict] = None,
               agree: Optional[torch.Tensor] = None) -> dict:
    """One iteration: G forward, (D's loss), G's losses, one finite check, G backward and step, (D's).

    ``reference``, ``target`` (B, 3, R, R) on the device in ``backend.input_dtype``; ``kp_ref``,
    ``kp_tgt`` (B, 18, 2) float32 (y, x) pixels at R: one micro-batch. ``generator`` is the module inside
    ``g_engine`` (the engine restores its buffers when a window is dropped). ``loss_hook(terms, info)`` may
    replace the terms before the finite check. ``agree``: the caller's own flags (a 1-D float tensor on the
    device) that every rank must agree on, max-reduced in the same host read as the finite flags (no
    collective of their own). Returns {"terms": dict of fp32 scalars (graph freed), "d_loss": scalar or None,
    "skipped": bool, "d_skipped": bool (this micro-batch's losses were non-finite on some rank), "agreed":
    list of floats (``agree``'s entries, each its maximum over the ranks), "fake": (B, 3, R, R) detached}.
    """
    R = reference.shape[-1]
    geometry = losses.step_geometry(cfg.loss, kp_ref, kp_tgt, R, device=reference.device)  # once per step
    with phase("generator_forward"):
        fake = g_engine(reference, kp_tgt)

    d_loss = None
    if d_engine is not None:  # D's loss on the detached fake; its backward waits for the finite check
        with phase("discriminator"), backend.loss_autocast():
            real_pairs = losses.local_discriminator_pairs(reference, target, geometry, impl)
            fake_pairs = losses.local_discriminator_pairs(reference, fake.detach(), geometry, impl)
            d_loss = losses.discriminator_loss(d_engine, real_pairs, fake_pairs, geometry.pair_valid)

    with backend.loss_autocast():
        terms = losses.generator_loss(fake, target, geometry, vgg, cfg.loss, criterion, reference=reference,
                                      discriminator=d_engine, impl=impl)
    if loss_hook is not None:
        terms = loss_hook(terms, info or {})
    losses_read = [terms["total"]] + ([d_loss] if d_loss is not None else [])
    flags = read_nonfinite(backend, *losses_read, agree=agree)
    skipped, d_skipped, agreed = flags[0], d_loss is not None and flags[1], flags[len(losses_read):]
    if skipped:
        g_engine.skip(terms["total"])
    else:
        with phase("backward"):
            g_engine.backward(terms["total"])
        with phase("optimizer"):
            g_engine.step()
    if d_engine is not None:
        with phase("discriminator"):
            if d_skipped:
                d_engine.skip(d_loss)
            else:
                d_engine.backward(d_loss)
                d_engine.step()
    return {"terms": terms, "d_loss": d_loss, "skipped": skipped, "d_skipped": d_skipped, "agreed": agreed,
            "fake": fake.detach()}
