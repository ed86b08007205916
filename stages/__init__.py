"""One Typer command per pipeline stage; ``python -m stages.<name> --help``."""
