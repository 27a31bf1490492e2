"""Runs in the supervisor process: the loop, its runtime seam, and the service processes' guard.

    main.py       the process: lock, leftovers, signals, stack file watcher, then the loop
    loop.py       the Supervisor: owns every service; commands, reloads, snapshot, shutdown
    driver.py     one service's state machine, a tick at a time (start, probe, stop, fail)
    managed.py    what the loop knows about one service
    reporter.py   the supervisor's log lines, warnings (shown in status), contained bugs
    runtime.py    everything the loop does to the world (real: OsRuntime; tests: a fake)
    states.py     the service states and their transition table
    policy.py     backoff, crash loops, start deadlines: pure functions
    processes.py  start, recognise (pid + start time + argv) and stop process groups
    probes.py     the real requests that prove a service works
    logsink.py    service logs: whole lines, size rotation, failures that never raise
    lock.py       one supervisor per stack; leftover cleanup under the lock
    childguard.py runs inside each service: ends its group when the supervisor dies
"""
