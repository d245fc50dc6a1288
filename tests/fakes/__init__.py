"""Fake upstreams and servers for tests: real HTTP on ephemeral ports, scripted per test."""
