"""``chatlora eval``: base vs tuned model on held-out conversations. ``command`` selects the records, measures and
writes; ``persona`` measures the persona section; ``results`` holds what was measured and ``report`` renders it.
"""

from .command import *  # noqa: F403 - the command's API is the package's
from .command import __all__  # noqa: F401
