"""`python -m medseg`: the `medseg` command."""
from medseg.cli import run

if __name__ == "__main__":  # spawned worker processes import this module again
    run()
