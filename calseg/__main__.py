"""``python -m calseg``: the ``calseg`` command (:mod:`calseg.cli`)."""

from calseg.cli import app

if __name__ == "__main__":
    app(prog_name="calseg")
