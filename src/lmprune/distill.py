"""Knowledge distillation: loss = (1 - a) * CE + a * T^2 * KL(p_teacher^T || p_student^T).

Formulas: docs/algorithms.md, "Knowledge distillation".

The teacher is a frozen model: a local HF dir, or a snapshot of the enlarged model taken at the step
where pruning starts (saved as OUT/teacher/, a HF dir, so a resumed run distils from the same one).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from lmprune.atomic import atomic_dir
from lmprune.config import KDConfig
from lmprune.models import load_hf_model
from lmprune.schedules import linear_ramp


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(p_teacher^T || p_student^T); logits [B, T, V], computed in fp32."""
    vocab = min(student_logits.size(-1), teacher_logits.size(-1))  # a padded vocab never gets probability
    s = F.log_softmax(student_logits[..., :vocab].float() / temperature, dim=-1).view(-1, vocab)
    t = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1).view(-1, vocab)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


class Distiller:
    """Mixes the KD term into the loss from `start_step` on (a named call in the training step)."""

    def __init__(self, cfg: KDConfig, start_step: int, total_steps: int):
        self.cfg, self.start_step, self.total_steps = cfg, start_step, total_steps
        self.teacher: torch.nn.Module | None = None
        self.last_kd_loss: float | None = None

    def alpha_at(self, step: int) -> float:
        if self.cfg.alpha_end is None:
            return self.cfg.alpha
        return linear_ramp(step, self.start_step, self.total_steps - self.start_step, self.cfg.alpha,
                           self.cfg.alpha_end)

    def load_teacher(self, path: str | Path, device: torch.device) -> None:
        self.teacher = _freeze(load_hf_model(path).to(device))

    def snapshot_teacher(self, model: torch.nn.Module, save_dir: Path | None) -> None:
        """Freeze a copy of `model` as the teacher; rank 0 also saves it (atomically) for resume."""
        self.teacher = _freeze(copy.deepcopy(model))
        if save_dir is not None:
            save_snapshot(self.teacher, save_dir)

    def mix_loss(self, ce: torch.Tensor, student_logits: torch.Tensor, input_ids: torch.Tensor,
                 step: int) -> torch.Tensor:
        if self.teacher is None or step < self.start_step:
            return ce
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits
        kd = kd_kl(student_logits, teacher_logits, self.cfg.temperature)
        self.last_kd_loss = kd.item()
        alpha = self.alpha_at(step)
        return (1.0 - alpha) * ce + alpha * kd

    def metrics(self, step: int) -> dict[str, float]:
        if self.teacher is None or step < self.start_step or self.last_kd_loss is None:
            return {}
        return {"kd_loss": round(self.last_kd_loss, 6), "kd_alpha": self.alpha_at(step)}


def save_snapshot(model: torch.nn.Module, save_dir: Path) -> None:
    """Save the teacher snapshot as a HF dir, atomically; an existing snapshot is kept (resume)."""
    if not save_dir.exists():
        with atomic_dir(save_dir, replace=False) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
