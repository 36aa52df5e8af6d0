"""Fly's vocabulary, defined once for the library and the emulator: durations, autostop modes,
header names, the fly-replay codec, environment variables, the Machines API's address and Fly's
limits.

Django-free and dependency-free: the modules here only name and parse what Fly defines.
"""
