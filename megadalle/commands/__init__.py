"""One module per `megadalle <command>`: `add_arguments(parser)` and `run(args, cfg)`.

This is the only package (with cli.py) that knows about argparse. Each module turns parsed
arguments into calls of library code in training/, generate/, tools/, data/, dvae/, eval/ and
distributed/, and prints what the command did. cli.py lists them in COMMANDS.
"""
