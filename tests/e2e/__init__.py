"""End-to-end tests of the local Fly stack (real processes on loopback)."""
