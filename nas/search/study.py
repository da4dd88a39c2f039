"""The Optuna study of a search, and nothing else: storage, opening studies, the trial attributes a study
records, and the rankings read back from it (no torch, no training code: `nas report` uses this alone)."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from nas.errors import ConfigError, NasError, first_line
from nas.model.arch import KNOBS, Arch
from nas.settings import RunConfig

log = logging.getLogger(__name__)


CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def arch_key(arch: Arch | dict) -> tuple[int, ...]:
    values = arch.to_dict() if isinstance(arch, Arch) else arch
    return tuple(int(values[k]) for k in KNOBS)


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def check_storage_url(url: str) -> None:
    """ConfigError unless `url` is an Optuna RDB storage URL of a known scheme."""
    scheme = url.partition("://")[0].split("+")[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(
            f"unknown study storage {url!r}: use sqlite:///PATH, postgresql+psycopg://USER:PW@HOST/DB or "
            "mysql+pymysql://USER:PW@HOST/DB"
        )


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A storage that cannot be reached or read (a refused connection, a corrupt or truncated SQLite
    file, a missing driver) as one ConfigError naming it, instead of SQLAlchemy's traceback."""
    import sqlalchemy.exc

    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = first_line(getattr(e, "orig", None) or e)
        if url.startswith("sqlite:///") and isinstance(e, sqlalchemy.exc.DatabaseError):
            path = url.removeprefix("sqlite:///")
            raise ConfigError(f"study storage {path} is not a readable SQLite database ({reason}): corrupt or truncated") from e
        raise ConfigError(f"cannot open the study storage {_redacted(url)}: {reason}") from e
    except ImportError as e:  # optuna: "Failed to import DB access module"
        raise ConfigError(f"cannot open the study storage {_redacted(url)}: its database driver is not installed") from e


def _redacted(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: nothing to hide
        return url


def make_storage(url: str, cfg: RunConfig | None = None) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so a trial whose worker died is failed and retried."""
    check_storage_url(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    s = cfg.search if cfg else None
    with storage_errors(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=s.heartbeat_interval if s else 30,
            grace_period=s.grace_period if s else 120,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=s.max_retry if s else 2, inherit_intermediate_values=True
            ),
        )


def load_existing_study(storage: str, study_name: str) -> optuna.Study:
    """Open a study that must already exist; ConfigError naming the studies there when it does not."""
    check_storage_url(storage)
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"no SQLite file at {storage.removeprefix('sqlite:///')}; pass --storage with the URL the search used"
        )
    with storage_errors(storage):
        names = optuna.study.get_all_study_names(storage)
        if study_name not in names:
            raise ConfigError(
                f"no study {study_name!r} in {_redacted(storage)}; studies there: {', '.join(names) or 'none'}"
            )
        return optuna.load_study(study_name=study_name, storage=storage)


def done_trials(study: optuna.Study) -> int:
    """Finished evaluations of candidates (sampled shapes outside the space do not count)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sum(not t.user_attrs.get("infeasible") for t in finished)


def ranking_stability(study: optuna.Study, top_k: int, horizon: int) -> dict[str, Any]:
    """Rank of the top-k completed trials at half vs full horizon, with Kendall tau."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not t.user_attrs.get("infeasible")
    ]
    top = sorted(complete, key=lambda t: t.value)[:top_k]
    half_step = _nearest_step(top, horizon // 2)
    rows = [(t.number, t.intermediate_values.get(half_step), t.value) for t in top]
    rows = [r for r in rows if r[1] is not None]
    half = [r[1] for r in rows]
    full = [r[2] for r in rows]
    tau = kendall_tau(half, full) if len(rows) >= 2 else None
    stable = bool(rows) and min(rows, key=lambda r: r[1])[0] == min(rows, key=lambda r: r[2])[0]
    if not stable and rows:
        log.warning(
            "the winner at half horizon (step %s) is not the winner at full horizon: the ranking is not stable; consider a longer horizon",
            half_step,
        )
    return {
        "k": len(rows),
        "kendall_tau": tau,
        "half_step": half_step,
        "full_step": horizon,
        "trials": [r[0] for r in rows],
        "half_losses": half,
        "full_losses": full,
        "winner_stable": stable,
    }


def keep_top_models(study: optuna.Study, top_k: int) -> list[str]:
    """Delete the short-run models of all but the top-k completed trials (a candidate of an 8B teacher
    is gigabytes); returns the kept paths. Curves, metrics and the study itself are kept."""
    complete = sorted(
        (
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "checkpoint" in t.user_attrs
        ),
        key=lambda t: t.value,
    )
    keep = [t.user_attrs["checkpoint"] for t in complete[:top_k]]
    for trial in complete[top_k:]:
        shutil.rmtree(trial.user_attrs["checkpoint"], ignore_errors=True)
    return keep


def _nearest_step(trials, step: int) -> int | None:
    steps = sorted({s for t in trials for s in t.intermediate_values})
    return min(steps, key=lambda s: (abs(s - step), s)) if steps else None


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not t.user_attrs.get("infeasible")
    ]
    if not complete:
        raise NasError(f"study {study.study_name} has no completed trial yet; run more trials")
    return min(complete, key=lambda t: t.value)


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall rank correlation (tau-a) of two equally long score lists; 1.0 = same order."""
    n = len(a)
    if n < 2 or n != len(b):
        raise ValueError("kendall_tau needs two lists of the same length >= 2")
    score = 0
    for i in range(n):
        for j in range(i + 1, n):
            score += _sign(a[i] - a[j]) * _sign(b[i] - b[j])
    return score / (n * (n - 1) / 2)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)
