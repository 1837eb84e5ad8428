"""Body servers on Ray: replicas of the body server as a Ray Serve deployment, and a body split into a chain of
stage actors across machines. Needs the ``lambdasplit[ray]`` extra; nothing here is imported by the rest of the
package."""
