"""Task arithmetic: W = W0 + lambda * sum_t T_t.

https://arxiv.org/abs/2212.04089 (Ilharco et al., "Editing Models with Task
Arithmetic"). The paper tunes lambda on validation data; the default here is
1.0, the plain sum of task vectors (lambda = 1/K gives the average). The task
vectors are summed in input order, in float32.
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
    # in place on the sum's buffer: the same bits as W0 + lambda * sum, one buffer fewer
    return group.task_vector_sum().mul_(options["lambda"]).add_(group.base32)


METHOD = MergeMethod(
    name="task-arithmetic",
    merge=task_arithmetic,
    url="https://arxiv.org/abs/2212.04089",
    summary="W0 + lambda * sum of task vectors",
    options=TaskArithmeticOptions,
    # W0 + lambda * sum(W_t - W0): a NaN or inf in any W_t or W0 stays one (inf - inf and
    # 0 * inf are NaN), so the merged rows' check covers the inputs'.
    output_checks_inputs=True,
)
