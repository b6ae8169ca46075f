"""The ``aace`` command line: train, sweep, tune, eval, compare, plot, sharpness, presets.

Every user error becomes one line on stderr and exit status 2; ``--debug`` shows the traceback.
The package, one concept per module:

* :mod:`~aace.cli.arguments`: what the subcommands share: one-line usage errors, deprecated
  spellings, the ``aace train`` flags and the :class:`~aace.training.config.RunConfig` they make;
* :mod:`~aace.cli.parser`: :func:`build_parser`, every subcommand's flags;
* :mod:`~aace.cli.search`: ``aace sweep`` and ``aace tune``, flags and handlers;
* :mod:`~aace.cli.commands`: :func:`main`, the other handlers, errors to exit statuses.
"""

from aace.cli.arguments import add_run_arguments, config_from_args
from aace.cli.commands import main
from aace.cli.parser import build_parser

__all__ = ["add_run_arguments", "build_parser", "config_from_args", "main"]
