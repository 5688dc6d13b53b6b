"""Make an installed LeRobot 0.6.1 importable on Python 3.11: rewrite its PEP 695 type-parameter
syntax (``class C[T]``, ``def f[T: B]``, ``type X = ...``, Python >= 3.12) into ``typing.TypeVar`` /
``Generic`` / plain aliases.  Idempotent; touches only the five files that use the syntax.

    python tools/parity/patch_lerobot_py311.py /path/to/venv/lib/python3.11/site-packages/lerobot
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

FILES = ["processor/pipeline.py", "motors/motors_bus.py", "datasets/streaming_dataset.py",
         "datasets/aggregate.py", "utils/io_utils.py"]


def _typevars(params: str) -> tuple[list[str], str]:
    """``"TInput, TOutput"`` / ``"T: JsonLike"`` -> (TypeVar lines, ``"TInput, TOutput"``)."""
    lines, names = [], []
    for p in (x.strip() for x in params.split(",")):
        name, _, bound = (s.strip() for s in p.partition(":"))
        names.append(name)
        lines.append(f'{name} = TypeVar("{name}"' + (f", bound={bound})" if bound else ")"))
    return lines, ", ".join(names)


def patch(text: str) -> str:
    out: list[str] = []

    def add_typevars(indent: str, lines: list[str]) -> None:
        """Insert above the decorators of the definition being rewritten; skip existing ones."""
        lines = [t for t in lines if f"{t.split(' = ')[0]} = TypeVar(" not in text]
        k = len(out)
        while k > 0 and out[k - 1].startswith(indent + "@"):
            k -= 1
        out[k:k] = [indent + t + "\n" for t in lines]

    for line in text.splitlines(keepends=True):
        indent = re.match(r"\s*", line).group(0)
        m = re.match(r"(\s*)class (\w+)\[([^\]]+)\]\((.*)\):(.*)$", line, re.S)
        m0 = re.match(r"(\s*)class (\w+)\[([^\]]+)\]:(.*)$", line, re.S)
        md = re.match(r"(\s*)def (\w+)\[([^\]]+)\]\((.*)$", line, re.S)
        mt = re.match(r"(\s*)type (\w+) = (.*)$", line, re.S)
        if m:
            tv, names = _typevars(m.group(3))
            add_typevars(indent, tv)
            out.append(f"{indent}class {m.group(2)}({m.group(4)}, Generic[{names}]):{m.group(5)}")
        elif m0:
            tv, names = _typevars(m0.group(3))
            add_typevars(indent, tv)
            out.append(f"{indent}class {m0.group(2)}(Generic[{names}]):{m0.group(4)}")
        elif md:
            tv, _ = _typevars(md.group(3))
            add_typevars(indent, tv)
            out.append(f"{indent}def {md.group(2)}({md.group(4)}")
        elif mt:
            out.append(f"{mt.group(1)}{mt.group(2)} = {mt.group(3)}")
        else:
            out.append(line)
    new = "".join(out)
    if new != text and "from typing import Generic, TypeVar  # py311" not in new:
        # after the module docstring / __future__ imports: before the first other import
        lines = new.splitlines(keepends=True)
        i = next(k for k, l in enumerate(lines)
                 if l.startswith(("import ", "from ")) and "__future__" not in l)
        lines.insert(i, "from typing import Generic, TypeVar  # py311\n")
        new = "".join(lines)
    return new


def main(root: str) -> None:
    for rel in FILES:
        f = Path(root) / rel
        old = f.read_text()
        new = patch(old)
        if new != old:
            f.write_text(new)
            print(f"patched {f}")


if __name__ == "__main__":
    main(sys.argv[1])
