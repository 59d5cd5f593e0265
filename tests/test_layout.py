"""The rooms keep their import rules (DESIGN.md), read from the source with ``ast``: every
``import`` counts, at module level, inside functions or under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "r2d2voice"
FORBIDDEN_IN_REALTIME = ("trio", "numpy", "socket", "sqlite3", "trio_websocket")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. "r2d2voice.audio.pcm"
    target: str  # dotted name imported, e.g. "r2d2voice.errors" or "numpy"
    where: str  # "path:line", for the failure message

    def __str__(self) -> str:
        return f"{self.where} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[Import]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, where) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # ``from r2d2voice import audio`` imports the room, not the top-level package
            if module == "r2d2voice" or (node.level and not node.module):
                found += [Import(name, f"{module}.{alias.name}", where) for alias in node.names]
            else:
                found.append(Import(name, module, where))
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


ALL = [imp for path in _modules() for imp in _imports(path)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _from_room(room: str) -> list[Import]:
    return [imp for imp in ALL if _within(imp.importer, f"r2d2voice.{room}")]


def _report(bad: list[Import]) -> str:
    return "\n".join(map(str, bad))


def test_the_rules_see_imports_inside_functions() -> None:
    # portaudio.py imports sounddevice only inside a function, to keep `--help` fast
    assert any(imp.target == "sounddevice" for imp in _from_room("audio.portaudio"))


@pytest.mark.parametrize("room", ["realtime", "live", "protocol"])
def test_protocol_cores_import_only_themselves_protocol_and_the_standard_library(
        room: str) -> None:
    def allowed(target: str) -> bool:
        top = target.partition(".")[0]
        if any(_within(target, m) for m in FORBIDDEN_IN_REALTIME):
            return False
        return (_within(target, f"r2d2voice.{room}") or _within(target, "r2d2voice.protocol")
                or top in sys.stdlib_module_names)

    bad = [imp for imp in _from_room(room) if not allowed(imp.target)]
    assert not bad, _report(bad)


@pytest.mark.parametrize("room", ["audio", "storage"])
def test_audio_and_storage_import_neither_link_nor_appliance(room: str) -> None:
    bad = [imp for imp in _from_room(room)
           if _within(imp.target, "r2d2voice.link") or _within(imp.target, "r2d2voice.appliance")]
    assert not bad, _report(bad)


def test_localbackend_imports_only_audio_and_the_protocol_rooms() -> None:
    allowed = ("r2d2voice.localbackend", "r2d2voice.audio", "r2d2voice.realtime",
               "r2d2voice.live", "r2d2voice.protocol")
    bad = [imp for imp in _from_room("localbackend")
           if _within(imp.target, "r2d2voice") and not any(_within(imp.target, a) for a in allowed)]
    assert not bad, _report(bad)


def test_only_cli_imports_click() -> None:
    bad = [imp for imp in ALL
           if _within(imp.target, "click") and not _within(imp.importer, "r2d2voice.cli")]
    assert not bad, _report(bad)


def test_every_subpackage_has_a_one_line_docstring() -> None:
    inits = [p for p in _modules() if p.name == "__init__.py"]
    dirs = {p for p in PACKAGE.rglob("*") if p.is_dir() and any(p.glob("*.py"))}
    assert dirs <= {p.parent for p in inits}, "a folder of modules without __init__.py"
    bad = []
    for init in inits:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        if not doc or "\n" in doc.strip():
            bad.append(f"{init.relative_to(PACKAGE.parent)}: {doc!r}")
    assert not bad, "\n".join(bad)
