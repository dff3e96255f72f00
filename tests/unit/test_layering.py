"""The import-linter contracts in pyproject.toml stay complete as rooms grow.

``make lint`` runs ``lint-imports``, which checks the imports themselves. A
forbidden contract can only name modules, though, so a new controller module
would silently fall outside "node processes never import controller
internals"; this test fails until it is added to those lists.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    found: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return found


def controller_internals() -> set[str]:
    """Every module or package directly under controller/, except the api contract."""
    names = set()
    for child in (REPO / "controller").iterdir():
        if child.suffix == ".py" and child.stem != "__init__":
            names.add(f"controller.{child.stem}")
        elif (child / "__init__.py").exists() and child.name != "api":
            names.add(f"controller.{child.name}")
    return names


def test_every_controller_internal_is_forbidden_to_the_contract_and_node_rooms() -> None:
    internals = controller_internals()
    assert internals, "controller/ has no modules?"
    guarded = {
        frozenset(c["source_modules"]): set(c["forbidden_modules"])
        for c in contracts()
        if c["type"] == "forbidden"
    }
    for sources in (["controller.api"], ["node"], ["agent", "ztunnel"]):
        missing = internals - guarded[frozenset(sources)]
        assert not missing, f"add {sorted(missing)} to the contract for {sources} in pyproject.toml"


def test_every_room_is_analysed() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    roots = set(config["tool"]["importlinter"]["root_packages"])
    packaged = {
        p.split(".")[0] for p in config["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert roots == packaged
