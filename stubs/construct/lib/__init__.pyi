from construct.lib.containers import Container as Container
