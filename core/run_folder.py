"""Names of the files in a run folder that more than one command reads or writes.

``core.run`` writes the resolved recipe; ``core.eval`` and ``--resume`` read it back. A module of
its own so that neither command imports the other (core has no import cycle).
"""

#: the fully resolved recipe of a run (``RUN/recipe.toml``), written by :mod:`core.run`.
RECIPE_FILE = "recipe.toml"
