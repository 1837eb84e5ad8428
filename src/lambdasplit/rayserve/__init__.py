"""Body servers on Ray: replicas of the body server as a Ray Serve deployment, and a body split into a chain of
stage actors across machines. Needs the ``lambdasplit[ray]`` extra; nothing here is imported by the rest of the
package.

- ``stages.staged_server``: a body server whose body runs as stage actors on other nodes (what a replica calls);
- ``chain``: the stage actors placed one per node, and a session's state that drives them;
- ``stage``: one stage, global layers [a, b) with a KV cache per session;
- ``local.local_cluster``: a Ray cluster of several nodes on this machine (tests, benchmarks, demos).
"""
