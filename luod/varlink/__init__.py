"""luod's varlink layer: the interfaces it serves and how it serves them.

types (the wire's dataclasses, and converters from luod's domain objects),
replies (the error replies, made from the catalogue in luod.errors),
custody and manager (one module per interface: io.luod.Custody,
io.luod.Manager), transport (everything that depends on asyncvarlink's
internals, and the per-call context: the peer, the fds of the call),
fastconv (a quicker conversion for long lists of flat records), registry
(the interfaces put together for the daemon; `make idl`). Outside this
package luod uses asyncvarlink by name only (the registry the daemon serves).
What serving a method takes (asyncvarlink's conversions of its signature,
the wire types, a record's `__init__`) is made when the method is first
looked up, not at luod's start (issue 12, goal 2).
"""
