"""Writes the part of requirements.lock an image needs, hashes included, so the images install
the exact versions the test suite ran against without the dev extra (pytest, moto, browsers...).

    python lock_subset.py requirements.lock pyproject.toml [--drop torch ...] [--add moto ...]
    python lock_subset.py requirements.lock pyproject.toml --only torch

Roots: pyproject.toml's `dependencies` minus `--drop`, plus `--add`. A locked package is kept when
it is a root or when any package it is locked "via" is kept, so what only a dropped root needs
(torch's sympy, say) goes too. The lock's index lines (this machine's local mirrors) are left
out: an image's pip reads the public index.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, tuple[list[str], set[str]]]:
    """name -> (the requirement's lines, the names it is locked via)."""
    out: dict[str, tuple[list[str], set[str]]] = {}
    current: str | None = None
    in_via = False
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith(("#", "-")):
            current = canon(NAME.match(line).group(1))
            out[current] = ([line], set())
            in_via = False
        elif current is None:
            continue
        elif line.strip().startswith("--hash"):
            out[current][0].append(line)
        elif line.strip().startswith("# via"):
            rest = line.strip()[len("# via") :].strip()
            in_via = not rest
            if rest:
                out[current][1].add(canon(rest.split()[0]))
        elif in_via and line.strip().startswith("#   "):
            out[current][1].add(canon(line.strip()[4:].split()[0]))
        else:
            in_via = False
    return out


def subset(lock: dict, roots: set[str]) -> list[str]:
    missing = roots - set(lock)
    if missing:
        raise SystemExit(f"not in the lock: {', '.join(sorted(missing))}")
    keep = set(roots)
    changed = True
    while changed:
        changed = False
        for name, (_, via) in lock.items():
            if name not in keep and via & keep:
                keep.add(name)
                changed = True
    return sorted(keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lock")
    ap.add_argument("pyproject")
    ap.add_argument("--drop", nargs="*", default=[], help="dependencies of pyproject.toml to leave out")
    ap.add_argument("--add", nargs="*", default=[], help="locked packages to add as roots")
    ap.add_argument("--without-project", action="store_true", help="roots are --add only")
    ap.add_argument("--only", nargs="*", help="just these locked packages, without what they need")
    args = ap.parse_args(argv)
    with open(args.lock) as f:
        lock = parse_lock(f.read())
    if args.only is not None:
        for name in map(canon, args.only):
            if name not in lock:
                raise SystemExit(f"not in the lock: {name}")
            sys.stdout.write("\n".join(lock[name][0]) + "\n")
        return 0
    with open(args.pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    roots = set() if args.without_project else {canon(NAME.match(d).group(1)) for d in deps}
    drop = {canon(d) for d in args.drop}
    unknown = drop - roots
    if unknown:
        raise SystemExit(f"--drop names no dependency of {args.pyproject}: {', '.join(sorted(unknown))}")
    roots = (roots - drop) | {canon(a) for a in args.add}
    # A dropped root stays out even if something kept is locked via it only through the dev extra.
    keep = [n for n in subset(lock, roots) if n not in drop]
    for name in keep:
        sys.stdout.write("\n".join(lock[name][0]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
