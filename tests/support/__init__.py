"""Test scaffolding shared by tests/ and bench/: one copy of each helper.

    ports     free loopback ports
    services  the service addresses (IMPROTO_REDIS, IMPROTO_AMQP, IMPROTO_HBASE, read here
              only), the missing-service policy (skip; fail when CI is set), cleanup
    server    the handle of a server child process (imserver, and bench's other servers)
    clock     the fake millisecond clock and the retention constants
    waiting   polling a condition on the running reactor
    recorder  a PersistQueue batch handler that records its deliveries
    sessions  a Session over a StringTransport (Peer, logged_in), its factory, the fake reactor
              clock (session, prelogin and flow-control tests)

Imports: the repository root is the import root of tests and benchmarks, so this package is
`tests.support` everywhere, imported normally. pytest puts the root on sys.path
(`pythonpath = .` in setup.cfg's [tool:pytest]); a bench script, run as `python bench/x.py`,
gets it from bench/servers.py, which the bench scripts import first. Nothing here imports
pytest or the reactor at module level except `waiting`, so bench can use the rest.
"""
