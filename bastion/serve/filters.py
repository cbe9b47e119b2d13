"""Output filter for `bastion serve` (ServeConfig.output_filter): redact secrets and PII from
completions with the same `Redactor` the data pipeline uses (no detectors of its own).

Non-streaming responses go through `OutputFilter.apply`. Streams go through a `StreamFilter`
per choice: a secret can arrive split over several deltas ("sk-pro" + "j-Ab3..."), so the
filter holds back the last `hold` characters (default 256) and only emits text that is
followed by at least that much -- and then only up to a whitespace boundary, and never into
the middle of a finding (without whitespace for 4 * hold characters: after punctuation). Each
piece is redacted with up to `context` (512) characters of already-emitted text on its left,
so detectors see the same context as in the whole text.
The result equals `apply(whole text)` whenever no single finding is longer than the hold-back
window; `flush()` emits the rest when the stream ends.

The price is latency: a client sees text about `hold` characters (~60 tokens) late.
"""
from __future__ import annotations

from collections import Counter

from bastion.config.schema import SanitizeConfig
from bastion.data.sanitize import Finding, Redactor, placeholder

DEFAULT_HOLD = 256
# Already-emitted text the detectors still see on the left: "Authorization: Bearer " before a
# token, "scheme://user:" before a password (looked back up to 512 characters), digit groups.
DEFAULT_CONTEXT = 512
_WHITESPACE = (" ", "\n", "\t", "\r")
_SOFT_BOUNDARY = tuple(",;\"'`()[]{}<>|\\")


class OutputFilter:
    """Redacts completions when `enabled`; otherwise returns them unchanged."""

    def __init__(self, enabled: bool, cfg: SanitizeConfig | None = None) -> None:
        self.enabled = enabled
        # names (Presidio) stays off unless a cfg asks for it: it would need a spaCy model
        self._redactor: Redactor | None = Redactor(cfg if cfg is not None else SanitizeConfig()) if enabled else None

    def apply(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with every finding replaced by its placeholder, and counts per category."""
        if self._redactor is None:
            return text, Counter()
        return self._redactor.redact(text)

    def stream(self, hold: int = DEFAULT_HOLD) -> StreamFilter:
        """A new StreamFilter (one per streamed choice)."""
        return StreamFilter(self, hold=hold)


class StreamFilter:
    """Incremental redaction of a stream of text deltas.

    `flt` is an OutputFilter, or a bool (enabled or not, default detectors).
    `feed(delta)` returns the text that may be sent now (often ""), `flush()` the rest at the
    end of the stream; `counts` accumulates the findings redacted so far. Not thread-safe:
    use one per stream.
    """

    def __init__(self, flt: OutputFilter | bool, hold: int = DEFAULT_HOLD, max_buffer: int = 65_536,
                 context: int = DEFAULT_CONTEXT) -> None:
        if hold < 1 or context < 0:
            raise ValueError("hold must be >= 1 and context >= 0")
        if isinstance(flt, bool):  # StreamFilter(cfg.output_filter)
            flt = OutputFilter(flt)
        self._redactor = flt._redactor
        self.hold = hold
        self.context = context
        self._step = max(1, hold // 8)  # after an emission, wait for this much more text
        # Without whitespace to cut at, text is held up to `force_after` characters, then cut
        # after punctuation (never inside a finding); a run of letters, digits and "_-.+/=:~"
        # longer than `max_buffer` is cut anywhere. A finding longer than max_buffer is then
        # split: its rest up to the next whitespace is redacted too ("carried"). A secret that
        # is only recognisable once complete and is longer than max_buffer (a 64 KB JWT) could
        # get out in part: no output filter can see the end of a text it has not received.
        self._force_after = 4 * hold
        self._max_buffer = max(max_buffer, self._force_after + hold)
        self.counts: Counter[str] = Counter()
        self._ctx = ""  # the last `context` characters already emitted, unredacted
        self._buf = ""  # received, not yet emitted
        self._next_try = hold  # len(_buf) at which emitting is attempted again
        self._finished = False
        self._carry: str | None = None  # category of a finding the last piece cut through

    @property
    def pending(self) -> int:
        """Characters received but not yet emitted."""
        return len(self._buf)

    def feed(self, delta: str) -> str:
        if self._finished:
            raise RuntimeError("StreamFilter.feed after flush")
        if self._redactor is None:
            return delta
        self._buf += delta
        if len(self._buf) <= self._next_try:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        """Everything still held, redacted. The filter cannot be fed afterwards."""
        if self._finished:
            return ""
        self._finished = True
        if self._redactor is None or not self._buf:
            return ""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        assert self._redactor is not None
        text = self._ctx + self._buf
        off, n = len(self._ctx), len(text)
        if final:
            cut = n
        else:
            limit = n - self.hold  # keep at least `hold` characters back
            ws = max(text.rfind(ch, off, limit) for ch in _WHITESPACE)
            if ws < off and len(self._buf) > self._force_after:
                # No whitespace: cut after punctuation that no secret contains ...
                ws = max(text.rfind(ch, off, limit) for ch in _SOFT_BOUNDARY)
            if ws >= off:
                cut = ws + 1
            elif len(self._buf) > self._max_buffer:
                cut = limit  # ... or, past max_buffer, anywhere
            else:
                return self._wait()
        findings = self._redactor.find(text)
        carried: Finding | None = None
        if self._carry is not None:
            # The previous piece ended inside a finding (a forced cut): its rest, up to the next
            # whitespace, is part of it even if the detector no longer sees it without its start.
            end = min((i for i in (text.find(ch, off) for ch in _WHITESPACE) if i >= 0), default=n)
            for f in findings:
                if f.start < end and f.end > off:
                    end = max(end, f.end)
            carried = Finding(self._carry, off, end)
            findings = [carried] + [f for f in findings if f.start >= end or f.end <= off]
            findings.sort(key=lambda f: f.start)
        split: str | None = None
        if not final:
            for f in findings:  # sorted and disjoint: at most one contains the cut
                if f.start < cut < f.end:
                    if f.start > off or len(self._buf) <= self._max_buffer:
                        cut = f.start
                    else:
                        split = f.category  # a single finding longer than max_buffer
                    break
            if cut <= off:
                return self._wait()
        parts: list[str] = []
        pos = off
        for f in findings:
            if f.end <= off:
                continue  # already emitted
            if f.start >= cut:
                break
            parts.append(text[pos:max(f.start, off)])
            if f is not carried:  # a finding cut in two gets one placeholder and one count
                parts.append(placeholder(f.category))
                if f.start >= off:
                    self.counts[f.category] += 1
            pos = min(f.end, cut)
        parts.append(text[pos:cut])
        self._carry = split
        self._ctx = text[max(0, cut - self.context):cut]
        self._buf = text[cut:]
        self._next_try = len(self._buf) + self._step
        return "".join(parts)

    def _wait(self) -> str:
        # Nothing can be emitted yet: try again once another `hold` characters have arrived,
        # so a long run without whitespace costs O(n * n / hold), not O(n * n).
        self._next_try = len(self._buf) + self.hold
        return ""
