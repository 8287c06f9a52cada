"""The ``rtsmap`` command line.

Commands are registered by name and imported only when invoked, so ``rtsmap run`` and
``rtsmap plan`` never import torch (only train/evaluate/export do), and a GPU worker image
needs onnxruntime alone.

Exit statuses (every command):

- 0: done;
- 1: an internal error (a bug): one line ``error: internal error: ...``, the traceback with -v;
- 2: bad input or environment (a broken AOI, a catalog that is down, a model that does not match
  the data, an output that exists, a full disk, no permission): one line ``error: ...``;
- 3: a partial run (``run``, ``demo``): the inventory is written, its coverage layers say which
  chunk-years failed and why;
- 130: interrupted (Ctrl-C); finished work is kept.

Whatever goes wrong, stderr ends with exactly one ``error:`` line and no traceback unless -v
was given.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

import click

from rtsmap.pipeline.errors import RtsmapError

# command name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "demo": "rtsmap.workflows.demo:demo_command",
    "demo-data": "rtsmap.workflows.demo_region:demo_data_command",
    "plan": "rtsmap.workflows.plan:plan_command",
    "run": "rtsmap.workflows.run:run_command",
    "evaluate-inventory": "rtsmap.workflows.inventory_commands:evaluate_inventory_command",
    "training-data": "rtsmap.workflows.training_data:training_data_command",
    "export": "rtsmap.workflows.model_commands:export_command",
    "train": "rtsmap.workflows.model_commands:train_command",
    "evaluate": "rtsmap.workflows.model_commands:evaluate_command",
}

EXIT_OK = 0
"""Everything was done."""
EXIT_INTERNAL = 1
"""A bug: an exception that is not an :class:`RtsmapError`."""
EXIT_INPUT = 2
"""Bad input or environment, including a usage error and an OS error (disk full, permission)."""
EXIT_PARTIAL = 3
"""Some chunk-years failed; the inventory of the others is written."""
EXIT_INTERRUPTED = 130
"""Ctrl-C."""

EXIT_STATUS_HELP = (
    "Exit status: 0 done; 2 bad input or environment (one line 'error: ...'); "
    "3 partial run (inventory written, failures in its coverage layers); "
    "1 internal error (rerun with -v for the traceback); 130 interrupted."
)

_INTERRUPTED = "interrupted: finished work is kept; run the same command again to resume"


def one_line(message: str) -> str:
    """Collapse a message onto one line: lines joined with "; " (after a colon, a space),
    runs of blanks made one space.

    Parameters
    ----------
    message
        Any text (an exception's message may span lines: YAML and GEOS errors do).

    Returns
    -------
    str
        The same words on one line.
    """
    parts = [p for p in (" ".join(line.split()) for line in str(message).splitlines()) if p]
    if not parts:
        return "(no message)"
    out = parts[0]
    for part in parts[1:]:
        # "mismatch:" followed by its items reads best with a space; other lines with "; ".
        out += (" " if out.endswith((":", ";", ",")) else "; ") + part
    return out


def _redact(message: str) -> str:
    # stac.py pulls in pystac-client; load it only when there is a message to clean.
    try:
        from rtsmap.pipeline.stac import redact_text
    except Exception:  # pragma: no cover - a broken install must still print its one line
        return message
    return redact_text(message)


def _error_line(message: str) -> str:
    return "error: " + one_line(_redact(message))


class _RedactingFilter(logging.Filter):
    """Strips credentials from every log record our handlers print (any library's, any level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: keep its bare message
            message = str(record.msg)
        record.msg, record.args = _redact(message), None
        if record.exc_text:
            record.exc_text = _redact(record.exc_text)
        return True


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in {"torch", "torchvision", "onnx", "pycocotools"}:
                raise click.ClickException(
                    f"`rtsmap {name}` needs the training extra: pip install 'rtsmap[train]' ({exc.name} is missing)"
                ) from None
            raise
        command = getattr(module, attr)
        _add_exit_status(command)
        return command


def _add_exit_status(command: click.Command) -> None:
    """Append the exit statuses to a command's --help (once; commands are module singletons)."""
    if command.help and "Exit status:" not in command.help:
        command.help = command.help.rstrip() + "\n\n" + EXIT_STATUS_HELP


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="rtsmap")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug); tracebacks of internal errors.")
def cli(verbose: int) -> None:
    """rtsmap: map retrogressive thaw slumps from optical, SAR and DEM scenes in STAC catalogs."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())
    if not verbose:
        # urllib3 warns on every retry; the error that follows the last one says it all.
        logging.getLogger("urllib3").setLevel(logging.ERROR)


def _verbose(argv: list[str]) -> bool:
    """-v/--verbose given before the command (the group's option), read without click."""
    for arg in argv:
        if not arg.startswith("-"):
            return False  # the command name: later -v belong to it
        if arg == "--verbose" or (arg.startswith("-") and not arg.startswith("--") and "v" in arg[1:]):
            return True
    return False


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure ends in one line on stderr, never a traceback (unless -v).

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="rtsmap", standalone_mode=False)
    except RtsmapError as exc:
        _fail(_error_line(str(exc)), EXIT_INPUT, args)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo(_INTERRUPTED, err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        hint = f" (see rtsmap {exc.ctx.command_path.split(' ', 1)[-1]} --help)" if exc.ctx and exc.ctx.parent else ""
        _fail(_error_line(exc.format_message()) + hint, EXIT_INPUT, args)
    except click.ClickException as exc:
        _fail(_error_line(exc.format_message()), EXIT_INPUT, args)
    except OSError as exc:
        # Disk full, permission denied, a read-only or missing folder: the environment, not a bug.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _fail(_error_line(f"{exc.strerror or exc}{where}"), EXIT_INPUT, args)
    except MemoryError:
        _fail("error: out of memory; use a smaller AOI, fewer workers or a smaller batch", EXIT_INPUT, args)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        _fail(_error_line(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)"),
              EXIT_INTERNAL, args)
    sys.exit(EXIT_OK)


def _fail(line: str, status: int, args: list[str]) -> None:
    if _verbose(args):
        traceback.print_exc()
    # Flush what the command printed before, so the error line is the last one on stderr.
    sys.stdout.flush()
    click.echo(line, err=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
