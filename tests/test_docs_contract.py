"""README's "Log events" and metrics tables held to the code, both ways.

Operators build alerts and log rules on those two tables, so an event the code writes
and the README does not list (or lists under another level, emitter or field name), a
row for an event nothing writes, or a metric family whose type or labels differ from its
row, is a bug in one of them. Events are read from the code's AST (every call that
writes a line, helpers that forward an event name included), metrics from `render`.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkproxy import metrics

from conftest import LOOPBACK, Proxy, control, free_port

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forkproxy"
README = ROOT / "README.md"

LEVELS = {"debug", "info", "warning", "error"}
# Logger's own names for the levels, as `emit(LEVEL, ...)` passes them.
LEVEL_NAMES = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error"}
# Logger methods: the level each writes at, and where its event and fields are. `prepare`
# and `emit` take the level first; `emit_requested` writes at info whatever the verbosity.
LEVEL_METHODS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error"}
LEVEL_FIRST = {"emit", "prepare", "_line"}
# Which process writes a module's lines ("from" column), and the functions that run in
# another process than their module's: a connection's child after the fork, SIGUSR1's
# reporter (forked for the table), a metrics process's own lines.
MODULE_EMITTER = {"supervisor.py": "supervisor", "relay.py": "connection child",
                  "metrics.py": "metrics process", "_metrics_main.py": "metrics process"}
FUNCTION_EMITTER = {"Supervisor._accept_handler.accept_clients": "connection child",
                    "Supervisor._log_status_table": "SIGUSR1's reporter",
                    "write_start_error": "`serve`, before it starts",
                    "Logger._log_dropped": "supervisor"}

EMITTERS = {*MODULE_EMITTER.values(), *FUNCTION_EMITTER.values()}


@dataclass
class Emission:
    """Where an event is written, at which level, with which fields (`open_fields`:
    some come from a dict this test cannot read, so only the known ones are checked)."""

    event: str
    where: str
    levels: set[str]
    fields: set[str]
    emitter: str
    open_fields: bool = False


@dataclass
class Row:
    event: str
    levels: set[str]
    emitter: str
    fields: set[str] = field(default_factory=set)


def _dict_keys(node: ast.AST) -> set[str]:
    """The string keys of every dict display (and dict(k=...) call) in `node`."""
    keys: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Dict):
            keys |= {k.value for k in sub.keys
                     if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "dict":
            keys |= {k.arg for k in sub.keywords if k.arg}
        elif isinstance(sub, ast.DictComp) and isinstance(sub.generators[0].iter, ast.Tuple):
            # `{key: row[key] for key in ("queued", "backlog")}`: its keys are the tuple's
            keys |= {e.value for e in sub.generators[0].iter.elts
                     if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return keys


class _Scanner:
    """The events written by forkproxy/*.py."""

    def __init__(self) -> None:
        self.trees = {p.name: ast.parse(p.read_text(), p.name)
                      for p in sorted(PACKAGE.glob("*.py"))}
        self.functions: dict[str, ast.FunctionDef] = {}
        for tree in self.trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef):
                    self.functions.setdefault(node.name, node)
        self.emissions: list[Emission] = []
        # Calls that look like a line written through a logger this scan does not know
        self.unread: list[str] = []
        # Helpers that forward an event name: name -> (index of `event` among the
        # call's positional arguments, levels, fields they add, their own parameters).
        self.helpers: dict[str, tuple[int, set[str], set[str], set[str]]] = {}
        self._find_helpers()
        for module, tree in self.trees.items():
            self._visit(module, tree, [], [])

    # -- reading what a call writes ----------------------------------------------------

    def _name_keys(self, name: str, function: ast.FunctionDef | None) -> set[str] | None:
        """The keys a dict held by `name` in `function` is given: its display, its
        `name[key] = ...` and `name.update(key=...)`; None when not built there."""
        if function is None:
            return None
        keys: set[str] = set()
        built = False
        for node in ast.walk(function):
            targets: list[ast.expr] = []
            value: ast.expr | None = None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for target in targets:
                if isinstance(target, ast.Name) and target.id == name and value is not None:
                    found = self._expr_keys(value, function)
                    if found is None:
                        return None
                    keys |= found
                    built = True
                elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                      and target.value.id == name and isinstance(target.slice, ast.Constant)
                      and isinstance(target.slice.value, str)):
                    keys.add(target.slice.value)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "update" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == name):
                keys |= {k.arg for k in node.keywords if k.arg}
        return keys if built else None

    def _expr_keys(self, expr: ast.expr, function: ast.FunctionDef | None) -> set[str] | None:
        """The keys of the dict `expr` makes (a display, a conditional one, a name built in
        `function`, a call to a forkproxy function that returns one); None if unknown."""
        if isinstance(expr, ast.Name):
            return self._name_keys(expr.id, function)
        if isinstance(expr, ast.Call):
            callee = expr.func.id if isinstance(expr.func, ast.Name) else (
                expr.func.attr if isinstance(expr.func, ast.Attribute) else "")
            if callee == "dict":
                # dict(other): a copy of a dict built elsewhere, its keys unknown here
                return None if expr.args else _dict_keys(expr)
            defined = self.functions.get(callee)
            if defined is None:
                return None
            keys: set[str] = set()
            for node in ast.walk(defined):
                if isinstance(node, ast.Return) and node.value is not None:
                    found = self._expr_keys(node.value, defined)
                    if found is None:
                        return None
                    keys |= found
            return keys
        if isinstance(expr, ast.Dict | ast.IfExp | ast.BoolOp):
            return _dict_keys(expr)
        return None

    def _fields(self, call: ast.Call, skip: int,
                function: ast.FunctionDef | None) -> tuple[set[str], bool]:
        """A call's field names: its keywords and `**dict`s, and the dict argument after
        `skip` positional ones (emit's fields). True with them when some are unknown."""
        names: set[str] = set()
        unknown = False
        for keyword in call.keywords:
            if keyword.arg is not None:
                names.add(keyword.arg)
                continue
            found = self._expr_keys(keyword.value, function)
            if found is None:
                unknown = True
            else:
                names |= found
        for arg in call.args[skip:skip + 1]:  # emit's, _line's (then the pid)
            found = self._expr_keys(arg, function)
            if found is None:
                unknown = True
            else:
                names |= found
        return names, unknown

    def _levels(self, call: ast.Call, function: ast.FunctionDef | None) -> tuple[str, set[str]]:
        """The method a Logger call names, and the levels it writes at."""
        assert isinstance(call.func, ast.Attribute)
        method = call.func.attr
        if method in LEVEL_METHODS:
            return method, {LEVEL_METHODS[method]}
        if method == "emit_requested":
            return method, {"info"}
        level = call.args[0]
        if isinstance(level, ast.Name) and level.id in LEVEL_NAMES:
            return method, {LEVEL_NAMES[level.id]}
        # A level chosen in the function (`level = DEBUG if ... else WARNING`)
        assert isinstance(level, ast.Name) and function is not None, ast.unparse(call)
        levels = set()
        for node in ast.walk(function):
            if (isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == level.id for t in node.targets)):
                levels |= {LEVEL_NAMES[n.id] for n in ast.walk(node.value)
                           if isinstance(n, ast.Name) and n.id in LEVEL_NAMES}
        assert levels, f"no level found for {ast.unparse(call)}"
        return method, levels

    @staticmethod
    def _is_log_call(call: ast.Call) -> bool:
        func = call.func
        if not isinstance(func, ast.Attribute):
            return False
        if func.attr not in (*LEVEL_METHODS, *LEVEL_FIRST, "emit_requested"):
            return False
        # Logger calls only: `self.log.x`, `log.x`, `server.log.x`, `logger.x`,
        # `self.x` inside log.py, `Logger(...).x`. Not `warnings.warn`-likes.
        owner = func.value
        text = ast.unparse(owner)
        return (text in ("log", "logger", "self") or text.endswith(".log")
                or (isinstance(owner, ast.Call) and ast.unparse(owner.func) == "Logger"))

    # -- helpers that forward an event name --------------------------------------------

    def _find_helpers(self) -> None:
        """Functions with an `event` parameter that write it (directly, or through
        another such helper): their callers name the event."""
        changed = True
        while changed:
            changed = False
            for name, function in self.functions.items():
                if name in self.helpers:
                    continue
                params = [a.arg for a in function.args.args]
                if "event" not in params:
                    continue
                index = params.index("event") - (1 if params[0] == "self" else 0)
                own = {a.arg for a in (*function.args.args, *function.args.kwonlyargs)}
                for node in ast.walk(function):
                    if not (isinstance(node, ast.Call) and node.args):
                        continue
                    callee = self._callee(node)
                    if callee in LEVEL_METHODS and self._is_log_call(node):
                        first = node.args[0]
                        if isinstance(first, ast.Name) and first.id == "event":
                            fields, _ = self._fields(node, 1, function)
                            self.helpers[name] = (index, {LEVEL_METHODS[callee]}, fields, own)
                            changed = True
                            break
                    elif callee in self.helpers and callee != name:
                        inner_index, levels, fields, _ = self.helpers[callee]
                        passed = node.args[inner_index] if len(node.args) > inner_index else None
                        if isinstance(passed, ast.Name) and passed.id == "event":
                            more, _ = self._fields(node, len(node.args), function)
                            self.helpers[name] = (index, levels, fields | more, own)
                            changed = True
                            break

    @staticmethod
    def _callee(call: ast.Call) -> str:
        func = call.func
        if isinstance(func, ast.Attribute):
            return func.attr
        return func.id if isinstance(func, ast.Name) else ""

    # -- the walk ------------------------------------------------------------------------

    def _visit(self, module: str, node: ast.AST, scope: list[str],
               stack: list[ast.AST]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.ClassDef):
                inner = [*scope, child.name]
            if isinstance(child, ast.Call):
                self._call(module, child, inner, [*stack, node])
            self._visit(module, child, inner, [*stack, node])

    def _emitter(self, module: str, scope: list[str]) -> str:
        for depth in range(len(scope), 0, -1):
            emitter = FUNCTION_EMITTER.get(".".join(scope[:depth]))
            if emitter is not None:
                return emitter
        return MODULE_EMITTER.get(module, "")

    def _function(self, stack: list[ast.AST]) -> ast.FunctionDef | None:
        for node in reversed(stack):
            if isinstance(node, ast.FunctionDef):
                return node
        return None

    def _call(self, module: str, call: ast.Call, scope: list[str],
              stack: list[ast.AST]) -> None:
        function = self._function(stack)
        where = f"{module}:{call.lineno}"
        emitter = self._emitter(module, scope)
        callee = self._callee(call)
        if callee in self.helpers and not self._is_log_call(call):
            index, levels, fields, own = self.helpers[callee]
            named = call.args[index] if len(call.args) > index else None
            if isinstance(named, ast.Constant) and isinstance(named.value, str):
                extra = {k.arg for k in call.keywords if k.arg and k.arg not in own}
                self.emissions.append(Emission(named.value, where, set(levels),
                                               fields | extra, emitter))
            return
        if not self._is_log_call(call) or not call.args:
            first = call.args[0] if call.args else None
            if (callee in LEVEL_METHODS and isinstance(first, ast.Constant)
                    and isinstance(first.value, str) and re.fullmatch(r"[a-z]+(-[a-z]+)+",
                                                                      first.value)):
                self.unread.append(f"{where}: {ast.unparse(call.func)}")  # a logger renamed?
            return
        position = 1 if self._callee(call) in LEVEL_FIRST else 0
        event = call.args[position]
        if (isinstance(event, ast.Name) and function is not None
                and event.id in [a.arg for a in function.args.args]):
            # Logger's own plumbing (emit -> _line), or a helper's: its callers name it
            assert module == "log.py" or function.name in self.helpers, (
                f"{where}: {function.name} forwards an event name this test does not follow")
            return
        _, levels = self._levels(call, function)
        fields, unknown = self._fields(call, position + 1, function)
        if isinstance(event, ast.Constant) and isinstance(event.value, str):
            self.emissions.append(Emission(event.value, where, levels, fields, emitter,
                                           unknown))
            return
        assert isinstance(event, ast.Name), where
        for name in self._loop_events(event.id, call, stack, function):
            self.emissions.append(Emission(name, where, levels, fields, emitter, unknown))

    def _loop_events(self, name: str, call: ast.Call, stack: list[ast.AST],
                     function: ast.FunctionDef | None) -> list[str]:
        """The event names a `for event, ... in TUPLES` loop gives `name`, but those a
        guard around the call (`if variable:`) rules out, as its tuple holds "" there."""
        loop = next((n for n in reversed(stack) if isinstance(n, ast.For)
                     and isinstance(n.target, ast.Tuple)
                     and any(isinstance(e, ast.Name) and e.id == name
                             for e in n.target.elts)), None)
        assert loop is not None and isinstance(loop.target, ast.Tuple), ast.unparse(call)
        names = [e.id if isinstance(e, ast.Name) else "" for e in loop.target.elts]
        source: ast.AST = loop.iter
        # A name's assignment, and through a filter of another list (`new = [entry for
        # entry in found if ...]`) that list's, to the tuples themselves.
        while function is not None:
            if isinstance(source, ast.ListComp) and len(source.generators) == 1:
                source = source.generators[0].iter
            if not isinstance(source, ast.Name):
                break
            wanted = source.id
            source = next(n.value for n in ast.walk(function) if isinstance(n, ast.Assign)
                          and any(isinstance(t, ast.Name) and t.id == wanted
                                  for t in n.targets))
        guards: list[tuple[str, bool]] = []  # (name, truthy wanted) of the ifs around it
        inner: ast.AST = call
        for node in reversed(stack):
            if node is loop:
                break
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name):
                guards.append((node.test.id, any(inner is s for s in node.body)))
            inner = node
        events = []
        for found in ast.walk(source):
            if not (isinstance(found, ast.Tuple) and len(found.elts) == len(names)):
                continue
            values = dict(zip(names, found.elts, strict=True))
            event = values[name]
            if not (isinstance(event, ast.Constant) and isinstance(event.value, str)):
                continue
            ruled_out = False
            for guard, truthy in guards:
                value = values.get(guard)
                if isinstance(value, ast.Constant) and bool(value.value) != truthy:
                    ruled_out = True
            if not ruled_out:
                events.append(event.value)
        assert events, ast.unparse(call)
        return events


@functools.cache
def _scanner() -> _Scanner:
    return _Scanner()


@functools.cache
def _emissions() -> dict[str, list[Emission]]:
    by_event: dict[str, list[Emission]] = {}
    for emission in _scanner().emissions:
        by_event.setdefault(emission.event, []).append(emission)
    return by_event


def _section(text: str, heading: str) -> list[str]:
    """The lines of the README section under `heading`, up to the next heading."""
    lines = text.splitlines()
    start = lines.index(heading)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("#"))
    return lines[start + 1:end]


def _cells(line: str) -> list[str]:
    """A table row's cells (`\\|` inside a cell is not a separator)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _top_level(text: str) -> str:
    """`text` without its parenthesized asides (an example's `(`...`)` names no field)."""
    out, depth = [], 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)
        elif not depth:
            out.append(char)
    return "".join(out)


def _event_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    lines = _section(README.read_text(), "#### Log events")
    table = [line for line in lines if line.startswith("| `")]
    assert table, "README's Log events table not found"
    for line in table:
        cells = _cells(line)
        assert len(cells) == 5, line
        event = re.fullmatch(r"`([a-z0-9-]+)`", cells[0])
        assert event, cells[0]
        levels = set(re.findall(r"[a-z]+", cells[1])) & LEVELS
        assert levels, f"{event.group(1)}: no level in {cells[1]!r}"
        fields = set(re.findall(r"`([a-z_]+)`", _top_level(cells[3])))
        assert event.group(1) not in rows, f"{event.group(1)}: two rows"
        rows[event.group(1)] = Row(event.group(1), levels, cells[2], fields)
    return rows


# Every line has these (the README's field lists leave them out): no event may pass one.
COMMON_FIELDS = {"ts", "level", "pid", "event"}


def test_every_event_the_code_writes_is_a_readme_row() -> None:
    rows = _event_rows()
    problems = []
    for event, emissions in sorted(_emissions().items()):
        row = rows.get(event)
        if row is None:
            problems.append(f"{event} ({emissions[0].where}): no README row")
            continue
        levels = set().union(*(e.levels for e in emissions))
        if levels != row.levels:
            problems.append(f"{event}: README says {sorted(row.levels)}, code writes "
                            f"{sorted(levels)}")
        for emission in emissions:
            if emission.emitter and emission.emitter not in row.emitter:
                problems.append(f"{event} ({emission.where}): written by {emission.emitter}, "
                                f"README's from: {row.emitter!r}")
        # And back: each process the row names (not in an aside) writes it somewhere.
        named = {e for e in EMITTERS if e in _top_level(row.emitter)}
        if named - {e.emitter for e in emissions}:
            problems.append(f"{event}: README's from names {sorted(named)}, the code's "
                            f"writers are {sorted({e.emitter for e in emissions})}")
        written = set().union(*(e.fields for e in emissions))
        if written & COMMON_FIELDS:  # in JSON it would overwrite the line's own
            problems.append(f"{event}: fields {sorted(written & COMMON_FIELDS)} are every "
                            "line's own")
        if written - row.fields:
            where = sorted({e.where for e in emissions if e.fields - row.fields})
            problems.append(f"{event}: fields {sorted(written - row.fields)} ({where}) not in "
                            f"README's {sorted(row.fields)}")
        if not any(e.open_fields for e in emissions) and row.fields - written:
            problems.append(f"{event}: README's fields {sorted(row.fields - written)} are "
                            "never written")
    assert not problems, "\n".join(problems)


def test_every_readme_event_is_written_somewhere() -> None:
    missing = set(_event_rows()) - set(_emissions())
    assert not missing, f"README rows for events nothing writes: {sorted(missing)}"


def test_the_scan_finds_what_it_must() -> None:
    """The scan is not vacuous: the ways an event is written each found, with their
    fields (a helper's, a loop's, a dict built apart, a prepared line, a dropped line),
    and no `x.warning("some-event", ...)` through a logger it does not recognize."""
    assert not _scanner().unread
    found = _emissions()
    assert len(found) > 60
    assert found["accept-failed"][0].fields >= {"link", "error", "failures", "detail"}
    assert {e.emitter for e in found["relay-crashed"]} == {"connection child"}
    assert found["relay-crashed"][0].fields == {"link", "client", "upstream", "error",
                                                "detail"}
    assert {"variable", "detail"} == set().union(*(e.fields for e in found["env-file-option"]))
    assert {"detail"} == set().union(*(e.fields for e in found["link-skipped"]))
    assert set().union(*(e.levels for e in found["resolve-failed"])) == {"debug", "warning",
                                                                         "error"}
    assert "queued" in set().union(*(e.fields for e in found["listen-drops"]))
    assert {e.where.split(":")[0] for e in found["open"]} == {"relay.py"}
    assert "log-dropped" in found and "start-failed" in found and "status-link" in found


# -- metrics -----------------------------------------------------------------------------

_LINK_STATS = {
    "active": 1, "waiting": 0, "connections": 3, "outcomes": {"closed": 2}, "empty": 0,
    "denied": 0, "upstream_failures_by_reason": {"refused": 1}, "bytes_up": 10,
    "bytes_down": 20, "duration_buckets": [1, 1], "duration_count": 2, "duration_sum": 0.5,
    "cpu_seconds": 0.1, "since": 1.0, "resolve_failures": 0, "address_changes": 0,
    "fork_failures": 0, "listen": "127.0.0.1:6379", "queued": 0, "backlog": 128,
    "drops": 0, "listening": True,
}


def _metric_rows() -> dict[str, tuple[str, set[str], str]]:
    """README's metrics table: family name -> (type, labels, `direction`'s values)."""
    lines = _section(README.read_text(), "### Status, health and metrics")
    start = lines.index("| metric | type | labels |")
    rows: dict[str, tuple[str, set[str], str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        names_cell, type_cell, labels_cell = _cells(line)
        names = re.findall(r"`(forkproxy_[a-z_]+)`", names_cell)
        assert names, line
        types = re.findall(r"\b(gauge|counter|histogram|summary)\b", _top_level(type_cell))
        assert len(types) in (1, len(names)), line
        labels = set(re.findall(r"`([a-z_]+)`(?! \\?\|)", labels_cell)) - {
            "upstream", "downstream"}
        for i, name in enumerate(names):
            assert name not in rows, f"{name}: two rows"
            rows[name] = (types[i if len(types) > 1 else 0], labels, labels_cell)
    return rows


def _families() -> dict[str, tuple[str, set[str]]]:
    """What render yields for no reply and for a real-looking one, by exposed name."""
    status = {"pid": 1, "links": {"L": _LINK_STATS}, "children": [],
              "duration_buckets": [0.1, 1.0], "max_children": 10, "memory_limit": 1 << 30,
              "pids_limit": 100, "nproc_limit": 200, "orphans_reaped": 0,
              "metrics": {"restarts": 0}, "start_time": 1.0, "config_loaded": 1.0,
              "last_reload": None, "reloads": {"success": 0, "failure": 0},
              "listeners": [{"link": "L", "listening": True, "drops": 0, "queued": 0,
                             "backlog": 128}]}
    # The families without a reply (describe's) are those of one: none left out.
    described = {(f.name, f.type) for f in metrics.render({})}
    families: dict[str, tuple[str, set[str]]] = {}
    for family in metrics.render(status):
        assert family.samples, f"{family.name}: no sample, its labels unknown"
        # As exposed: a counter's samples end in _total (`le`: a histogram's buckets)
        name = family.name + ("_total" if family.type == "counter" else "")
        families[name] = (family.type, {k for s in family.samples for k in s.labels} - {"le"})
    assert described == {(f.name, f.type) for f in metrics.render(status)}
    return families


def test_every_metric_family_is_a_readme_row_with_its_type_and_labels() -> None:
    rows = _metric_rows()
    families = _families()
    problems = []
    for name, (kind, labels) in sorted(families.items()):
        row = rows.get(name)
        if row is None:
            problems.append(f"{name}: no README row")
            continue
        if row[0] != kind:
            problems.append(f"{name}: README says {row[0]}, it is a {kind}")
        if row[1] != labels:
            problems.append(f"{name}: README's labels {sorted(row[1])}, its {sorted(labels)}")
    missing = set(rows) - set(families)
    if missing:
        problems.append(f"README rows for metrics nothing serves: {sorted(missing)}")
    assert not problems, "\n".join(problems)


def test_the_direction_label_has_the_values_the_readme_gives() -> None:
    status = {"links": {"L": _LINK_STATS}, "duration_buckets": [0.1, 1.0]}
    family = next(f for f in metrics.render(status) if f.name == "forkproxy_bytes")
    values = {s.labels["direction"] for s in family.samples}
    row = _metric_rows()["forkproxy_bytes_total"][2]
    assert set(re.findall(r"`(upstream|downstream)`", row)) == values == {"upstream",
                                                                          "downstream"}


def test_status_connection_fields_are_the_snapshot_children_keys() -> None:
    """`status-connection` writes each child of Accounting.snapshot as it is (its `pid`
    renamed `child_pid`), a dict the scan above cannot follow: its keys, read here."""
    tree = ast.parse((PACKAGE / "accounting.py").read_text())
    snapshot = next(n for n in ast.walk(tree)
                    if isinstance(n, ast.FunctionDef) and n.name == "snapshot")
    appended = next(n for n in ast.walk(snapshot) if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Attribute) and n.func.attr == "append"
                    and ast.unparse(n.func.value) == "children")
    keys = _dict_keys(appended.args[0])
    assert "pid" in keys
    assert _event_rows()["status-connection"].fields == keys - {"pid"} | {"child_pid"}


def test_a_real_status_renders_the_families_the_table_is_checked_against(
    start_proxy: Callable[..., Proxy], tmp_path: Path, env: dict[str, str]
) -> None:
    """The status above is made up: a real supervisor's reply renders the same
    families, with the same types, and each of its samples has the labels checked."""
    port = free_port()
    env_file = tmp_path / "links.env"
    env_file.write_text(f"CACHE_PORT_{port}_TCP=tcp://127.0.0.1:{free_port()}\n")
    sock_path = tmp_path / "status.sock"
    start_proxy("--env-file", str(env_file), *LOOPBACK, "--status-socket", str(sock_path),
                env=env)
    checked = _families()
    rendered = list(metrics.render(control(sock_path, "status")))
    assert {(f.name + ("_total" if f.type == "counter" else ""), f.type)
            for f in rendered} == {(name, kind) for name, (kind, _) in checked.items()}
    sampled = 0
    for family in rendered:
        name = family.name + ("_total" if family.type == "counter" else "")
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == checked[name][1], sample
            sampled += 1
    assert sampled > 20
