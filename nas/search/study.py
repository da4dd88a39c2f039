"""The Optuna study of a search, and nothing else: storage, opening studies, what a study and each of its
trials record (`StudyRecord`, `TrialRecord`, in `nas.search.record`), and the rankings read back from it (no torch, no training
code: `nas report` uses this alone).

SQLite and the trial queue: Optuna's `Study._pop_waiting_trial_id` hands a WAITING trial to one worker by
reading it, then setting it RUNNING under `SELECT ... FOR UPDATE`. PostgreSQL locks the row; SQLite ignores
`FOR UPDATE`, and Python's sqlite3 opens its transaction only at the UPDATE, so two workers can both pop
the same trial (measured with Optuna 5.0: 6 of 300 queued trials went to both of two processes). The same
race lets two workers both fail one stale trial and retry it twice. `make_storage` therefore opens every
SQLite transaction with `BEGIN IMMEDIATE` (the writer lock is taken before the read), which makes the
pop and the stale-trial check atomic on SQLite too.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from nas.errors import ConfigError, NasError, first_line
from nas.io import check_kind
from nas.search.record import StudyRecord, TrialRecord, arch_key  # noqa: F401 (the records' old home)
from nas.settings import RunConfig

log = logging.getLogger(__name__)
SQLITE_LOCK_TIMEOUT = 60  # seconds a SQLite transaction waits for another worker's (short) one


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def check_storage_url(url: str) -> None:
    """ConfigError unless `url` is an Optuna RDB storage URL of a known scheme."""
    scheme = url.partition("://")[0].split("+")[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(
            f"unknown study storage {url!r}: use sqlite:///PATH, postgresql+psycopg://USER:PW@HOST/DB or "
            "mysql+pymysql://USER:PW@HOST/DB"
        )
    if scheme == "sqlite":  # SQLite would read a device or wait on a FIFO
        check_kind(Path(url.removeprefix("sqlite:///")).expanduser(), "study storage")


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
            raise ConfigError(
                f"study storage {path} is not a readable SQLite database ({reason}): corrupt or truncated"
            ) from e
        raise ConfigError(f"cannot open the study storage {_redacted(url)}: {reason}") from e
    except RuntimeError as e:  # RDBStorage: a schema of another Optuna version (mostly caught before)
        if "table schema" not in str(e):
            raise
        raise ConfigError(f"study storage {_redacted(url)}: {first_line(e)}") from e
    except ImportError as e:  # optuna: "Failed to import DB access module"
        raise ConfigError(
            f"cannot open the study storage {_redacted(url)}: its database driver is not installed"
        ) from e


OPTUNA_TABLES = {"studies", "trials", "version_info"}  # tables every Optuna RDB schema since v1 has


def check_optuna_schema(url: str, existing: bool = False) -> None:
    """Before Optuna touches a storage (it creates its tables in any database it opens): ConfigError when
    the database holds tables but is not an Optuna storage (nas never writes into it), when its schema
    is of another Optuna version, or, with `existing` (a study to read), when it holds no tables at all.
    Read-only: an SQLite file is opened with mode=ro."""
    import sqlalchemy

    where = _redacted(url)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if not path.is_file() or path.stat().st_size == 0:
            if existing:
                raise ConfigError(f"study storage {where} is an empty file, not an Optuna study storage")
            return  # a new storage
        url_ro = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    else:
        url_ro = url
    with storage_errors(url):
        engine = sqlalchemy.create_engine(url_ro)
        try:
            with engine.connect() as connection:
                tables = set(sqlalchemy.inspect(connection).get_table_names())
                revision = None
                if "alembic_version" in tables:
                    revision = connection.execute(
                        sqlalchemy.text("SELECT version_num FROM alembic_version")
                    ).scalar()
        finally:
            engine.dispose()
    if existing and not tables:
        raise ConfigError(f"study storage {where} is an empty database: no Optuna study there")
    if tables and not OPTUNA_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise ConfigError(
            f"study storage {where} is a database of other tables ({shown}), not an Optuna study storage; "
            "nas never writes into it: give another --storage (a new SQLite file or an Optuna database)"
        )
    head, known = _optuna_schema_revisions()
    if tables and revision != head:
        way = (
            f"upgrade it with `optuna storage upgrade --storage {where}` (back it up first)"
            if revision in known
            else "open it with the Optuna version that wrote it, or a newer one"
        )
        raise ConfigError(
            f"study storage {where} has the schema of another Optuna version ({revision or 'unversioned'}; "
            f"Optuna {optuna.__version__} needs {head}): {way}"
        )


def _optuna_schema_revisions() -> tuple[str, list[str]]:
    """(the head revision, every revision) of this Optuna's storage schema, from its alembic scripts (the
    revisions `RDBStorage` compares; read here so nothing is opened for writing)."""
    import optuna.storages._rdb as rdb
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(Path(rdb.__file__).parent / "alembic"))
    return script.get_current_head(), [r.revision for r in script.walk_revisions()]


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
    check_optuna_schema(url)
    s = cfg.search if cfg else None
    sqlite = url.startswith("sqlite")
    with storage_errors(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT}} if sqlite else None,
            heartbeat_interval=s.heartbeat_interval if s else 30,
            grace_period=s.grace_period if s else 120,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=s.max_retry if s else 2, inherit_intermediate_values=True
            ),
        )
        if sqlite:
            _begin_immediate(storage.engine)
    return storage


def _begin_immediate(engine: sqlalchemy.engine.Engine) -> None:
    """Open every transaction on this SQLite engine with BEGIN IMMEDIATE (why: the module docstring);
    SQLAlchemy's recipe for SQLite transactions: the driver's own BEGIN is turned off."""

    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    def on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(engine, "connect", on_connect)
    sqlalchemy.event.listen(engine, "begin", on_begin)
    engine.dispose()  # connections opened while creating the tables predate the hooks


def load_existing_study(storage: str, study_name: str) -> optuna.Study:
    """Open a study that must already exist; ConfigError naming the studies there when it does not."""
    check_storage_url(storage)
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"no SQLite file at {storage.removeprefix('sqlite:///')}; pass --storage with the URL the search used"
        )
    check_optuna_schema(storage, existing=True)
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
    return sum(not TrialRecord.read(t).infeasible for t in finished)


def ranking_stability(
    study: optuna.Study, top_k: int, horizon: int, budget: str | None = None
) -> dict[str, Any]:
    """Rank of the top-k completed trials (of `budget` only, when given) at half vs full horizon, with
    Kendall tau."""
    complete = _feasible_complete(study, budget)
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


def keep_top_models(study: optuna.Study, top_k: int, budget: str | None = None) -> list[str]:
    """Delete the short-run models of all but the top-k completed trials (of `budget` only, when given: each
    budget keeps its own top-k; a candidate of an 8B teacher is gigabytes); returns the kept paths.
    Curves, metrics and the study itself are kept."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if budget in (None, TrialRecord.read(t).budget)
    ]
    saved = sorted(
        ((t.value, path) for t in complete if (path := TrialRecord.read(t).checkpoint)), key=lambda v: v[0]
    )
    for _, path in saved[top_k:]:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(Path(path).parent / "stable", ignore_errors=True)  # wsd's stable state (nas.search.wsd)
    return [path for _, path in saved[:top_k]]


def _nearest_step(trials, step: int) -> int | None:
    steps = sorted({s for t in trials for s in t.intermediate_values})
    return min(steps, key=lambda s: (abs(s - step), s)) if steps else None


def _feasible_complete(study: optuna.Study, budget: str | None = None) -> list[FrozenTrial]:
    """Completed trials of candidates (of `budget` only, when given)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    records = ((t, TrialRecord.read(t)) for t in complete)
    return [t for t, r in records if not r.infeasible and budget in (None, r.budget)]


def best_trial(study: optuna.Study, budget: str | None = None) -> FrozenTrial:
    """The completed trial with the lowest loss (of `budget` only, when given)."""
    complete = _feasible_complete(study, budget)
    if not complete:
        where = f" for budget {budget}" if budget else ""
        raise NasError(f"study {study.study_name} has no completed trial{where} yet; run more trials")
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
