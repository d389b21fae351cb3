"""The README's examples run: every ```python block marked ``<!-- test -->`` is executed.

A block right after ``<!-- test -->`` starts an example; a block right after
``<!-- test: continued -->`` runs in the namespace of the example before it (so one example can be
told in several blocks with prose between them; unmarked blocks in between are not run). Examples
run in a temporary folder beside a link to ``../shared`` (the data the README's paths name), so the
files they write land there. An example that reads ``../shared/data`` is skipped where that data
is absent, and is marked slow (whole-model runs).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
MARK = re.compile(r"^<!--\s*test(?::\s*(continued))?\s*-->$")
FENCE = re.compile(r"^```python\s*$")


def readme_examples(text: str) -> list[tuple[int, list[tuple[int, str]]]]:
    """Per example: the line of its first block, and (line index of the fence, code) per block."""
    lines = text.splitlines()
    examples: list[tuple[int, list[tuple[int, str]]]] = []
    previous = ""  # the last non-blank line outside a code block
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            mark = MARK.match(previous)
            if FENCE.match(line) and mark:
                block = (i + 1, "\n".join(lines[i + 1:end]) + "\n")
                if mark.group(1) and examples:
                    examples[-1][1].append(block)
                else:
                    examples.append((i + 2, [block]))
            previous = ""
            i = end + 1
            continue
        if line.strip():
            previous = line.strip()
        i += 1
    return examples


EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))


def _param(start: int, blocks: list[tuple[int, str]]):
    needs_data = any("../shared/data" in code for _, code in blocks)
    marks = [pytest.mark.slow] if needs_data else []
    if needs_data and not (SHARED / "data").is_dir():
        marks.append(pytest.mark.skip(reason=f"{SHARED / 'data'} is absent"))
    return pytest.param(blocks, id=f"README.md:{start}", marks=marks)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 3, "the README's tested examples went missing (<!-- test --> marks)"
    codes = ["".join(code for _, code in blocks) for _, blocks in EXAMPLES]
    assert any("yoloq.capture(" in code and "yoloq.run_pipeline(" in code for code in codes), \
        "the custom-architecture example is not marked for testing"
    assert any(all(call in code for call in ("yoloq.quantize(", "yoloq.lower(", "yoloq.check_integer(",
                                             "yoloq.export_onnx(", "../shared/data")) for code in codes), \
        "the quantize -> lower -> check -> export example is not marked for testing"


@pytest.mark.parametrize("blocks", [_param(start, blocks) for start, blocks in EXAMPLES])
def test_readme_example(blocks, tmp_path, monkeypatch, one_thread):  # one thread: the 2 shared cores
    work = tmp_path / "work"
    work.mkdir()
    if SHARED.is_dir():
        os.symlink(SHARED, tmp_path / "shared")
    monkeypatch.chdir(work)
    namespace = {"__name__": "readme_example"}
    for fence, code in blocks:  # padded so tracebacks give the README's line numbers
        exec(compile("\n" * fence + code, str(README), "exec"), namespace)
