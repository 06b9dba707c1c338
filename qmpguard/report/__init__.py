"""Renderers: the qmpguard.report/1 JSON document and the human table."""
