"""The ``fedtrain`` command line (typer); one module per command."""

__all__: list[str] = []
