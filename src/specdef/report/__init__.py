"""results.jsonl → report.md: the page, its attack / curvature / utility sections, markdown
helpers and plots. Imports no training code.
"""
