"""The thin Typer skin: one module per subcommand, errors formatted once in :mod:`uniflow_cli.cli.app`."""
