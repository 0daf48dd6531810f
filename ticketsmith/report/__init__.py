"""The executive report: sources, statistics, sections, evidence, figures, rendering."""
