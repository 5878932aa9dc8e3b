"""The interactive chat: a conversation kept turn by turn, with ``/reset`` and ``/exit``, streamed as it is written.

The CLI hands in its terminal (``read`` a line, ``write`` reply text, ``note`` a status line); the library never
prints.
"""

from __future__ import annotations

from collections.abc import Callable

from .infer import ChatModel, SamplingConfig

__all__ = ["EXIT", "RESET", "repl"]

EXIT = ("/exit", "/quit")
RESET = "/reset"


def repl(
    chat: ChatModel,
    sampling: SamplingConfig,
    system: str | None,
    read: Callable[[str], str],
    write: Callable[[str], None],
    note: Callable[[str], None],
) -> None:
    """Talk with ``chat`` until ``read`` raises EOFError or the user types ``/exit``.

    Args:
        read: shows its prompt and returns the user's line (``input``).
        write: shows reply text as it arrives, without a newline of its own.
        note: shows one status line (on stderr in the CLI, apart from the conversation).
    """
    note(f"chatting with {chat.name} — /reset clears the history, /exit or Ctrl-D quits")
    history: list[dict] = []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            note("")
            return
        if not line.strip():
            continue
        if line.strip() in EXIT:
            return
        if line.strip() == RESET:
            history.clear()
            note("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        stream = chat.stream(history, sampling, system=system)
        write(f"{chat.name}> ")
        for piece in stream:
            write(piece)
        write("\n")
        if stream.reply.finish_reason == "length":
            note("(reply cut at --max-new-tokens)")
        history.append({"role": "assistant", "content": stream.reply.text})
