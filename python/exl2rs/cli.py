"""The ``exl2rs`` command line. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from exl2rs.errors import Exl2Error

# subcommand → (module, one-line help). Modules are imported lazily so `exl2rs allocate`
# does not pay for importing torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "measure": ("exl2rs.measure", "measure each linear's error for every candidate config"),
    "allocate": ("exl2rs.allocate_cli", "solve a measurement for a size target"),
    "frontier": ("exl2rs.allocate_cli", "error-vs-size curve of a measurement over many targets"),
    "evaluate": ("exl2rs.evaluate", "wiki-ho perplexity / KL of an HF model folder"),
    "eval": ("exl2rs.evaluate", "wiki-ho perplexity of an EXL2 dir, KL to --reference"),
    "export-gptq": ("exl2rs.export_gptq", "transcode an EXL2 dir to GPTQ-v1 (+ dynamic rules)"),
    "report": ("exl2rs.report", "HTML report of an exl2rs output: heatmap, frontier, per layer"),
    "convert": ("exl2rs.convert", "quantize a model to EXL2: measure, allocate, quantize, compile"),
    "inspect": ("exl2rs.inspect_cli", "what an EXL2 directory holds, checked against its config"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exl2rs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(_module=module_name, _command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    runner = getattr(module, f"run_{args._command}", None) or module.run
    try:
        code: int = runner(args)
    except Exl2Error as e:
        print(f"exl2rs {args._command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"exl2rs {args._command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
