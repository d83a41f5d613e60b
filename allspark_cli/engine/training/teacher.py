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
    """An eval-mode copy of `student` that follows it with `momentum` per step."""

    def __init__(self, student: nn.Module, momentum: float) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"an EMA teacher needs a momentum in (0, 1), got {momentum}")
        self.momentum = momentum
        self.model = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for teacher_param, student_param in zip(self.model.parameters(), student.parameters()):
            teacher_param.lerp_(student_param.detach(), 1.0 - self.momentum)
        for teacher_buffer, student_buffer in zip(self.model.buffers(), student.buffers()):
            teacher_buffer.copy_(student_buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(saved)
