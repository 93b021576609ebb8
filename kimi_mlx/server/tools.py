"""Kimi tool calls in generated text -> OpenAI `tool_calls`, as the text streams in.

Kimi's format (the checkpoint's template renders it the same way for past calls):
    <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>{json}<|tool_call_end|> ...
    <|tool_calls_section_end|>
The markers are not "special" in Kimi's tokenizer config, so they reach the reply text. Each
call's id is its `functions.NAME:INDEX` header (what the template renders back for the call's
result). Parsing a single call reuses mlx-lm's Kimi-K2 parser (same format).
"""

from __future__ import annotations

import json

from mlx_lm.tool_parsers.kimi_k2 import parse_tool_call

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
CALL_END = "<|tool_call_end|>"


def _openai_call(text: str, index: int) -> dict | None:
    """One `<|tool_call_begin|>...<|tool_call_end|>` span -> an OpenAI tool call, or None."""
    try:
        call = parse_tool_call(text)[0]
    except (ValueError, IndexError):
        return None
    args = call["arguments"]
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    call_id = call["id"] if call["id"].startswith("functions.") else f"functions.{call['id']}"
    return {"index": index, "id": call_id, "type": "function",
            "function": {"name": call["name"], "arguments": args}}


class ToolCallStream:
    """Feed reply text pieces; get (content text, completed tool calls) back as they complete.

    Text before the tool-call section is content; the section is held until each call ends.
    A marker split across pieces is held back until it is complete.
    """

    def __init__(self):
        self.buffer = ""  # text not yet classified
        self.in_section = False
        self.calls: list[dict] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.buffer += text
        content, new_calls = "", []
        while True:
            if not self.in_section:
                i = self.buffer.find(SECTION_BEGIN)
                if i >= 0:
                    content += self.buffer[:i]
                    self.buffer, self.in_section = self.buffer[i + len(SECTION_BEGIN):], True
                    continue
                keep = 0 if final else _partial_marker(self.buffer, SECTION_BEGIN)
                content += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            start, end = self.buffer.find(CALL_BEGIN), self.buffer.find(CALL_END)
            if start >= 0 and end > start:
                call = _openai_call(self.buffer[start:end + len(CALL_END)], len(self.calls))
                if call is not None:
                    self.calls.append(call)
                    new_calls.append(call)
                self.buffer = self.buffer[end + len(CALL_END):]
                continue
            i = self.buffer.find(SECTION_END)
            if i >= 0 and (start < 0 or i < start):
                self.buffer, self.in_section = self.buffer[i + len(SECTION_END):], False
                continue
            break
        return content, new_calls


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a start of `marker` (to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """A whole reply -> (content, tool calls)."""
    stream = ToolCallStream()
    content, calls = stream.feed(text, final=True)
    return content, calls
