"""Shared plumbing of the binaries: quiet logs, one-line errors for bad flags and inputs."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging  # noqa: E402

from muse_jax import entry, storage  # noqa: E402
from muse_jax.errors import UsageError  # noqa: E402
from muse_jax.storage import StorageError  # noqa: E402


def define_stages_flag(
    base: str = "the base stage alone", cascade: str = "base -> super-res -> decoder"
):
    """The `--stages` flag of the sampling binaries (None: the cascade when the config has it)."""
    return flags.DEFINE_enum(
        "stages",
        None,
        ["base", "cascade"],
        f"base: {base}; cascade: {cascade}. Default: cascade when the config has the super-res "
        "stages.",
    )


def require_prompt(value: str | None) -> str:
    """The stripped prompt; an empty one is a usage error (it would mean unconditional sampling)."""
    prompt = (value or "").strip()
    if not prompt:
        raise UsageError("--prompt is empty: give a caption, e.g. --prompt='a red circle'.")
    return prompt


def require_positive(flag: str, value: int) -> int:
    if value < 1:
        raise UsageError(f"--{flag} must be >= 1, got {value}.")
    return value


def check_reachable(*paths: str | None) -> None:
    """Fails in one line, before any work, when a gs:// path's bucket cannot be reached."""
    for path in paths:
        if path:
            storage.check_reachable(path, "using")


def missing_stage(e: FileNotFoundError, verb: str, cascade: bool) -> UsageError:
    """A missing checkpoint as a usage error; it suggests `--stages=base` only when the
    missing stage is a super-res one (for a missing base stage that advice would fail too)."""
    superres = any(f"No {s} checkpoint" in str(e) for s in ("superres", "superres_tokenizer"))
    hint = f" (or {verb} the base stage alone: --stages=base)" if cascade and superres else ""
    return UsageError(f"{e}{hint}")


def check_no_extra_args(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")


def _friendly_flag_errors(argv: list[str]) -> list[str]:
    """Parses flags ourselves so that a bad `--config.a.b` override is one clear line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("\"' ")
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
        where = f" in {bad[0].split('=')[0]}" if bad else ""
        sys.stderr.write(
            f"error: unknown config key {key!r}{where}; see the config file for valid keys\n"
        )
    except OSError as e:
        path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "?")
        sys.stderr.write(
            f"error: cannot load config file {path!r}: {str(e).splitlines()[-1].strip()}\n"
        )
    except flags.Error as e:
        msg = [m.strip() for m in str(e).strip().splitlines() if m.strip()]
        if any("No such file" in m for m in msg):
            sys.stderr.write(f"error: config file not found: {msg[-1]}\n")
        elif any("Error whilst parsing config file" in m for m in msg):
            # The config's own exception (e.g. an unknown preset) is the useful line.
            sys.stderr.write(f"error: {msg[0].split(': Error')[0]}: {msg[-1]}\n")
        else:
            sys.stderr.write(f"error: {msg[0] if msg else 'bad flags'}\n")
    sys.exit(2)


BUG_HINT = (
    "muse_jax: this is not a usage error but an unexpected failure; please report it with the "
    "command and the traceback above."
)


def run(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run` for a binary: first `entry.prepare_process()` (huge pages, XLA flags), then
    `main`. A caller's mistake (`UsageError`, a missing or unreadable file, an unreachable
    bucket, a config file that does not load) is one line and exit 2; anything else is a bug:
    its traceback, a one-line hint to report it, exit 1."""
    entry.prepare_process()

    def wrapped(argv):
        logging.set_verbosity(logging.ERROR)
        try:
            return main(argv)
        except (UsageError, FileNotFoundError, StorageError) as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
        except OSError as e:  # An unreadable file; config_flags defers a config's load error too.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            sys.stderr.write(f"error: {lines[0]} ({lines[-1]})\n" if lines else f"error: {e}\n")
            return 2
        except Exception:
            traceback.print_exc()
            sys.stderr.write(BUG_HINT + "\n")
            return 1

    app.run(wrapped, flags_parser=_friendly_flag_errors)
