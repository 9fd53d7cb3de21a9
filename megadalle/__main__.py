from megadalle.cli import run

run()
