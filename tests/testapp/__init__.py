"""A tiny Django app whose views the routing tests mark serverless."""
