"""`nas run`: importance -> space -> search -> full distillation of the winner -> report.

Read it as a recipe, in the order it runs: `nas.pipeline.recipe` (`run` = `search` -> `finalize` ->
report; `worker` joins a search), `nas.pipeline.identity` (which stored study a command continues,
`--restart`), `nas.pipeline.context` (what a search loads once per process). Every stage is resumable:
the importance file, the study and the distillation checkpoints live under the study's directory
(`RunConfig.paths`), so re-running the same command continues where it stopped.
"""

from nas.pipeline.context import load_teacher, prepare_context, record_study_attrs, study_importance
from nas.pipeline.identity import STUDY_WAYS_OUT, check_study, clear_study, require_same_study, study_identity
from nas.pipeline.recipe import RunResult, final_budgets, finalize, run, search, worker

__all__ = [
    "STUDY_WAYS_OUT",
    "RunResult",
    "check_study",
    "clear_study",
    "final_budgets",
    "finalize",
    "load_teacher",
    "prepare_context",
    "record_study_attrs",
    "require_same_study",
    "run",
    "search",
    "study_identity",
    "study_importance",
    "worker",
]
