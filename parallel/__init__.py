"""moetron.parallel: the process mesh (PP x DP x EP x TP groups, nodes, rails), pipeline schedules
(1F1B, ZB1P, DualPipe, DualPipeV) as data, a simulator, and one executor that runs any of them over
torch.distributed point-to-point transfers.

Knows nothing about moetron's model: it takes nn.Modules, tensors and process groups.
"""

from .actions import FB, Action, Op, Schedule, ScheduleError, StageId, Step, actions_of
from .executor import (
    BackwardJob,
    ForwardJob,
    PipelineExecutor,
    StepResult,
    sequential_forward_backward,
)
from .mesh import KINDS, MeshLayout, ProcessMesh
from .schedule_1f1b import one_f_one_b
from .schedule_check import check_schedule
from .schedule_dualpipe import dualpipe, dualpipev
from .schedule_zb1p import zb1p
from .schedules import SCHEDULES, build_schedule
from .simulator import Costs, SimResult, peak_activations, simulate
from .weight_grad import ChunkBackward, WeightGradStore

__all__ = [
    "FB", "KINDS", "Action", "BackwardJob", "ChunkBackward", "Costs", "ForwardJob", "MeshLayout", "Op",
    "PipelineExecutor", "ProcessMesh",
    "SCHEDULES", "Schedule", "ScheduleError", "SimResult", "StageId", "Step", "StepResult",
    "WeightGradStore", "actions_of", "build_schedule", "check_schedule", "dualpipe", "dualpipev",
    "one_f_one_b", "peak_activations", "sequential_forward_backward", "simulate", "zb1p",
]
