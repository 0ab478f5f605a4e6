"""YAML loading that remembers where every key and list item came from (file, line), so that a sweep file's
errors can name the line a user has to fix. PyYAML's composed node tree carries those marks; the plain
``safe_load`` drops them (and silently keeps the last of two equal keys, which we refuse instead)."""

from __future__ import annotations

from pathlib import Path

import yaml

Path_ = tuple  # a key path: ("grid", "method", 1)


class LocatedError(ValueError):
    """An error at a place in a YAML file: ``file:line: key.path: message``."""

    def __init__(self, file: str, line: int | None, path: Path_, message: str):
        self.file, self.line, self.path, self.message = file, line, tuple(path), message
        where = f"{file}:{line}" if line else file
        key = format_path(path)
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def format_path(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class Located:
    """Plain Python data plus a map from key path to 1-based line number."""

    def __init__(self, file: str, data, lines: dict):
        self.file, self.data, self.lines = file, data, lines

    def line(self, path: Path_) -> int | None:
        """Line of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def error(self, path: Path_, message: str) -> LocatedError:
        return LocatedError(self.file, self.line(path), path, message)


def load(path: str | Path, display: str | None = None) -> Located:
    path = Path(path)
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LocatedError(name, None, (), "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocatedError(name, None, (), f"cannot read it: {e}") from None
    return loads(text, name)


def loads(text: str, name: str = "<string>") -> Located:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise LocatedError(name, mark.line + 1 if mark else None, (), f"not valid YAML: {problem}") from None
    try:
        if root is None:
            return Located(name, None, {(): 1})
        lines: dict = {(): root.start_mark.line + 1}
        try:
            data = _convert(loader, root, (), lines, name)
        except yaml.YAMLError as e:  # a tag the safe loader refuses (!!python/...): where, in one line
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            if "could not determine a constructor" in problem:
                problem = problem.replace("could not determine a constructor for the tag",
                                          "the tag is not allowed (only plain YAML is read):")
            raise LocatedError(name, mark.line + 1 if mark else None, (), f"not valid YAML: {problem}") from None
        return Located(name, data, lines)
    finally:
        loader.dispose()


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _convert(loader, node, path, lines, name):
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")  # a !!python/... tag: refused, never dropped
        raise LocatedError(name, node.start_mark.line + 1, path, f"the tag {tag} is not allowed (only plain YAML "
                           "is read)")
    if isinstance(node, yaml.MappingNode):
        out = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise LocatedError(name, knode.start_mark.line + 1, path, "keys must be plain scalars")
            key = loader.construct_object(knode, deep=True)
            sub = path + (key,)
            if key in out:
                raise LocatedError(name, knode.start_mark.line + 1, sub,
                                   f"duplicate key (first given on line {lines[sub]})")
            lines[sub] = knode.start_mark.line + 1
            out[key] = _convert(loader, vnode, sub, lines, name)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            items.append(_convert(loader, item, path + (i,), lines, name))
        return items
    return loader.construct_object(node, deep=True)
