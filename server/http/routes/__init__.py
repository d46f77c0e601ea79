"""Thin routers: parse, call into submission/store, shape the answer."""
