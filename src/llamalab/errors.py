"""The one exception type that llamalab raises for bad input.

The CLI prints a ``LlamalabError`` as a single line on stderr and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class LlamalabError(Exception):
    """A problem with the user's input: a file, a request, a configuration."""
