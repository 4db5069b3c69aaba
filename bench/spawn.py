"""Run one command and record its wall time and resource usage, for bench/run.py.

    python -I -S bench/spawn.py RESULT.json -- COMMAND [ARGS...]

Why a separate small process: Linux carries a process's peak RSS over exec() from the address space
it was started from, so a tool spawned straight from the driver (whose peak is hundreds of MB
after hashing and touching memory) would report the driver's peak as its own.  This launcher has a
~10 MB peak, so that is the floor of what a tool can report.  It also times the tool itself, so the
launcher's own start-up is not counted.

Standard library only and nothing imported that is not needed: the launcher's size is the floor.
"""

import json
import os
import sys
import time


def main() -> int:
    result, sep, *argv = sys.argv[1:]
    if sep != "--" or not argv:
        print("usage: spawn.py RESULT.json -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    record = {
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "maxrss_kib": usage.ru_maxrss,
        "exit_code": code,
    }
    with open(result, "w") as out:  # not pathlib: every import adds to the floor
        json.dump(record, out)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
