"""cdtester unittest driver: runs one module's unittest tests and writes one JSON line per event
to RESULTS: {"collected": [nodeid...]}, then {"nodeid", "outcome", "duration", "message"} per
test, then {"done": true}. Usage: python -c DRIVER run MODULE RESULTS CHUNK_INDEX CHUNK_COUNT"""
import importlib
import json
import os
import sys
import time
import unittest


def first_line(exc_info):
    etype, value, _ = exc_info
    text = "%s: %s" % (etype.__name__, value) if str(value) else etype.__name__
    return text.strip().splitlines()[0] if text.strip() else etype.__name__


class JsonResult(unittest.TestResult):
    def __init__(self, module_path, modname, emit):
        super().__init__()
        self.module_path, self.modname, self.emit = module_path, modname, emit
        self.fixtures = {}  # "module" or class name -> (outcome, message) of setUpModule/setUpClass
        self.reported = set()
        self.current = None

    def nodeid(self, test):
        tid = test.id()
        if tid.startswith(self.modname + "."):
            tid = tid[len(self.modname) + 1:]
        return self.module_path + "::" + tid.replace(".", "::")

    def record(self, nodeid, outcome, duration, message=None):
        self.reported.add(nodeid)
        entry = {"nodeid": nodeid, "outcome": outcome, "duration": round(duration, 6)}
        if message:
            entry["message"] = message
        self.emit(entry)

    def startTest(self, test):
        super().startTest(test)
        self.current = {"start": time.perf_counter(), "outcome": None, "message": None}

    def set(self, outcome, message=None):
        if self.current is not None and self.current["outcome"] in (None, "passed"):
            self.current["outcome"], self.current["message"] = outcome, message

    def stopTest(self, test):
        super().stopTest(test)
        cur, self.current = self.current, None
        self.record(self.nodeid(test), cur["outcome"] or "passed",
                    time.perf_counter() - cur["start"], cur["message"])

    def addSuccess(self, test):
        super().addSuccess(test)
        self.set("passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.set("failed", first_line(err))

    def fixture(self, test, outcome, message):
        """A class or module fixture (an _ErrorHolder, e.g. "setUpClass (pkg.mod.Class)") failed or
        skipped. Set-up problems become the outcome of each test they kept from running; others
        (tear-down) get an entry of their own."""
        kind, _, target = test.description.partition(" ")
        target = target.strip("()")
        if kind in ("setUpClass", "setUpModule"):
            key = "module" if kind == "setUpModule" else target.rsplit(".", 1)[-1]
            self.fixtures[key] = (outcome, "%s: %s" % (kind, message))
        else:
            where = target[len(self.modname) + 1:] if target.startswith(self.modname + ".") else ""
            parts = [p for p in where.split(".") if p] + [kind]
            self.record(self.module_path + "::" + "::".join(parts), outcome, 0.0, message)

    def addError(self, test, err):
        super().addError(test, err)
        if isinstance(test, unittest.suite._ErrorHolder):
            self.fixture(test, "error", first_line(err))
        else:
            self.set("error", first_line(err))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        if isinstance(test, unittest.suite._ErrorHolder):
            self.fixture(test, "skipped", reason)
        else:
            self.set("skipped", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self.set("xfailed", first_line(err))

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.set("failed", "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self.set("failed" if failed else "error", "%s: %s" % (subtest._subDescription(), first_line(err)))


def flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from flatten(t)
        else:
            yield t


def main(module_path, results_path, chunk_index, chunk_count):
    sys.path.insert(0, os.getcwd())
    out = open(results_path, "w", buffering=1)

    def emit(obj):
        out.write(json.dumps(obj) + "\n")

    modname = module_path[:-3].replace("/", ".")
    try:
        module = importlib.import_module(modname)
        tests = list(flatten(unittest.TestLoader().loadTestsFromModule(module)))
    except unittest.SkipTest as e:
        emit({"collected": [module_path]})
        emit({"nodeid": module_path, "outcome": "skipped", "duration": 0.0, "message": str(e)})
        emit({"done": True})
        return
    except BaseException:
        emit({"collected": [module_path]})
        emit({"nodeid": module_path, "outcome": "error", "duration": 0.0,
              "message": "import failed: " + first_line(sys.exc_info())})
        emit({"done": True})
        return
    if chunk_count > 1:
        per = -(-len(tests) // chunk_count)
        tests = tests[chunk_index * per:(chunk_index + 1) * per]
    result = JsonResult(module_path, modname, emit)
    emit({"collected": [result.nodeid(t) for t in tests]})
    unittest.TestSuite(tests).run(result)
    for t in tests:
        nodeid = result.nodeid(t)
        if nodeid not in result.reported:
            outcome, msg = (result.fixtures.get(type(t).__name__) or result.fixtures.get("module")
                            or ("error", "not run"))
            result.record(nodeid, outcome, 0.0, msg)
    emit({"done": True})


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "run":
        sys.exit("usage: driver run MODULE RESULTS CHUNK_INDEX CHUNK_COUNT")
    main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
