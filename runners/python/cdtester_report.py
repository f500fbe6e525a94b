"""cdtester's pytest reporting plugin (loaded with ``-p cdtester_report``). PYTEST_DONT_REWRITE:
it has no assertions to rewrite, and the warm worker imports it before pytest starts.

Writes one record per line, ``@@cdtester@@ {json}``, to the file named by ``CDTESTER_REPORT_FILE``
(or to the original stderr when it is ``stderr``), flushed per line so that a run killed half way
still leaves every finished record behind. Records:

* ``{"e": "item", "id": NODEID, "m": MODULE}`` for every item left after collection (and after
  deselection); the runner marks items that never finished as ``timeout`` or ``crashed``.
* ``{"e": "r", "id", "m", "w": WHEN, "c": CATEGORY, "d": SECONDS, "msg"}`` for every test report,
  where CATEGORY is what ``pytest_report_teststatus`` says, exactly what the terminal summary
  counts (``""`` for uncounted setup/teardown reports).
* ``{"e": "r", ..., "w": "collect", "c": "error"|"skipped"}`` for failed or skipped collection.
* ``{"e": "end", "exit": STATUS}`` when the session finishes.

Node ids and modules are rewritten relative to the invocation directory (the project root), so
they do not depend on which rootdir pytest picked for a single-module run.

``CDTESTER_CHUNK=i/n`` keeps only the i-th of n contiguous slices of the collected items (a slow
module split into chunks); only slice 0 reports collection errors and skips.
"""

import json
import os

import pytest

MARK = "@@cdtester@@ "
MESSAGE_CAP = 2000

_fd = None
_rootpath = None
_invocation_dir = None
_chunk = None
_config = None


def _parse_chunk(text):
    try:
        index, count = (int(x) for x in text.split("/", 1))
    except ValueError:
        return None
    if count < 1 or not 0 <= index < count:
        return None
    return index, count


def _emit(record):
    if _fd is None:
        return
    line = MARK + json.dumps(record, ensure_ascii=False) + "\n"
    data = line.encode("utf-8", "replace")
    while data:
        written = os.write(_fd, data)
        data = data[written:]


# The file part of node ids, rewritten (every test of a module has the same one).
_heads = {}


def _norm(nodeid):
    """Returns (nodeid, module) with the file part relative to the invocation directory."""
    head, sep, rest = nodeid.partition("::")
    if _rootpath is not None and _invocation_dir is not None and head:
        rel = _heads.get(head)
        if rel is None:
            path = os.path.normpath(os.path.join(str(_rootpath), head))
            rel = os.path.relpath(path, str(_invocation_dir)).replace(os.sep, "/")
            _heads[head] = rel
        if not rel.startswith("../"):
            head = rel
    return head + sep + rest, head


def _message(report):
    longrepr = report.longrepr
    text = None
    if longrepr is None:
        text = None
    elif isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = getattr(crash, "message", None) if crash is not None else None
        if not text:
            text = str(longrepr)
    if text is None and hasattr(report, "wasxfail"):
        text = report.wasxfail or None
    if text is not None and len(text) > MESSAGE_CAP:
        text = text[:MESSAGE_CAP] + "..."
    return text


def pytest_configure(config):
    global _fd, _rootpath, _invocation_dir, _chunk, _config
    _config = config
    _heads.clear()
    target = os.environ.get("CDTESTER_REPORT_FILE")
    if target == "stderr":
        _fd = os.dup(2)
    elif target:
        _fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _rootpath = config.rootpath
    _invocation_dir = config.invocation_params.dir
    chunk = os.environ.get("CDTESTER_CHUNK")
    _chunk = _parse_chunk(chunk) if chunk else None


# Run after every other plugin's modifyitems (addopts -k/-m deselection, ordering plugins), so
# chunks slice the final item list.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if _chunk is None:
        return
    index, count = _chunk
    total = len(items)
    start, stop = total * index // count, total * (index + 1) // count
    dropped = items[:start] + items[stop:]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = items[start:stop]


def pytest_collection_finish(session):
    for item in session.items:
        nodeid, module = _norm(item.nodeid)
        _emit({"e": "item", "id": nodeid, "m": module})


def pytest_collectreport(report):
    if not (report.failed or report.skipped):
        return
    if _chunk is not None and _chunk[0] != 0:
        return
    nodeid, module = _norm(report.nodeid)
    _emit(
        {
            "e": "r",
            "id": nodeid,
            "m": module,
            "w": "collect",
            "c": "error" if report.failed else "skipped",
            "d": 0.0,
            "msg": _message(report),
        }
    )


def pytest_runtest_logreport(report):
    category = ""
    if _config is not None:
        status = _config.hook.pytest_report_teststatus(report=report, config=_config)
        if status:
            category = status[0]
    nodeid, module = _norm(report.nodeid)
    record = {
        "e": "r",
        "id": nodeid,
        "m": module,
        "w": report.when,
        "c": category if isinstance(category, str) else str(category),
        "d": float(report.duration or 0.0),
    }
    if category and category != "passed":
        record["msg"] = _message(report)
    _emit(record)


def pytest_sessionfinish(session, exitstatus):
    _emit({"e": "end", "exit": int(exitstatus)})
