"""chatlora studio: one local web app from a character card and dialogues to a character to take away.

Bring (upload data and a card: ``data check`` and ``data show`` of them), plan (``train --dry-run``), train and watch
(loss, tokens/s, step and ETA live over server-sent events; cancel; resume), judge (``eval`` and its report), use
(chat with the run and its base side by side; ``export`` to GGUF with the parity table; downloads). Every step is
the CLI's own command run as a subprocess (:mod:`.runs`); the page uses the documented API (:mod:`.app`) on serve's
server stack and guards.
"""

from .app import create_app, run
from .runs import Run, RunsManager, Upload

__all__ = ["Run", "RunsManager", "Upload", "create_app", "run"]
