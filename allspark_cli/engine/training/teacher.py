"""The pseudo-label teacher as an exponential moving average of the student's weights (Mean
Teacher, Tarvainen & Valpola 2017; UniMatch V2), an option of every method with an unlabeled loss
(`train.teacher_momentum`, DESIGN.md section 3a). By default (momentum 0, the reference) the model
being trained labels its own unlabeled images.

After every optimizer step each teacher parameter moves toward the student's,

    t <- m t + (1 - m) s

and the buffers (BatchNorm's running statistics, the Semantic Memory) are copied from the
student. The teacher only runs the pseudo-label pass (eval mode, no gradient); it is part of a
run's state (`state_dict`, in last.pt) and continues on a resume. Under DDP the students are equal
after the all-reduce, so every rank's teacher is too.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EmaTeacher:
    """An eval-mode copy of `student` that follows it with `momentum` (in (0, 1), train.teacher_momentum) per step."""

    def __init__(self, student: nn.Module, momentum: float) -> None:
        self.momentum = momentum
        self.model = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        # One multi-tensor kernel per list instead of one per tensor (about 2,000 for MiT-B5).
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in student.parameters()],
                             1.0 - self.momentum)
        torch._foreach_copy_(list(self.model.buffers()), list(student.buffers()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(saved)
