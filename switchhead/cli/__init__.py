"""The `switchhead-rewrite` command (entry point `switchhead.cli:main`): convert.py is the command,
heal.py its --heal-* options, render.py its tables, common.py exit codes and progress."""

from switchhead.cli.common import CliError, ExitCode
from switchhead.cli.convert import main
from switchhead.cli.render import collapse_sites, print_site_tables

__all__ = ["CliError", "ExitCode", "collapse_sites", "main", "print_site_tables"]
