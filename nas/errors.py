"""The exception types nas raises (one base, `NasError`); the CLI turns each into one line and exit code 2."""


class NasError(Exception):
    """Base of every error nas raises on bad input; the message says what to fix."""


class ConfigError(NasError):
    """A setting (CLI flag, TOML field, dataclass field) is invalid."""


class DataError(NasError):
    """Data is missing, empty, too small, or does not match the tokenizer."""


class ModelError(NasError):
    """A model is missing, of an unsupported family, or a checkpoint is corrupt."""


class InfeasibleError(NasError):
    """An architecture or budget cannot be built from the teacher."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class OutputError(NasError):
    """An output path cannot be written: in use by another command, an input, not a directory, read-only,
    or on a full disk."""


class TeacherCacheError(NasError):
    """A teacher cache does not match the study (teacher, tokenizer, data, settings) or cannot be used."""
