"""The sandbox runner: a fixed, standard-library-only script run inside the sandbox as
`python -I -S -B -c <this file's text> <result fd>` with its working directory holding
solution.py, tests.json (a JSON list of test sources) and nonce.

It runs the solution, then each test in the solution's namespace, and writes one JSON line
to the result fd: {"nonce", "passed", "total", "status", "detail"}. The nonce is read and
deleted before the solution runs, so printing "passed" or calling os._exit(0) does not
score: only a report carrying the nonce counts. (The solution runs in this process, so code
written to dig the nonce out of the interpreter's memory could forge a report; the nonce
stops the cheap and accidental forms of reward hacking, the isolation stops the harm.)
"""
import json
import os
import sys


def _run(source, filename, namespace, me):
    """None when `source` ran, else a short failure ("memory" for MemoryError)."""
    try:
        exec(compile(source, filename, "exec"), namespace)  # security-reviewed: runs only inside the sandbox (own uid, namespaces, rlimits), never in the trainer
        outcome = None
    except MemoryError:
        outcome = "memory"
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the code must not end the run
        outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
    if os.getpid() != me:  # a process the solution forked must not go on to report
        os._exit(1)
    return outcome


def main():
    result_fd, me = int(sys.argv[1]), os.getpid()
    with open("nonce", encoding="ascii") as f:
        nonce = f.read()
    os.unlink("nonce")
    with open("solution.py", encoding="utf-8") as f:
        solution = f.read()
    with open("tests.json", encoding="utf-8") as f:
        tests = json.load(f)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    failure = _run(solution, "solution.py", namespace, me)
    passed, memory = 0, failure == "memory"
    if failure is None:
        for i, test in enumerate(tests):
            outcome = _run(test, f"test_{i}", namespace, me)
            passed += outcome is None
            memory = memory or outcome == "memory"
            if outcome is not None:
                print(f"test {i} failed: {outcome}", file=sys.stderr)
    else:
        print(f"solution failed: {failure}", file=sys.stderr)
    status = "passed" if tests and passed == len(tests) else "memory" if memory else "failed"
    report = {"nonce": nonce, "passed": passed, "total": len(tests), "status": status, "detail": failure or ""}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os.write(result_fd, (json.dumps(report) + "\n").encode())
    os._exit(0)  # skip atexit handlers and finalizers the solution may have registered


if __name__ == "__main__":
    main()
