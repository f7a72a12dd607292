"""The console: gradtrace's messages in plain text where its encoding lacks their symbols (a Latin-1 locale, a Windows
code page, PYTHONIOENCODING=ascii): "n ≥ 9 − 1 … r(a₁,a₂|ID)" prints as "n >= 9 - 1 ... r(a1,a2|ID)"."""
from __future__ import annotations

import codecs
import contextlib
import io
import sys
import unicodedata

_PLAIN = {"−": "-", "–": "-", "—": "--", "…": "...", "≥": ">=", "≤": "<=", "≠": "!=", "≈": "~", "≪": "<<", "≼": "<=",
          "∝": "~", "→": "->", "√": "sqrt ", "‖": "||", "×": "x", "·": "*", "÷": "/", "±": "+/-", "°": " deg",
          "†": "*", "’": "'", "‘": "'", "“": '"', "”": '"', "θ": "theta", "Θ": "Theta", "Δ": "Delta",
          "Σ": "Sigma", "Φ": "Phi", "ε": "eps", "ρ": "rho", "β": "beta", "η": "eta", "σ": "sigma", "⁄": "/"}


def _in_plain_text(err: UnicodeError) -> tuple[str, int]:
    """Codec error handler: what the stream cannot encode, as plain text (`_PLAIN`, then the compatibility form: ₁
    as 1, ᵀ as T); whatever is left, as a backslash escape (a letter of a path, ő, is never changed into another)."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    plain = "".join(_PLAIN.get(char) or "".join(_PLAIN.get(c, c) for c in unicodedata.normalize("NFKC", char))
                    for char in err.object[err.start:err.end])
    return plain.encode(err.encoding, "backslashreplace").decode(err.encoding), err.end


codecs.register_error("gradtrace-plain", _in_plain_text)


@contextlib.contextmanager
def plain_text_where_unencodable():
    """Within: standard output and error, where their encoding lacks gradtrace's symbols, write them as plain text
    (the command line's and paper/build.py's; before, a table or a message ended in "'latin-1' codec can't encode
    character '\\u2212'" and exit 2)."""
    streams = write_plain_text_where_unencodable()
    try:
        yield
    finally:
        for stream, errors in streams:
            stream.reconfigure(errors=errors)


def write_plain_text_where_unencodable() -> list[tuple[io.TextIOWrapper, str]]:
    """Have standard output and error write gradtrace's symbols as plain text where their encoding lacks them (for
    good: a sweep's worker process); returns the streams changed, each with its error handler before."""
    streams = [(stream, stream.errors) for stream in (sys.stdout, sys.stderr)
               if isinstance(stream, io.TextIOWrapper) and _lacks_symbols(stream.encoding)]
    for stream, _ in streams:
        stream.reconfigure(errors="gradtrace-plain")
    return streams


def _lacks_symbols(encoding: str) -> bool:
    """Whether `encoding` lacks symbols gradtrace prints (ASCII, Latin-1 and the Windows code pages lack "−")."""
    try:
        "−≥…—→".encode(encoding)
    except UnicodeEncodeError:
        return True
    return False
