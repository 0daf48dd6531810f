"""Serving: formats a ticket can ship as, compaction, measurement and the benchmark."""
