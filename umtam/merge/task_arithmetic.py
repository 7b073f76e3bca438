"""Task arithmetic: W = W0 + lambda * sum_t T_t.

https://arxiv.org/abs/2212.04089 (Ilharco et al., "Editing Models with Task
Arithmetic"). The paper tunes lambda on validation data; the default here is
1.0, the plain sum of task vectors (lambda = 1/K gives the average).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from umtam.merge.base import MergeMethod, MethodOptions, lambda_option

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class TaskArithmeticOptions(MethodOptions):
    lambda_: float = lambda_option()


def task_arithmetic(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    return group.base32 + options["lambda"] * group.task_vectors.sum(dim=0)


METHOD = MergeMethod(
    name="task-arithmetic",
    merge=task_arithmetic,
    url="https://arxiv.org/abs/2212.04089",
    summary="W0 + lambda * sum of task vectors",
    options=TaskArithmeticOptions,
)
