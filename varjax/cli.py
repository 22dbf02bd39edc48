"""Command line: ``varjax [--debug] COMMAND ...`` (also ``python -m varjax``).

One table, :data:`COMMANDS`: each command's help, its flags and the library function it runs (which tests call
too). Commands that read a config file take ``--config.field=value`` overrides (``main``: ``--tok.field=value``
and ``--var.field=value`` / ``--ecar.field=value``). Every failure ends in one ``error:`` paragraph on stderr and
exit code != 0; ``--debug`` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from varjax import aot, demo, train
from varjax.core import compile_cache, errors
from varjax.eval import commands as eval_commands
from varjax.interop import commands as interop_commands
from varjax.sampling import commands as sampling_commands
from varjax.scaling import sweep

DESCRIPTION = """varjax: VAR (next-scale prediction) and E-CAR in JAX. `varjax COMMAND --help` lists a command's
flags. Every failure ends in one `error:` paragraph and a non-zero exit code; `varjax --debug COMMAND ...` shows
the Python traceback instead."""

CONFIG_OVERRIDES = "Any config field is set with --config.FIELD=VALUE (e.g. --config.total_steps=100)."
MAIN_OVERRIDES = ("--tok.FIELD=VALUE and --var.FIELD=VALUE (--ecar.FIELD=VALUE with --model ecar) override the "
                  "tokenizer's and the generator's configs (configs/tokenizer_shapes.py, configs/var_shapes.py, ...); "
                  "with --model ecar, --dec.FIELD=VALUE overrides the decoder's fine-tune "
                  "(configs/ecar_decoder_shapes.py).")


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable
    overrides: str | None = None  # the --PREFIX.field=value overrides it takes: run(args, the remaining arguments)


COMMANDS = {
    "convert": Command("convert released (or official-trainer) PyTorch checkpoints to a model directory; no PyTorch "
                       "needed", interop_commands.convert_args, interop_commands.convert_checkpoints),
    "sample": Command("class-conditional samples of a VAR or E-CAR model as a PNG grid (and .npz)",
                      sampling_commands.sample_args, sampling_commands.sample),
    "tokenize": Command("images -> token ids (.npz) with a VQ tokenizer", sampling_commands.image_args,
                        sampling_commands.tokenize),
    "reconstruct": Command("images -> the tokenizer's reconstructions (PNGs or .npz) and their PSNR",
                           sampling_commands.image_args, sampling_commands.reconstruct),
    "edit": Command("zero-shot in-painting, out-painting or class-conditional editing with a VAR",
                    sampling_commands.edit_args, sampling_commands.edit),
    "export": Command("model directory or training workdir -> the release's PyTorch .pth files",
                      interop_commands.export_args, interop_commands.export),
    "train": Command("train (or resume) the task a config file names: tokenizer, var or ecar",
                     train.add_arguments, train.command, CONFIG_OVERRIDES),
    "train-tokenizer": Command("train (or resume) a tokenizer from a config file (the same as `train`)",
                               train.add_arguments, train.command, overrides=CONFIG_OVERRIDES),
    "eval": Command("class consistency, the distribution metric and tokenizer scores on the embedded data (and "
                    "FID with --inception)", eval_commands.eval_args, eval_commands.evaluate),
    "sweep": Command("scaling-law sweeps: `sweep launch` trains the members, `sweep fit` fits the laws",
                     sweep.add_arguments, sweep.command, overrides=CONFIG_OVERRIDES),
    "main": Command("the whole method on the embedded dataset: tokenizer, generator, samples and eval.json",
                    demo.add_arguments, demo.command, MAIN_OVERRIDES),
    "compile": Command("compile a VAR training step ahead of time for a TPU slice or this host; memory and FLOPs",
                       aot.add_arguments, aot.command, overrides=CONFIG_OVERRIDES),
    "sample-many": Command("many samples for FID over every device and host, resumable, ADM .npz output",
                           eval_commands.sample_many_args, eval_commands.sample_many),
    "fid": Command("FID, sFID, IS, precision and recall of image sets or statistics", eval_commands.fid_args,
                   eval_commands.fid),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="varjax", description=DESCRIPTION)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on the "
                   "command line)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, c in COMMANDS.items():
        c.arguments(sub.add_parser(name, help=c.help, description=c.help, epilog=c.overrides))
    return p


def main(argv: list[str] | None = None) -> None:
    """``varjax [--debug] COMMAND ...`` (``--debug`` may come anywhere)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    with errors.boundary(debug=debug):
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        command = COMMANDS[args.command]
        if rest and not command.overrides:
            parser.parse_args(argv)  # reports the unknown arguments and exits 2
        compile_cache.enable()
        if command.overrides:
            command.run(args, rest)
        else:
            command.run(args)
