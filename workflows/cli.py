"""The ``rtsmap`` command line.

Commands are registered by name and imported only when invoked, so ``rtsmap run`` and
``rtsmap plan`` never import torch (only train/evaluate/export do), and a GPU worker image
needs onnxruntime alone.
"""

from __future__ import annotations

import importlib
import logging
import sys

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
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rtsmap")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """rtsmap: map retrogressive thaw slumps from optical, SAR and DEM scenes in STAC catalogs."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        # urllib3 warns on every retry; the error that follows the last one says it all.
        logging.getLogger("urllib3").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors end in one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="rtsmap", standalone_mode=False)
    except RtsmapError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
