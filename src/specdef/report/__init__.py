"""results.jsonl → report.md, no training code: the page (page), its sections (attack, measure,
informed, native, optimizers, search — the worst-case attacker's, with its figures in
search_plots), blocks in hand-written pages (blocks), markdown and PNG plots.
"""
