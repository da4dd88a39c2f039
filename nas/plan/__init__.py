"""`nas plan`: the measured memory plan of a study (`stages`), from dry runs on fake tensors (`dryrun`)."""

from nas.plan.stages import (
    STAGES,
    StagePlan,
    check_plan,
    format_plan,
    plan_study,
    recommend,
    to_json,
    write_plan,
)

__all__ = [
    "STAGES",
    "StagePlan",
    "check_plan",
    "format_plan",
    "plan_study",
    "recommend",
    "to_json",
    "write_plan",
]
